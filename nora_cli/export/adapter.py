"""Read an adapter directory, find its base model, open it on that base, and turn its tensors into per-weight
updates.

An update is everything the adapter does to one base tensor: a low-rank delta s·B·A and/or a full
replacement (modules_to_save, or an embedding saved alongside the adapter). Keys are in the
causal LM's module namespace (PEFT's `base_model.model.` prefix removed), e.g.
`model.layers.0.self_attn.q_proj.weight`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nora_cli.errors import NoraError, read_json
from nora_cli.run_dir import RunInfo, recorded_base

if TYPE_CHECKING:
    import torch

    from nora_cli.models import Dtype, ModelSource

PEFT_PREFIX = "base_model.model."
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
#: init_lora_weights values whose saved factors are relative to a base the init itself changed
MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


@dataclass(frozen=True)
class Adapter:
    """A PEFT adapter directory (adapter_config.json + weights), plus nora.json when nora wrote it."""

    path: Path
    config: dict[str, Any]
    nora: RunInfo  # empty when the dir has no nora.json
    weights: Path
    shapes: dict[str, list[int]] = field(default_factory=dict)  # tensor -> shape, from the file header

    def state_dict(self) -> dict[str, torch.Tensor]:
        import torch

        if self.weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(self.weights)
        return torch.load(self.weights, map_location="cpu", weights_only=True)


@dataclass(frozen=True)
class Base:
    """The model an adapter merges into."""

    display: str  # what the user or the adapter's metadata wrote
    name_or_path: str  # what from_pretrained reads
    local_dir: Path | None  # a local directory holding the checkpoint files, if there is one


@dataclass
class Update:
    """What the adapter does to one base tensor: W = (replace or W0) + scale·B·A."""

    key: str
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    scale: float = 1.0
    transposed: bool = False  # delta is (B·A)ᵀ: embeddings and fan_in_fan_out (GPT-2 Conv1D) layers
    replace: torch.Tensor | None = None

    def delta_shape(self) -> tuple[int, ...]:
        assert self.A is not None and self.B is not None
        out, inp = self.B.shape[0], self.A.shape[1]
        return (inp, out) if self.transposed else (out, inp)


def check_weights_file(file: Path, allow_pickle: bool) -> dict[str, list[int]]:
    """Tensor name -> shape, read from the header only: a pickle is refused unless allowed (unpickling can run
    code), and a truncated or corrupt safetensors file is one line naming it, before any model is loaded."""
    if file.suffix != ".safetensors":
        if not allow_pickle:
            raise NoraError(f"{file} is a pickle, which can run code when loaded; convert it to safetensors, or "
                            "pass --allow-pickle to load it with torch.load(weights_only=True)")
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="np") as handle:
            return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise NoraError(f"{file} is not a valid safetensors file (truncated or corrupt?): {err}") from None


def _check_ranks(adapter: Adapter, shapes: dict[str, list[int]]) -> None:
    """Every LoRA factor's rank must be the one adapter_config.json gives its module (PEFT would fail later
    with a size-mismatch traceback, or silently load a wrong adapter)."""
    for key, shape in shapes.items():
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None or len(shape) != 2:
            continue
        module = key.removeprefix(PEFT_PREFIX)[: -len(suffix)]
        rank = shape[0] if _LORA_SUFFIXES[suffix][0] == "A" else shape[1]
        # rank_pattern needs PEFT's matcher (imports torch); without one every module has rank r
        r = _scaling(adapter.config, module)[0] if adapter.config.get("rank_pattern") else adapter.config.get("r")
        if rank != r:
            raise NoraError(f"{adapter.weights}: tensor {key} has rank {rank} but {adapter.path}/adapter_config.json "
                            f"says r={r}: the adapter files do not belong together")


def read_adapter(path: str | Path, allow_pickle: bool = False) -> Adapter:
    """Check the files a PEFT adapter needs before anything is loaded or written: config JSON, weights
    format and integrity (header only), ranks."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise NoraError(f"adapter directory not found: {path}")
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise NoraError(f"{path} has no adapter_config.json: pass a `nora train` output dir or a PEFT adapter dir")
    weights = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
    if weights is None:
        raise NoraError(f"{path} has no adapter weights ({' or '.join(WEIGHT_FILES)})")
    config = read_json(config_file, "adapter config")
    if not isinstance(config, dict) or not isinstance(config.get("r", 8), int) or \
            not isinstance(config.get("lora_alpha", 8), int | float):
        raise NoraError(f"{config_file} is not a PEFT adapter config (expected an object with integer 'r')")
    adapter = Adapter(path=path, config=config, nora=RunInfo.read(path), weights=weights,
                      shapes=check_weights_file(weights, allow_pickle))
    if config.get("peft_type", "LORA") == "LORA":
        _check_ranks(adapter, adapter.shapes)
    return adapter


