"""The recipe: one typed, strict schema for everything `nora train` does, loaded from YAML.

Unknown keys fail (with the closest valid key suggested), every field has a default with its unit,
the method name (`lora`, `nora`, `lora-p`, `nora+`) expands into init/preconditioner presets that
explicit keys override, and relative paths resolve against the recipe file so a recipe can travel
with its data. The resolved recipe is saved beside every adapter (`recipe_to_yaml`) and loads back
to an equal object.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from nora_cli.config.data import DataConfig
from nora_cli.config.names import (
    EVAL_BATCH_SIZE,
    INIT_NAMES,
    PISSA_NITER,
    InitName,
    Method,
    Protocol,
)
from nora_cli.config.types import Beta, Float, Int, _Section
from nora_cli.errors import shown

Precondition = Literal["none", "scaled-gd"]



class ModelConfig(_Section):
    source: str = Field(
        "smollm2-135m",
        description="Base model: hub id, local directory, .gguf file, or a nora alias such as 'smollm2-135m'. "
        "Relative paths resolve against the recipe file.",
    )
    gguf_file: str | None = Field(
        None,
        description="GGUF file name inside `source` when source is a hub repo/directory holding GGUF files.",
    )
    dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Storage dtype of the frozen base weights (adapters train in fp32)."
    )
    quantization: Literal["4bit", "8bit"] | None = Field(
        None, description="bitsandbytes quantization of the frozen base (QLoRA): 4bit = nf4 + double quant, 8bit = LLM.int8. Runs on CUDA, and on CPU with bitsandbytes ≥ 0.49."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory."
    )
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the hub repo.")
    allow_pickle: bool = Field(
        False,
        description="Also load pickled .bin/.pt weights (with torch.load(weights_only=True)). Off: safetensors "
        "only, since unpickling can run code. Same as `nora train --allow-pickle`.",
    )


TargetModules = list[str] | Literal["all-linear"]


class AdapterConfig(_Section):
    r: Int = Field(32, gt=0, description="LoRA rank r (columns of B, rows of A).")
    alpha: Float = Field(
        64, gt=0, description="LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA)."
    )
    dropout: Float = Field(
        0.05, ge=0, lt=1, description="Dropout on the adapter input, probability in [0, 1)."
    )
    target_modules: TargetModules = Field(
        ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
        description="Module names (suffixes) to wrap with LoRA, or 'all-linear'.",
    )
    use_rslora: bool = Field(False, description="Rank-stabilized scaling alpha/sqrt(r) instead of alpha/r.")
    init: InitName | Annotated[str, StringConstraints(pattern=PISSA_NITER.pattern)] | None = Field(
        None,
        description="Adapter initialization: lora (B=0, A Kaiming), gaussian, pissa, pissa_niter_K, olora, "
        "nystrom (NoRA). null: chosen by `method`.",
    )
    sigma: Float = Field(
        0.1, gt=0, description="NoRA: std of the Gaussian sketch used by the Nyström init (paper's sigma)."
    )
    side: Literal["output", "input"] = Field(
        "output",
        description="NoRA: sketch W0 from the output side (B from W0·Ω) or the input side (A from Ωᵀ·W0).",
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _check_targets(cls, value: Any) -> Any:
        if value == "all-linear":
            return value
        if isinstance(value, str):  # a single name is a common shorthand
            return [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"expected a non-empty list of module names or 'all-linear', got {shown(value)}")
        return value

    @field_validator("init", mode="before")
    @classmethod
    def _check_init(cls, value: Any) -> Any:
        if value is None or value in INIT_NAMES or (isinstance(value, str) and PISSA_NITER.match(value)):
            return value
        hint = difflib.get_close_matches(value, INIT_NAMES, n=1) if isinstance(value, str) else []
        did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(
            f"expected one of {', '.join(INIT_NAMES)}, pissa_niter_K or null, got {shown(value)}{did_you_mean}"
        )


class OptimizerConfig(_Section):
    name: Literal["adamw", "sgd"] = Field("adamw", description="Base optimizer (torch.optim).")
    lr: Float = Field(3e-4, gt=0, description="Peak learning rate.")
    weight_decay: Float = Field(0.0, ge=0, description="Decoupled weight decay (AdamW) / L2 (SGD).")
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="AdamW (beta1, beta2), each in [0, 1).")
    momentum: Float = Field(0.0, ge=0, lt=1, description="SGD momentum in [0, 1).")
    precondition: Precondition | None = Field(
        None,
        description="Gradient preconditioner: none, or scaled-gd (ScaledGD on the B/A pair). null: from `method`.",
    )
    normalize: bool | None = Field(
        None, description="Normalize the preconditioned step (NoRA+). null: from `method`."
    )
    damping: Float = Field(1e-6, ge=0, description="Ridge added to BᵀB / AAᵀ before inverting in ScaledGD.")


class TrainConfig(_Section):
    epochs: Float = Field(1, gt=0, description="Passes over the training set (fractions allowed).")
    max_steps: Int | None = Field(None, gt=0, description="Optimizer steps; overrides `epochs` when set.")
    batch_size: Int = Field(
        8, gt=0, description="Global batch: examples per optimizer step, across processes."
    )
    micro_batch_size: Int = Field(8, gt=0, description="Examples per forward pass per process.")
    lr_schedule: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Decay after warmup: linear to 0, cosine to 0, or constant."
    )
    warmup_steps: Int = Field(0, ge=0, description="Optimizer steps of linear warmup from 0.")
    max_grad_norm: Float | None = Field(1.0, gt=0, description="Gradient clipping norm (null: no clipping).")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="Autocast dtype for forward/backward (accelerate mixed_precision)."
    )
    log_steps: Int = Field(1, gt=0, description="Write metrics every N optimizer steps.")
    eval_steps: Int | None = Field(
        None, gt=0, description="Validation loss every N optimizer steps (null: never)."
    )
    save_steps: Int | None = Field(
        None, gt=0, description="Checkpoint every N optimizer steps (null: only when SIGINT/SIGTERM stops the run)."
    )
    keep_last: Int | None = Field(2, gt=0, description="Keep the newest N checkpoints (null: keep all).")
    save_best: bool = Field(False, description="Also keep the checkpoint with the lowest validation loss.")
    nan_policy: Literal["stop", "skip"] = Field(
        "stop", description="On a non-finite loss: stop with an error, or skip that step."
    )
    num_processes: Int = Field(1, gt=0, description="Data-parallel processes (accelerate launch).")
    threads: Int | None = Field(
        None, gt=0, description="CPU threads per process (null: the CPUs this process may use, from its affinity "
        "and cgroup quota, shared among local ranks; on CPU, fewer while other work keeps cores busy). Pin it "
        "for runs that must be bitwise reproducible across machine loads."
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as False

    @model_validator(mode="after")
    def _check_batch(self) -> TrainConfig:
        per_step = self.micro_batch_size * self.num_processes
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size × num_processes "
                f"({self.micro_batch_size} × {self.num_processes} = {per_step}); change one of them"
            )
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps}); lower warmup_steps")
        return self

    def grad_accum_steps(self, processes: int | None = None) -> int:
        """Micro-batches accumulated per optimizer step in each process. `processes`: the real world size,
        which `accelerate launch`/torchrun may set apart from num_processes (default: num_processes)."""
        return self.batch_size // (self.micro_batch_size * (processes or self.num_processes))


class EvalConfig(_Section):
    tasks: list[str] = Field(
        [], description="Tasks evaluated after training (e.g. boolq, arc-easy, gsm8k, demo)."
    )
    protocol: Protocol = Field(
        "llm-adapters",
        description="llm-adapters: greedy generation + answer extraction as in LLM-Adapters; "
        "loglikelihood: pick the highest-likelihood choice.",
    )
    limit: Int | None = Field(None, gt=0, description="Evaluate only the first N examples per task.")
    batch_size: Int = Field(EVAL_BATCH_SIZE, gt=0, description="Prompts per generation/scoring batch.")
    data: dict[str, str] = Field(
        {},
        description="Task name -> test file path (relative to the recipe file), overriding the default location.",
    )


class OutputConfig(_Section):
    dir: str = Field(
        "out/run",
        description="Output directory for the adapter, metrics and checkpoints. Relative paths resolve "
        "against the current working directory (not the recipe file).",
    )


class MethodPreset(NamedTuple):
    """What a method name means; explicit adapter.init / optimizer.* keys win over it."""

    init: str
    precondition: str
    normalize: bool


METHOD_PRESETS: dict[str, MethodPreset] = {
    "lora": MethodPreset(init="lora", precondition="none", normalize=False),
    "nora": MethodPreset(init="nystrom", precondition="none", normalize=False),
    "lora-p": MethodPreset(init="lora", precondition="scaled-gd", normalize=False),
    "nora+": MethodPreset(init="nystrom", precondition="scaled-gd", normalize=True),
}


#: the attention projections of an SD UNet (paper Tab. 6): the default targets for task dreambooth
UNET_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


class DreamBoothConfig(_Section):
    """The `dreambooth:` recipe section (task: dreambooth)."""

    instance_data_dir: str = Field(
        description="Folder of subject photos (jpg/png/webp). Relative paths resolve against the recipe file."
    )
    instance_prompt: str = Field(description="Prompt naming the subject with a rare token, e.g. 'a photo of sks dog'.")
    class_prompt: str | None = Field(None, description="Prompt for the subject's class ('a photo of dog'); "
                                     "needed with prior preservation.")
    class_data_dir: str | None = Field(None, description="Folder of class images; missing ones are generated "
                                       "with the base pipeline. Needed with prior preservation.")
    num_class_images: Int = Field(100, gt=0, description="Class images to use (and generate if fewer exist).")
    prior_loss_weight: Float = Field(1.0, ge=0, description="Weight of the class-image (prior) loss.")
    with_prior_preservation: bool = Field(False, description="Add the prior-preservation loss on class images.")
    resolution: Int = Field(512, gt=0, description="Training image side in pixels (a multiple of 8 for SD).")
    center_crop: bool = Field(True, description="Center crop to the square; false: random crop.")
    random_flip: bool = Field(False, description="Flip images horizontally with probability 0.5.")
    train_text_encoder: bool = Field(False, description="Also train LoRA on the text encoder "
                                     "(q_proj, k_proj, v_proj, out_proj).")
    validation_prompts: list[str] = Field([], description="Prompts sampled into out/validation/step_NNNN.png.")
    validation_steps: Int | None = Field(None, gt=0, description="Sample validation images every N optimizer "
                                         "steps and at the last step (null: every train.eval_steps; neither: only "
                                         "the last step).")
    num_validation_images: Int = Field(4, gt=0, description="Images per validation prompt (one grid row).")
    validation_seed: Int = Field(0, ge=0, lt=2**32, description="Seed for validation images, so every step shows the same noise.")
    validation_inference_steps: Int = Field(25, gt=0, description="DPM-Solver++ denoising steps per validation "
                                            "image (class images use the same).")
    cache_latents: bool = Field(False, description="Encode every image with the VAE once, then sample the cached "
                                "latent distribution each step (crop/flip are then fixed at caching time).")
    snr_gamma: Float | None = Field(None, gt=0, description="Min-SNR-γ loss weighting (5.0 is the usual value; "
                                    "null: plain MSE).")

    @model_validator(mode="after")
    def _check(self) -> DreamBoothConfig:
        if self.with_prior_preservation and (not self.class_prompt or not self.class_data_dir):
            raise ValueError("with_prior_preservation needs class_prompt and class_data_dir")
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the VAE downsamples by 8), got {self.resolution}")
        return self


class Recipe(_Section):
    """A complete training run. Sections mirror the YAML; see `nora recipes schema`."""

    method: Method = Field(
        "nora",
        description="lora: LoRA init + AdamW; nora: Nyström init; lora-p: LoRA init + ScaledGD; "
        "nora+: Nyström init + normalized ScaledGD. Explicit adapter.init / optimizer.* keys override.",
    )
    task: Literal["causal-lm", "dreambooth"] = Field("causal-lm", description="What is being finetuned.")
    seed: Int = Field(0, ge=0, lt=2**32, description="Seed for init sketches, data shuffling and dropout, in [0, 2³²).")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="LoRA adapter shape and init.")
    optimizer: OptimizerConfig = Field(
        default_factory=OptimizerConfig, description="Optimizer and preconditioner."
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Training data.")
    train: TrainConfig = Field(
        default_factory=TrainConfig, description="Loop length, batching, schedule, saving."
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation after training.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where results go.")
    dreambooth: DreamBoothConfig | None = Field(None, description="DreamBooth settings (task: dreambooth).")

    @model_validator(mode="after")
    def _resolve(self) -> Recipe:
        preset = METHOD_PRESETS[self.method]
        if self.adapter.init is None:
            self.adapter = self.adapter.model_copy(update={"init": preset.init})
        updates = {
            key: getattr(preset, key)
            for key in ("precondition", "normalize")
            if getattr(self.optimizer, key) is None
        }
        if updates:
            self.optimizer = self.optimizer.model_copy(update=updates)
        if self.data.streaming and self.train.max_steps is None:
            raise ValueError("data.streaming needs train.max_steps: a stream's length is not known in advance")
        if self.task == "dreambooth" and self.dreambooth is None:
            raise ValueError("task 'dreambooth' needs a `dreambooth:` section (instance prompt, images, ...)")
        if self.task == "dreambooth" and "target_modules" not in self.adapter.model_fields_set:
            self.adapter = self.adapter.model_copy(update={"target_modules": list(UNET_TARGET_MODULES)})
        return self


