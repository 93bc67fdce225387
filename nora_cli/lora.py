"""Adapter initializations applied to a PEFT LoRA model after its real weights are attached.

`initialize(model, method)` rewrites lora_A / lora_B of every LoRA layer in place. PEFT's own inits
(lora, gaussian, pissa, olora) are delegated to the LoraLayer methods; `nystrom` is the paper's NoRA init
(ICLR 2025, eq. 5): one factor is a scaled Gaussian sketch of W0, the other is zero, so W0 + s·B·A = W0
at step 0 and the first gradient step already moves inside W0's column (or row) space.

Randomness never touches the global RNG: each module draws from a generator seeded by
sha256(f"{seed}:{name}"), `name` being the module's path in the underlying transformers/torch model
(e.g. "model.layers.0.self_attn.q_proj"). Every data-parallel rank therefore builds identical adapters
without communication, whatever the module order or RNG state.

A little over 400 lines: the init registry, the inits, and the LoraConfig they expect belong together.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from nora_cli.config.names import PISSA_NITER
from nora_cli.errors import NoraError

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from torch import nn

    from nora_cli.config.schema import AdapterConfig

Side = Literal["output", "input"]


@dataclass(frozen=True)
class InitOptions:
    """What the user asked for; recorded as the "init" block of nora.json."""

    name: str
    sigma: float = 0.1  # nystrom: std of the sketch relative to W0, after dividing by the LoRA scaling
    side: Side = "output"  # nystrom: "output" sketches B = W0·Ω (paper eq. 5), "input" sketches A = Ω·W0
    seed: int = 0  # per-module generators derive from (seed, module name)


@dataclass(frozen=True)
class InitResult:
    """What `initialize` did: the nora.json "init" block and whether W0 was rewritten (then save the
    initial adapter now, so export can convert back to a plain LoRA on the original base)."""

    options: InitOptions
    modifies_base: bool


@dataclass(frozen=True)
class InitMethod:
    """One entry of `INITS`, the registry of init names (config.names.InitName mirrors its keys)."""

    apply: Callable[[LoraLayer, str, str, InitOptions], None]  # (layer, module name, adapter, options)
    modifies_base: bool  # True: W0 is replaced by a residual; export must convert to plain LoRA
    kinds: tuple[str, ...] | None = None  # base layer kinds (see _WEIGHTS) it supports; None: PEFT decides
    float_only: bool = False  # refuses quantized base weights


# ---------------------------------------------------------------------------------------------------
# determinism


def module_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, module name); hashlib, because Python's hash() is salted per process."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def gaussian_sketch(seed: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Ω ~ N(0, 1) in fp32, drawn on CPU so the values do not depend on the accelerator."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(module_seed(seed, name))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


@contextmanager
def _seeded_rng(seed: int, name: str, device: torch.device) -> Iterator[None]:
    """Seed the global RNG for PEFT's own random inits, and restore it afterwards."""
    import torch

    devices: list[int] = []
    if device.type not in ("cpu", "meta"):
        devices = list(range(torch.get_device_module(device.type).device_count()))
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else None):
        torch.manual_seed(module_seed(seed, name))
        yield


# ---------------------------------------------------------------------------------------------------
# base weights as an out × in fp32 matrix (first match wins; bnb Linear4bit/8bitLt subclass nn.Linear)


def _linear_weight(base: nn.Module) -> torch.Tensor:
    """Plain weights as they are; bnb 4/8-bit, HQQ, torchao dequantized (this layer only)."""
    from peft.utils.integrations import dequantize_bnb_weight, dequantize_module_weight, get_bnb_param_type

    if get_bnb_param_type(base.weight):
        # Not dequantize_module_weight: on CPU it re-assigns module.weight, which drops bnb 8-bit row
        # scales after the first forward (peft 0.21.2), breaking the next forward.
        return dequantize_bnb_weight(base.weight, state=getattr(base, "state", None))
    return dequantize_module_weight(base)


def _conv1d_weight(base: nn.Module) -> torch.Tensor:
    return base.weight.T  # transformers Conv1D (GPT-2) stores in × out


def _conv_weight(base: nn.Module) -> torch.Tensor:
    return base.weight.flatten(1)  # out × (in·k…), the order PEFT's conv lora_A (r × in × k…) flattens to