def check_adapter_fits(adapter: Adapter, base: str | ModelSource) -> None:
    """Every LoRA pair must wrap a Linear layer of the base with matching (in, out), checked on the base's
    meta-device skeleton (config.json only): an adapter made for another model fails before weights load."""
    from nora_cli.models import ModelSource, linear_layers, model_skeleton, resolve_source

    source = base if isinstance(base, ModelSource) else resolve_source(base)
    base = source.display
    layers = linear_layers(model_skeleton(source))
    for key, shape in adapter.shapes.items():
        if not key.endswith(".lora_A.weight") or len(shape) != 2:
            continue
        module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
        b_shape = adapter.shapes.get(key.replace(".lora_A.", ".lora_B."), [0, 0])
        if module not in layers:
            raise NoraError(f"adapter {adapter.path} does not fit base model {base}: the base has no Linear layer "
                            f"{module!r}; was it trained on another model?")
        if (shape[1], b_shape[0]) != layers[module]:
            raise NoraError(f"adapter {adapter.path} does not fit base model {base}: {module} is (in, out) = "
                            f"{layers[module]} in the base but {(shape[1], b_shape[0])} in the adapter; was it "
                            "trained on another model?")


def attach_adapter(model: Any, adapter_dir: Path, base: str, adapter_name: str = "default") -> Any:
    """PeftModel.from_pretrained with its failures as one line: an adapter made for another base (missing
    target modules, mismatched shapes) names both."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name)
    except (RuntimeError, ValueError, KeyError, OSError) as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()] or [type(err).__name__]
        detail = next((line for line in lines if "size mismatch" in line), lines[0])
        raise NoraError(f"adapter {adapter_dir} does not fit base model {base}: {detail[:300]}") from None


def refuse_mutated_init(adapter: Adapter) -> None:
    """PiSSA/OLoRA/... factors only make sense on the residual base the init left behind."""
    init = str(adapter.config.get("init_lora_weights", True)).lower()
    if init.startswith(MUTATING_INITS):
        raise NoraError(
            f"{adapter.path} was saved with init_lora_weights={init!r}: its factors are relative to a base that "
            "the init modified, so merging into the original base would be wrong; save it converted with "
            "nora_cli.export.convert.save_converted_adapter (PEFT path_initial_model_for_weight_conversion)"
        )


@dataclass(frozen=True)
class OpenAdapter:
    """A causal LM base with an adapter attached, and what it was opened from."""

    model: Any  # peft.PeftModel, in eval mode
    adapter: Adapter
    base: ModelSource  # `load_tokenizer(base)` gives its tokenizer


def open_adapter(adapter: Adapter | str | Path, base: str | ModelSource, *, dtype: Dtype = "fp32",
                 allow_pickle: bool = False, check_fit: bool = True, adapter_name: str = "default") -> OpenAdapter:
    """Base + adapter for a causal LM (sample, evaluate, export, verify): the adapter's files are checked first,
    before torch or any weights load, then (`check_fit`) its shapes against the base's skeleton; a failure to
    attach is one line naming both. The base's tokenizer is not loaded (a bare checkpoint may have none)."""
    from nora_cli.models import ModelSource, load_causal_lm_weights, resolve_source

    if not isinstance(adapter, Adapter):
        adapter = read_adapter(adapter, allow_pickle)
    source = base if isinstance(base, ModelSource) else resolve_source(base)
    if check_fit:
        check_adapter_fits(adapter, source)
    model = load_causal_lm_weights(source, dtype=dtype, allow_pickle=allow_pickle)
    return OpenAdapter(attach_adapter(model, adapter.path, source.display, adapter_name).eval(), adapter, source)


