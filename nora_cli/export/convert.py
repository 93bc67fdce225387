"""Save a PiSSA/OLoRA/NoRA-style adapter as plain LoRA relative to the ORIGINAL base.

Those inits move s·B0·A0 out of the base weight (W_res = W - s·B0·A0), so the trained factors only
make sense on W_res. ΔW = s·(B·A - B0·A0) = s·[B | -B0]·[A ; A0] is an ordinary LoRA of rank 2r on
the untouched base; PEFT computes it in `save_pretrained(path_initial_model_for_weight_conversion=)`.
This wrapper calls exactly that and works around what PEFT 0.17-0.21 get wrong around it:

1. PEFT rewrites the initial adapter's adapter_config.json in place (with the trained config), and
   names the temporary adapter after the directory's basename, so `init/`, `step-0.init` or
   `default` make the conversion fail. We hand PEFT a private copy named `nora_initial`.
2. `subtract_mutated_init` keeps only `lora_A`/`lora_B` tensors: embedding LoRA factors
   (`lora_embedding_A/B`), modules_to_save weights and saved embedding base layers are silently
   dropped, while the config still lists them (and says rank 2r). We put them back: embedding
   factors concatenated the same way ([A; A0], [B | -B0]), full weights as they are.
3. Loading the temporary adapter puts the whole model in eval mode (dropout off for the rest of
   training when this is called mid-run); we restore each module's train/eval mode.
DoRA and LoRA biases cannot be expressed as a difference of low-rank products and are refused.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from nora_cli.errors import NoraError
from nora_cli.export.adapter import WEIGHT_FILES

INITIAL_NAME = "nora_initial"


def save_converted_adapter(peft_model: Any, out_dir: str | Path, initial_adapter_dir: str | Path) -> Path:
    """Save the active adapter of `peft_model`, converted to plain LoRA (rank 2r) on the original base.

    `initial_adapter_dir` is the adapter saved right after the init (before any training step).
    Returns the directory holding adapter_config.json + adapter_model.safetensors.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    initial = Path(initial_adapter_dir)
    weights = next((initial / n for n in WEIGHT_FILES if (initial / n).is_file()), None)
    if not (initial / "adapter_config.json").is_file() or weights is None:
        raise NoraError(f"initial adapter not found in {initial} (adapter_config.json + adapter weights)")
    name = peft_model.active_adapter
    config = peft_model.peft_config[name]
    if config.use_dora or config.lora_bias:
        raise NoraError("DoRA / LoRA-bias adapters cannot be converted to plain LoRA on the original base")

    out = Path(out_dir)
    modes = {n: m.training for n, m in peft_model.named_modules()}
    with tempfile.TemporaryDirectory(prefix="nora-convert-") as tmp:
        copy = Path(tmp) / INITIAL_NAME
        copy.mkdir()
        shutil.copyfile(initial / "adapter_config.json", copy / "adapter_config.json")
        shutil.copyfile(weights, copy / weights.name)
        try:
            peft_model.save_pretrained(
                out, selected_adapters=[name], path_initial_model_for_weight_conversion=str(copy)
            )
        except ValueError as err:  # e.g. rsLoRA together with rank_pattern / alpha_pattern
            raise NoraError(f"cannot convert the adapter to plain LoRA: {err}") from None
        finally:
            for n, m in peft_model.named_modules():
                m.training = modes.get(n, m.training)
        target = out if name == "default" else out / name  # PEFT saves non-default adapters in a subdir
        initial_state = _load(copy / weights.name, load_file)

    saved_file = target / "adapter_model.safetensors"
    saved = load_file(saved_file)
    trained = get_peft_model_state_dict(peft_model, adapter_name=name)
    missing = [k for k in trained if k not in saved]
    for key in missing:
        if key.endswith("lora_embedding_A"):
            saved[key] = _cat(trained[key], initial_state[key], dim=0)
        elif key.endswith("lora_embedding_B"):
            saved[key] = _cat(trained[key], -initial_state[key], dim=1)
        else:
            saved[key] = trained[key].detach().cpu().contiguous()
    if missing:
        save_file(saved, saved_file, metadata={"format": "pt"})
    return target


def _load(file: Path, load_file: Any) -> dict:
    import torch

    if file.suffix == ".safetensors":
        return load_file(file)
    return torch.load(file, map_location="cpu", weights_only=True)


def _cat(trained: Any, initial: Any, dim: int) -> Any:
    import torch

    return torch.cat([trained.detach().cpu(), initial.to(trained.dtype).cpu()], dim=dim).contiguous()