def _is_conv1d(base: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(base, Conv1D)


def _is_linear(base: nn.Module) -> bool:
    from torch import nn

    return isinstance(base, nn.Linear)


def _is_conv(base: nn.Module) -> bool:
    from torch import nn

    # Grouped convs get a block-diagonal lora_B in PEFT, which no single W0 sketch matches.
    return isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and base.groups == 1


_WEIGHTS: list[tuple[str, Callable[[nn.Module], bool], Callable[[nn.Module], torch.Tensor]]] = [
    (CONV1D := "transformers Conv1D", _is_conv1d, _conv1d_weight),
    (LINEAR := "Linear", _is_linear, _linear_weight),
    (CONV := "Conv1d/2d/3d (groups=1)", _is_conv, _conv_weight),
]
ALL_KINDS = (CONV1D, LINEAR, CONV)


def _kind(layer: LoraLayer) -> str | None:
    base = layer.get_base_layer()
    return next((kind for kind, match, _ in _WEIGHTS if match(base)), None)


def _require(layer: LoraLayer, name: str, method: str, kinds: tuple[str, ...]) -> str:
    kind = _kind(layer)
    if kind not in kinds:
        base = layer.get_base_layer()
        detail = f" (groups={base.groups})" if getattr(base, "groups", 1) != 1 else ""
        raise NoraError(f"init {method!r} does not support {type(base).__name__}{detail} layers "
                        f"(module {name!r}); supported: {', '.join(kinds)}")
    return kind


def base_weight_matrix(layer: LoraLayer, name: str = "?") -> torch.Tensor:
    """W0 of one LoRA layer as an fp32 out × in_flat matrix on W0's device (dequantized if needed)."""
    import torch

    return _native_weight(layer, name).to(torch.float32)


def _native_weight(layer: LoraLayer, name: str) -> torch.Tensor:
    """W0 as an out × in_flat matrix in its storage dtype (dequantized if needed), usually a view."""
    kind = _require(layer, name, "nystrom", ALL_KINDS)
    base = layer.get_base_layer()
    if base.weight.is_meta:
        raise NoraError(f"module {name!r} has no weights yet (meta device); initialize after loading them")
    fetch = next(fn for k, _, fn in _WEIGHTS if k == kind)
    return fetch(base)


_CHUNK_BYTES = 8 << 20  # fp32 row block of W0 converted at a time: stays in cache


def _times_omega(w0: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """W0·Ω in fp32, through oneDNN on CPU (MKL's sgemm is 2-3× slower on AMD CPUs). A bf16/fp16 W0 on CPU
    is converted in row blocks of ~8 MB that stay in cache instead of as one fp32 copy: 3-4× faster on
    7B-sized layers, and no full-size fp32 copy. Output rows are independent, so blocking changes nothing."""
    import torch

    from nora_cli.cpu_kernels import matmul_fp32

    if w0.dtype == torch.float32 or w0.device.type != "cpu" or not w0.is_contiguous():
        return matmul_fp32(w0.to(torch.float32), omega)
    rows = max(256, _CHUNK_BYTES // (4 * w0.shape[1]))
    return torch.cat([matmul_fp32(w0[start : start + rows].to(torch.float32), omega)
                      for start in range(0, w0.shape[0], rows)])


# ---------------------------------------------------------------------------------------------------
# the inits


def _nystrom(layer: LoraLayer, name: str, adapter: str, opts: InitOptions) -> None:
    """Output side: B0 = (σ/s)·W0·Ω, A0 = 0.  Input side: A0 = (σ/s)·Ω·W0, B0 = 0.  One matmul, no SVD."""
    import torch

    from nora_cli.cpu_kernels import matmul_fp32

    w0 = _native_weight(layer, name)
    lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    rank, coef = layer.r[adapter], opts.sigma / layer.scaling[adapter]
    if opts.side == "output":
        omega = gaussian_sketch(opts.seed, name, (w0.shape[1], rank)).to(w0.device)
        sketch, target, zero = _times_omega(w0, omega), lora_b, lora_a
    else:
        omega = gaussian_sketch(opts.seed, name, (rank, w0.shape[0])).to(w0.device)
        sketch, target, zero = matmul_fp32(omega, w0.to(torch.float32)), lora_a, lora_b
    del w0, omega  # peak extra memory: at most one fp32 W0 (none for fp32 W0, or bf16/fp16 W0 on CPU)
    sketch.mul_(coef)
    target.copy_(sketch.reshape(target.shape).to(target.dtype))
    zero.zero_()


def _peft_random(init_lora_weights: bool | str) -> Callable[[LoraLayer, str, str, InitOptions], None]:
    def apply(layer: LoraLayer, name: str, adapter: str, opts: InitOptions) -> None:
        with _seeded_rng(opts.seed, name, layer.get_base_layer().weight.device):
            layer.reset_lora_parameters(adapter, init_lora_weights)  # also handles Embedding LoRA

    return apply


def _keep_dtype(layer: LoraLayer, adapter: str, fn: Callable[[], None]) -> None:
    """PiSSA/OLoRA assign fp32 `.data` to the LoRA weights; keep the dtype the model was built with."""
    params = [layer.lora_A[adapter].weight, layer.lora_B[adapter].weight]
    dtypes = [p.dtype for p in params]
    fn()
    for param, dtype in zip(params, dtypes, strict=True):
        param.data = param.data.to(dtype)  # .data keeps the Parameter object the optimizer holds


def _pissa(layer: LoraLayer, name: str, adapter: str, opts: InitOptions) -> None:
    with _seeded_rng(opts.seed, name, layer.get_base_layer().weight.device):  # pissa_niter_K is randomized
        _keep_dtype(layer, adapter, lambda: layer.pissa_init(adapter, opts.name))


def _olora(layer: LoraLayer, name: str, adapter: str, opts: InitOptions) -> None:
    _keep_dtype(layer, adapter, lambda: layer.olora_init(adapter))


#: the init registry: config.names.InitName lists the same names in the same order (tests/test_recipe.py)
INITS: dict[str, InitMethod] = {
    "lora": InitMethod(_peft_random(True), modifies_base=False),  # Kaiming-uniform A, zero B
    "gaussian": InitMethod(_peft_random("gaussian"), modifies_base=False),  # A ~ N(0, 1/r), zero B
    # also "pissa_niter_K" (randomized SVD); PEFT's pissa_init refuses quantized weights
    "pissa": InitMethod(_pissa, modifies_base=True, kinds=(LINEAR, CONV1D), float_only=True),
    # PEFT's olora_init ignores fan_in_fan_out, so GPT-2 Conv1D would get transposed factors
    "olora": InitMethod(_olora, modifies_base=True, kinds=(LINEAR,)),
    "nystrom": InitMethod(_nystrom, modifies_base=False, kinds=ALL_KINDS),
}


def init_method(name: str) -> InitMethod:
    if name in INITS:
        return INITS[name]
    if PISSA_NITER.match(name):
        return INITS["pissa"]
    valid = ", ".join([*INITS, "pissa_niter_K"])
    raise NoraError(f"unknown init {name!r}; valid: {valid}")


def modifies_base(method: str) -> bool:
    """Whether `method` rewrites base weights (then save the initial adapter for export)."""
    return init_method(method).modifies_base


def base_preserving_inits() -> tuple[str, ...]:
    """Init names that leave W0 untouched (the adapter alone is the whole finetune)."""
    return tuple(name for name, entry in INITS.items() if not entry.modifies_base)


def lora_config(adapter: AdapterConfig, target_modules: list[str] | str | None = None, **extra: Any) -> LoraConfig:
    """The PEFT LoraConfig of a recipe's adapter section; `target_modules` overrides the recipe's (e.g. the
    text encoder's), `extra` adds task fields (task_type, bias). init_lora_weights stays True: PEFT's
    cheap default init is a placeholder that `initialize` overwrites once the real weights are attached."""
    from peft import LoraConfig

    targets = adapter.target_modules if target_modules is None else target_modules
    return LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                      target_modules=targets, use_rslora=adapter.use_rslora, init_lora_weights=True,
                      **extra)


# ---------------------------------------------------------------------------------------------------
# entry points


_REWRITTEN_BY = "_nora_base_rewritten_by"  # set on a model whose W0 an init replaced by a residual


def _root(model: nn.Module) -> nn.Module:
    """The transformers/torch model under PEFT's wrappers: module names are keyed on it."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        return model.get_base_model()
    return model.model if isinstance(model, BaseTuner) else model


def _check(entry: InitMethod, layer: LoraLayer, name: str, method: str) -> None:
    import torch
    from peft.utils.integrations import get_bnb_param_type

    if entry.kinds is not None:
        _require(layer, name, method, entry.kinds)
    weight = layer.get_base_layer().weight  # bnb 4-bit may be stored as a float dtype (quant_storage)
    quantized = get_bnb_param_type(weight) or weight.dtype not in (torch.float32, torch.float16, torch.bfloat16)
    if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
        raise NoraError(f"the 4-bit weight of {name!r} was repacked by bitsandbytes into its CPU inference "
                        "layout (an eval-mode forward ran first), which dequantizes to a scrambled W0; "
                        "initialize right after loading, or call "
                        "nora_cli.models.keep_trainable_4bit_layout(model) before any forward")
    if entry.float_only and quantized:
        raise NoraError(f"init {method!r} needs a float base weight, but {name!r} is quantized; "
                        "initialize it on an unquantized model")


def lora_layers(model: nn.Module, adapter_name: str = "default") -> list[tuple[str, LoraLayer]]:
    """(name, layer) for every LoRA layer holding `adapter_name`, names relative to the base model."""
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in _root(model).named_modules()
            if isinstance(module, LoraLayer) and adapter_name in module.r]


def initialize(
    model: nn.Module,
    method: str,
    *,
    sigma: float = 0.1,
    side: Side = "output",
    seed: int = 0,
    adapter_name: str = "default",
) -> InitResult:
    """Apply `method` to every LoRA layer of `adapter_name` in place.

    Returns what was done; with `modifies_base` (PiSSA/OLoRA) call `save_initial_adapter` now so export can
    convert back to plain LoRA. The model only remembers that its base was rewritten, to refuse a second
    base-rewriting init on it.
    """

    entry = init_method(method)
    if side not in ("output", "input"):
        raise NoraError(f"unknown init side {side!r}; expected output or input")
    if not sigma > 0:
        raise NoraError(f"init sigma must be positive, got {sigma}")
    rewritten_by = getattr(model, _REWRITTEN_BY, None)
    if rewritten_by is not None:
        raise NoraError(f"the base weights were already rewritten by init {rewritten_by!r}; "
                        "initialize a freshly loaded model")
    layers = lora_layers(model, adapter_name)
    if not layers:
        raise NoraError(f"no LoRA layers with adapter {adapter_name!r}; wrap the model with get_peft_model first")
    config = getattr(model, "peft_config", {}).get(adapter_name)
    preset = getattr(config, "init_lora_weights", True)
    if preset not in (True, False, "gaussian"):
        raise NoraError(f"the LoraConfig already applied init_lora_weights={preset!r}; "
                        "build it with init_lora_weights=True and let nora initialize")
    opts = InitOptions(name=method, sigma=float(sigma), side=side, seed=int(seed))
    for name, layer in layers:  # check every layer first, so an error leaves the model untouched
        _check(entry, layer, name, method)
    _apply_all(entry, layers, adapter_name, opts)
    if entry.modifies_base:
        setattr(model, _REWRITTEN_BY, method)
    return InitResult(opts, entry.modifies_base)


def _apply_all(entry: InitMethod, layers: list[tuple[str, LoraLayer]], adapter: str, opts: InitOptions) -> None:
    """Nyström layers are independent and each one's sketch is seeded by its name, so on CPU they run as
    single-threaded tasks spread over torch's intra-op threads: the small matmuls and the serial Gaussian
    draws then use every core, and no thread spins at an OpenMP barrier when the machine is busy."""
    import torch

    workers = torch.get_num_threads()
    if entry.apply is not _nystrom or workers < 2 or len(layers) < 2 or not all(map(_plain_cpu, layers)):
        with torch.no_grad():
            for name, layer in layers:
                entry.apply(layer, name, adapter, opts)
        return

    def one(item: tuple[str, LoraLayer]) -> None:
        with torch.no_grad():  # grad mode is per thread
            entry.apply(item[1], item[0], adapter, opts)

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, layers))
    finally:
        torch.set_num_threads(workers)


def _plain_cpu(item: tuple[str, LoraLayer]) -> bool:
    """A plain float CPU weight (no quantized or otherwise subclassed tensor)."""
    import torch

    weight = item[1].get_base_layer().weight
    return type(weight) in (torch.nn.Parameter, torch.Tensor) and weight.device.type == "cpu" and weight.is_floating_point()


def save_initial_adapter(model: nn.Module, directory: str | Path, *, adapter_name: str = "default",
                         is_main_process: bool = True) -> Path:
    """Save the adapter right after init, for `save_pretrained(path_initial_model_for_weight_conversion=…)`.

    PEFT requires the saved config to say init_lora_weights=True, or loading it would re-run PiSSA
    on the residual base. Export then stores ΔW = B·A − B0·A0 as a rank-2r LoRA on the ORIGINAL base.
    """
    config = model.peft_config[adapter_name]
    preset, config.init_lora_weights = config.init_lora_weights, True
    try:
        model.save_pretrained(str(directory), selected_adapters=[adapter_name], is_main_process=is_main_process)
    finally:
        config.init_lora_weights = preset
    return Path(directory) if adapter_name == "default" else Path(directory) / adapter_name