def resolve_base(adapter_dir: Path, base: str | None) -> Base:
    """--base, else the base the adapter records (`run_dir.recorded_base`)."""
    from nora_cli.models import resolve_source

    base = base if base is not None else recorded_base(adapter_dir)
    if not base:
        raise NoraError(f"{adapter_dir} does not record its base model; pass --base MODEL")
    source = resolve_source(base)
    local = Path(source.name_or_path)
    if local.is_dir():
        return Base(base, source.name_or_path, local)
    return Base(base, source.name_or_path, _hub_snapshot(source.name_or_path))


def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of a hub model (downloads only when the hub is reachable and not offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise NoraError(f"base model {repo_id!r} is not in the local Hugging Face cache and the hub cannot be "
                        "reached (HF_HUB_OFFLINE?); download it first or pass --base DIR") from None
    except (HfHubHTTPError, ValueError) as err:
        raise NoraError(f"cannot fetch base model {repo_id!r}: {str(err).splitlines()[0]}") from None


def _scaling(config: dict[str, Any], module: str) -> tuple[int, float]:
    """(r, s) for one module, with PEFT's own rank_pattern/alpha_pattern matching."""
    from peft.utils.other import get_pattern_key

    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config["r"])
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"])
    return r, alpha / (math.sqrt(r) if config.get("use_rslora") else r)


_LORA_SUFFIXES = {  # key suffix -> (factor, transposed delta)
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}


def unsupported_reason(config: dict[str, Any]) -> str | None:
    """Why the tensor-level merge cannot express this adapter (PEFT's own merge then does it)."""
    checks = {
        "it is not a LoRA adapter": config.get("peft_type", "LORA") != "LORA",
        "it uses DoRA": bool(config.get("use_dora")),
        "it trains LoRA biases": bool(config.get("lora_bias")),
        "it targets parameters (target_parameters)": bool(config.get("target_parameters")),
        "it is an activated LoRA (aLoRA)": config.get("alora_invocation_tokens") is not None,
        "it trains token embeddings (trainable_token_indices)": bool(config.get("trainable_token_indices")),
    }
    return next((reason for reason, hit in checks.items() if hit), None)


def collect_updates(adapter: Adapter) -> tuple[dict[str, Update], str | None]:
    """Group the adapter's tensors by the base tensor they change; (updates, reason it can't stream)."""
    config = adapter.config
    reason = unsupported_reason(config)
    if reason:
        return {}, reason
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    updates: dict[str, Update] = {}
    for raw_key, tensor in adapter.state_dict().items():
        key = raw_key.removeprefix(PEFT_PREFIX)
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is not None:
            module = key[: -len(suffix)]
            factor, embedding = _LORA_SUFFIXES[suffix]
            if tensor.ndim != 2:
                return {}, f"{module} is not a Linear/Embedding LoRA (factor of shape {tuple(tensor.shape)})"
            upd = updates.setdefault(f"{module}.weight", Update(f"{module}.weight"))
            setattr(upd, factor, tensor)
            upd.transposed = embedding or fan_in_fan_out
            r, upd.scale = _scaling(config, module)
            if tensor.shape[0 if factor == "A" else 1] != r:
                raise NoraError(f"adapter tensor {raw_key} has rank {tensor.shape[0 if factor == 'A' else 1]} but "
                                f"adapter_config.json says r={r}: the adapter files are inconsistent")
        elif ".lora_" in key or "trainable_tokens" in key:
            return {}, f"it has tensors nora's streaming merge does not know ({raw_key})"
        else:  # a full weight: modules_to_save, or an embedding PEFT saved with the adapter
            target = key.replace(".base_layer.", ".")
            updates.setdefault(target, Update(target)).replace = tensor
    incomplete = [u.key for u in updates.values() if (u.A is None) != (u.B is None)]
    if incomplete:
        raise NoraError(f"adapter weights are incomplete: {incomplete[0]} has only one of its two LoRA factors")
    return updates, None
