"""Plain PEFT + transformers Trainer LoRA finetune: the reference `nora train` is timed against.

Nothing from nora is imported. The data handling follows LLM-Adapters' finetune.py (the alpaca
`generate_prompt`, train_on_inputs, EOS appended below cutoff_len) with two deliberate choices that make
the batches identical to nora's, so a tokens/s ratio compares the training code and nothing else:
prompt and response are tokenized separately (as nora does) and padding is on the right; the sampler
is sequential (nora runs with data.shuffle=false).

    python benchmarks/trainer_baseline.py --model-dir DIR --data ARC-Easy/train.json --precision bf16 \\
        --warmup-steps 3 --steps 20 --result out.json

Writes {"tokens", "padded_tokens", "seconds", "tokens_per_s", "samples_per_s", "final_loss", "peak_rss_mb"}
for the `--steps` steps after the first `--warmup-steps` (timed between Trainer's on_step_end callbacks).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)


def generate_prompt(data_point: dict) -> str:
    """LLM-Adapters finetune.py, verbatim (the indentation is part of the prompt)."""
    if data_point["input"]:
        return f"""Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request. 

                ### Instruction:
                {data_point["instruction"]}
                
                ### Input:
                {data_point["input"]}
                
                ### Response:
                {data_point["output"]}"""  # noqa: W291, W293
    return f"""Below is an instruction that describes a task. Write a response that appropriately completes the request.  

                ### Instruction:
                {data_point["instruction"]}
                
                ### Response:
                {data_point["output"]}"""  # noqa: W291, W293


def tokenize(tokenizer, record: dict, cutoff_len: int) -> dict:
    prompt = tokenizer(generate_prompt({**record, "output": ""}))["input_ids"]
    response = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    ids = (prompt + response)[:cutoff_len]
    if tokenizer.eos_token_id not in response and len(ids) < cutoff_len:
        ids.append(tokenizer.eos_token_id)
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}  # train_on_inputs


class StepClock(TrainerCallback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self.ends.append(time.perf_counter())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--data", required=True, help="LLM-Adapters-format JSON (instruction/input/output)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cutoff-len", type=int, default=256)
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps run but not timed")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=64)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,up_proj,down_proj")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--output-dir", default="/tmp/trainer-baseline")
    parser.add_argument("--result", required=True, help="JSON file to write the measurement to")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model.config.use_cache = False
    # deliberately plain PEFT (not nora_cli.lora.lora_config): this is the vanilla baseline nora is timed against
    config = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, bias="none",
                        target_modules=args.targets.split(","), task_type="CAUSAL_LM")
    model = get_peft_model(model, config)

    records = json.loads(Path(args.data).read_text())
    train = Dataset.from_list([tokenize(tokenizer, r, args.cutoff_len) for r in records])
    total_steps = args.warmup_steps + args.steps
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=total_steps,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        bf16=args.precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        logging_steps=total_steps,
        save_strategy="no",
        report_to="none",
        seed=0,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
    )
    clock = StepClock()
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, return_tensors="pt"),
        callbacks=[clock],
    )
    result = trainer.train()

    timed = range(args.warmup_steps * args.batch_size, total_steps * args.batch_size, args.batch_size)
    lengths = [[len(train[j]["input_ids"]) for j in range(i, i + args.batch_size)] for i in timed]
    seconds = clock.ends[total_steps - 1] - clock.ends[args.warmup_steps - 1]
    tokens = sum(sum(step) for step in lengths)
    out = {
        "tool": "trainer",
        "precision": args.precision,
        "tokens": tokens,
        "padded_tokens": sum(max(step) * len(step) for step in lengths),
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "samples_per_s": args.steps * args.batch_size / seconds,
        "final_loss": result.training_loss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }
    Path(args.result).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
