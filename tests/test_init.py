"""Adapter initializations (nora_cli.lora): one class per init method, plus layer types and real models.

Expected values are recomputed here from the documented recipe (sha256 seed → CPU N(0,1) sketch), not
through nora_cli.lora's helpers, so a change to the recipe or to which tensor gets written fails.
"""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from nora_cli.errors import NoraError
from nora_cli.lora import (
    INITS,
    base_preserving_inits,
    initialize,
    lora_layers,
    modifies_base,
    save_initial_adapter,
)

IN, OUT, K, R, ALPHA = 16, 24, 2, 4, 8


def omega(seed: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def scaling(r: int = R, alpha: float = ALPHA, rslora: bool = False) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


class TwoLinear(nn.Module):
    """a: 16→24 with W0 = U·S·Vᵀ of rank K < R (col space U, row space V); b: 24→12 full rank."""

    def __init__(self, reverse: bool = False) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        layers = {"a": nn.Linear(IN, OUT), "b": nn.Linear(OUT, 12)}
        for key in (["b", "a"] if reverse else ["a", "b"]):  # registration order must not matter
            setattr(self, key, layers[key])
        self.u = torch.linalg.qr(torch.randn(OUT, K, generator=gen)).Q
        self.v = torch.linalg.qr(torch.randn(IN, K, generator=gen)).Q
        with torch.no_grad():
            self.a.weight.copy_(self.u @ torch.diag(torch.tensor([3.0, 0.5])) @ self.v.T)
            self.a.bias.copy_(torch.randn(OUT, generator=gen))
            self.b.weight.copy_(torch.randn(12, OUT, generator=gen) / 5)
            self.b.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def peft_two_linear(rslora: bool = False, reverse: bool = False, **kwargs) -> PeftModel:
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["a", "b"], use_rslora=rslora, **kwargs)
    return get_peft_model(TwoLinear(reverse), config)


def layer(model: nn.Module, name: str):
    return dict(lora_layers(model))[name]


def same_sketch(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-6) -> bool:
    """Equal up to summation order: nora multiplies through oneDNN on CPU, the references use torch.matmul."""
    diff = (actual.float() - expected.float()).norm() / expected.float().norm()
    return actual.shape == expected.shape and actual.dtype == expected.dtype and bool(diff < tol)


def factors(model: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    lyr = layer(model, name)
    return lyr.lora_A["default"].weight.detach(), lyr.lora_B["default"].weight.detach()


X = torch.randn(5, IN, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------


class TestNystromOutput:
    @pytest.mark.parametrize("rslora", [False, True])
    def test_sketch_in_column_space_and_reaches_optimizer(self, rslora: bool) -> None:
        model = peft_two_linear(rslora=rslora)
        base = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
        opt_before = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        y_before = model(X)
        seen = torch.get_rng_state()
        result = initialize(model, "nystrom", sigma=0.3, seed=7)
        assert torch.equal(torch.get_rng_state(), seen)  # the global RNG is neither used nor moved
        opt_after = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

        a0, b0 = factors(model, "a")
        assert torch.count_nonzero(a0) == 0
        u = model.get_base_model().u
        residual = torch.linalg.norm(b0 - u @ (u.T @ b0)) / torch.linalg.norm(b0)
        assert residual < 1e-5 and torch.linalg.norm(b0) > 0
        # The outputs are bit-identical and the base weights untouched.
        assert torch.equal(model(X), y_before)
        after = model.get_base_model().state_dict()
        assert all(torch.equal(after[k], v) for k, v in base.items())

        coef = 0.3 / scaling(rslora=rslora)
        expected = {name: (base[f"{name}.base_layer.weight"] @ omega(7, name, (w, R))) * coef
                    for name, w in (("a", IN), ("b", OUT))}
        names = {id(p): n for n, p in model.named_parameters()}
        for opt in (opt_before, opt_after):
            params = {names[id(p)]: p for p in opt.param_groups[0]["params"]}
            for name, b_expected in expected.items():
                key = f"base_model.model.{name}.lora_B.default.weight"
                assert same_sketch(params[key].detach(), b_expected)
                assert torch.count_nonzero(params[key.replace("lora_B", "lora_A")]) == 0
        assert asdict(result.options) == {"name": "nystrom", "sigma": 0.3, "side": "output", "seed": 7}
        assert result.modifies_base is False and not modifies_base("nystrom")

    def test_first_step_moves_only_inside_the_sketch(self) -> None:
        """With A0 = 0, ∂L/∂A = s·B0ᵀ·G is nonzero and ∂L/∂B = 0: training starts from the sketch."""
        model = peft_two_linear()
        initialize(model, "nystrom")
        model(X).square().sum().backward()
        lyr = layer(model, "a")
        assert torch.count_nonzero(lyr.lora_B["default"].weight.grad) == 0
        assert torch.linalg.norm(lyr.lora_A["default"].weight.grad) > 0

    def test_lora_dtype_is_kept(self) -> None:
        config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["a"])
        model = get_peft_model(TwoLinear().to(torch.bfloat16), config, autocast_adapter_dtype=False)
        initialize(model, "nystrom")
        a0, b0 = factors(model, "a")
        w0 = model.get_base_model().a.base_layer.weight.float()
        assert b0.dtype == a0.dtype == torch.bfloat16
        assert same_sketch(b0, ((w0 @ omega(0, "a", (IN, R))) * (0.1 / scaling())).to(torch.bfloat16), 4e-3)


class TestNystromInput:
    def test_sketch_in_row_space(self) -> None:
        model = peft_two_linear()
        w0 = model.get_base_model().a.base_layer.weight.detach().clone()
        y_before = model(X)
        initialize(model, "nystrom", side="input", seed=3)
        a0, b0 = factors(model, "a")
        v = model.get_base_model().v
        assert torch.count_nonzero(b0) == 0
        assert torch.linalg.norm(a0 - (a0 @ v) @ v.T) / torch.linalg.norm(a0) < 1e-5
        assert same_sketch(a0, (omega(3, "a", (R, OUT)) @ w0) * (0.1 / scaling()))
        assert torch.equal(model(X), y_before)
        assert torch.equal(model.get_base_model().a.base_layer.weight, w0)


class TestDeterminism:
    SCRIPT = (
        "import sys, torch; from safetensors.torch import save_file; sys.path.insert(0, sys.argv[1]);"
        "import test_init as t; from nora_cli.lora import initialize\n"
        "for seed in map(int, sys.argv[4].split(',')):\n"
        "    for method in ('nystrom', 'lora'):\n"
        "        m = t.peft_two_linear(reverse=sys.argv[3] == 'rev'); torch.manual_seed(int(sys.argv[2]))\n"
        "        initialize(m, method, seed=seed)\n"
        "        save_file({k: v.contiguous() for k, v in m.state_dict().items() if 'lora_' in k},"
        " f'{sys.argv[5]}/{method}-{seed}.safetensors')\n"
    )

    def test_fresh_processes_agree(self, tmp_path: Path) -> None:
        """Two processes with different global RNG state and module order = two DDP ranks."""
        here = str(Path(__file__).parent)
        runs = [("1", "fwd", "0", tmp_path / "p1"), ("2", "rev", "0,1", tmp_path / "p2")]
        procs = []
        for global_seed, order, seeds, out in runs:
            out.mkdir()
            cmd = [sys.executable, "-c", self.SCRIPT, here, global_seed, order, seeds, str(out)]
            procs.append(subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True))
        for proc in procs:
            assert proc.wait(timeout=120) == 0, proc.stderr.read()
        for method in ("nystrom", "lora"):
            one = load_file(tmp_path / "p1" / f"{method}-0.safetensors")
            two = load_file(tmp_path / "p2" / f"{method}-0.safetensors")
            other = load_file(tmp_path / "p2" / f"{method}-1.safetensors")
            assert one.keys() == two.keys() and len(one) == 4
            assert all(torch.equal(one[k], two[k]) for k in one)
            changed = [k for k in one if not torch.equal(one[k], other[k])]
            assert changed == [k for k in one if (".lora_B." if method == "nystrom" else ".lora_A.") in k]


def tiny_gpt2() -> PeftModel:
    """GPT-2 projections are transformers Conv1D layers: weight stored in × out."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
                        eos_token_id=0)
    lora = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["c_attn", "c_proj", "c_fc"])
    return get_peft_model(GPT2LMHeadModel(config).eval(), lora)


IDS = torch.tensor([[1, 5, 9, 3]])


class TestLayerTypes:
    @pytest.mark.parametrize("side", ["output", "input"])
    def test_gpt2_conv1d(self, side: str) -> None:
        model = tiny_gpt2()
        ids = IDS
        logits = model(ids).logits
        initialize(model, "nystrom", side=side, seed=5)
        names = [name for name, _ in lora_layers(model)]
        assert names == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                         "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
        for name in names:
            lyr = layer(model, name)
            w0 = lyr.get_base_layer().weight.detach().T  # Conv1D stores in × out
            a0, b0 = factors(model, name)
            if side == "output":
                assert b0.shape == (w0.shape[0], R) and torch.count_nonzero(a0) == 0
                assert same_sketch(b0, (w0 @ omega(5, name, (w0.shape[1], R))) * (0.1 / scaling()))
            else:
                assert a0.shape == (R, w0.shape[1]) and torch.count_nonzero(b0) == 0
                assert same_sketch(a0, (omega(5, name, (R, w0.shape[0])) @ w0) * (0.1 / scaling()))
        assert torch.equal(model(ids).logits, logits)

    @pytest.mark.parametrize("side", ["output", "input"])
    def test_conv2d(self, side: str) -> None:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        model = get_peft_model(net, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0"]))
        x = torch.randn(2, 3, 6, 6)
        y_before = model(x)
        initialize(model, "nystrom", side=side)
        lyr = layer(model, "0")
        w0 = lyr.get_base_layer().weight.detach()
        a0, b0 = factors(model, "0")
        assert a0.shape == (R, 3, 3, 3) and b0.shape == (8, R, 1, 1)
        coef = 0.1 / scaling()
        if side == "output":
            assert torch.count_nonzero(a0) == 0
            assert same_sketch(b0, ((w0.flatten(1) @ omega(0, "0", (27, R))) * coef).reshape(8, R, 1, 1))
        else:
            om = omega(0, "0", (R, 8))
            assert torch.count_nonzero(b0) == 0
            assert same_sketch(a0, ((om @ w0.flatten(1)) * coef).reshape(R, 3, 3, 3))
            # The flattening order matches conv semantics: lora_A(x) = (σ/s)·Ω·conv(x, W0).
            via_base = torch.einsum("ro,bohw->brhw", om, F.conv2d(x, w0, padding=1)) * coef
            torch.testing.assert_close(lyr.lora_A["default"](x), via_base, atol=1e-5, rtol=1e-5)
        assert torch.equal(model(x), y_before)

    def test_unsupported_layers_name_type_and_module(self) -> None:
        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.emb, self.proj = nn.Embedding(10, 16), nn.Linear(16, 16)
                self.grouped = nn.Conv2d(4, 4, 3, groups=2)

        model = get_peft_model(Net(), LoraConfig(r=R, target_modules=["emb", "proj"]))
        b_before = factors(model, "proj")[1].clone()
        with pytest.raises(NoraError, match=r"does not support Embedding layers \(module 'emb'\)"):
            initialize(model, "nystrom")
        assert torch.equal(factors(model, "proj")[1], b_before)  # checked before anything was written
        grouped = get_peft_model(Net(), LoraConfig(r=R, target_modules=["grouped"]))
        with pytest.raises(NoraError, match=r"Conv2d \(groups=2\).*'grouped'"):
            initialize(grouped, "nystrom")

    def test_bad_arguments(self) -> None:
        model = peft_two_linear()
        with pytest.raises(NoraError, match="valid: lora, gaussian, pissa, olora, nystrom, pissa_niter_K"):
            initialize(model, "svd")
        with pytest.raises(NoraError, match="side"):
            initialize(model, "nystrom", side="left")
        with pytest.raises(NoraError, match="sigma"):
            initialize(model, "nystrom", sigma=0.0)
        with pytest.raises(NoraError, match="no LoRA layers with adapter 'other'"):
            initialize(model, "nystrom", adapter_name="other")
        preset = get_peft_model(TwoLinear(), LoraConfig(r=R, target_modules=["a"], init_lora_weights="olora"))
        with pytest.raises(NoraError, match="already applied init_lora_weights='olora'"):
            initialize(preset, "nystrom")


# ---------------------------------------------------------------------------------------------------


class TestPeftRandomInits:
    @pytest.mark.parametrize("method, peft_name", [("lora", True), ("gaussian", "gaussian")])
    def test_delegates_to_peft_with_per_module_seed(self, method: str, peft_name: bool | str) -> None:
        model, reference = peft_two_linear(), peft_two_linear()
        base = model.get_base_model().a.base_layer.weight.clone()
        before = factors(model, "a")[0].clone()
        result = initialize(model, method, seed=4)
        for name, lyr in lora_layers(reference):
            with torch.random.fork_rng(devices=[]):
                digest = hashlib.sha256(f"4:{name}".encode()).digest()
                torch.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
                lyr.reset_lora_parameters("default", peft_name)
            a0, b0 = factors(model, name)
            assert torch.equal(a0, lyr.lora_A["default"].weight) and torch.count_nonzero(b0) == 0
        assert not torch.equal(factors(model, "a")[0], before)
        assert torch.equal(model.get_base_model().a.base_layer.weight, base)
        assert result.modifies_base is False
        if method == "lora":  # Kaiming-uniform(a=√5) bound is 1/sqrt(fan_in)
            assert factors(model, "a")[0].abs().max() <= 1 / math.sqrt(IN)


class TestPissaOlora:
    @pytest.mark.parametrize("method", ["pissa", "pissa_niter_4", "olora"])
    def test_residual_plus_adapter_is_original(self, method: str) -> None:
        model = peft_two_linear()
        w0 = model.get_base_model().b.base_layer.weight.detach().clone()
        params = [id(p) for p in model.parameters()]
        y_before = model(X)
        result = initialize(model, method)
        a0, b0 = factors(model, "b")
        w_res = model.get_base_model().b.base_layer.weight.detach()
        assert not torch.equal(w_res, w0)
        torch.testing.assert_close(w_res + scaling() * b0 @ a0, w0, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(X), y_before, atol=1e-5, rtol=0)
        assert [id(p) for p in model.parameters()] == params  # same Parameter objects: optimizers see it
        assert a0.dtype == b0.dtype == torch.float32
        assert result.modifies_base is True and modifies_base(method)
        if method == "pissa":  # s·B·A is the best rank-R approximation of W0
            u, s, vh = torch.linalg.svd(w0)
            torch.testing.assert_close(scaling() * b0 @ a0, u[:, :R] * s[:R] @ vh[:R], atol=1e-5, rtol=0)
        if method == "olora":  # B holds the first R columns of W0's QR basis
            torch.testing.assert_close(b0.T @ b0, torch.eye(R), atol=1e-5, rtol=0)

    def test_export_converts_to_plain_lora_on_original_base(self, tmp_path: Path) -> None:
        model = peft_two_linear()
        initialize(model, "pissa")
        init_dir = save_initial_adapter(model, tmp_path / "init")
        with torch.no_grad():  # stand-in for training
            gen = torch.Generator().manual_seed(9)
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
        y_trained = model(X)
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(init_dir))
        assert model.peft_config["default"].init_lora_weights is True
        loaded = PeftModel.from_pretrained(TwoLinear(), tmp_path / "out")
        assert loaded.peft_config["default"].r == 2 * R
        torch.testing.assert_close(loaded(X), y_trained, atol=1e-5, rtol=0)

    def test_pissa_on_gpt2_conv1d(self) -> None:
        model = tiny_gpt2()
        w0 = {name: lyr.get_base_layer().weight.detach().clone() for name, lyr in lora_layers(model)}
        logits = model(IDS).logits
        initialize(model, "pissa")
        for name, lyr in lora_layers(model):
            a0, b0 = factors(model, name)
            w_res = lyr.get_base_layer().weight.detach().T  # in × out storage
            assert not torch.equal(w_res.T, w0[name])
            torch.testing.assert_close(w_res + scaling() * b0 @ a0, w0[name].T, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(IDS).logits, logits, atol=1e-5, rtol=0)
        with pytest.raises(NoraError, match="already rewritten by init 'pissa'"):
            initialize(model, "pissa")  # would subtract the top singular directions twice

    def test_registry_and_unsupported(self) -> None:
        assert set(INITS) == {"lora", "gaussian", "pissa", "olora", "nystrom"}
        from nora_cli.tasks.dreambooth.job import SUPPORTED_INITS

        # PiSSA/OLoRA rewrite W0; DreamBooth (a plain diffusers LoRA) takes only the others
        assert base_preserving_inits() == ("lora", "gaussian", "nystrom")
        assert base_preserving_inits() == SUPPORTED_INITS
        net = nn.Sequential(nn.Conv2d(3, 8, 3))
        model = get_peft_model(net, LoraConfig(r=R, target_modules=["0"]))
        with pytest.raises(NoraError, match=r"init 'olora' does not support Conv2d layers \(module '0'\)"):
            initialize(model, "olora")


# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def avx512_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make bitsandbytes believe this CPU has AVX512-BF16 (Linear4bit reads it at construction): there its
    eval-mode, no-grad forward repacks the 4-bit weight into a CPU inference layout. This AMD CPU lacks it."""
    monkeypatch.setattr("bitsandbytes.nn.modules.has_avx512bf16", lambda: True)


def _validation_forward(model: nn.Module) -> None:
    """What `nora train`'s validation does: eval mode, no grad."""
    model.eval()
    with torch.no_grad():
        model(torch.tensor([[3, 1, 4, 1, 5, 9]]))
    model.train()


@pytest.mark.slow
@pytest.mark.usefixtures("avx512_bf16")
class TestQuantizedBase:
    TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    #: ‖B0 − B0(fp32 W0)‖/‖B0(fp32 W0)‖ that quantizing W0 alone explains (measured: NF4 0.086-0.100,
    #: int8 0.005-0.007); a scrambled W0 gives ~1.4
    QUANT_ERROR = {"4bit": 0.13, "8bit": 0.01}

    @pytest.mark.parametrize("quantization", ["4bit", "8bit"])
    def test_sketch_matches_the_fp32_weights(self, tiny_llama_dir: Path, quantization: str) -> None:
        from nora_cli.models import keep_trainable_4bit_layout, load_causal_lm

        base, _ = load_causal_lm(str(tiny_llama_dir), quantization=quantization)  # conftest fixture
        assert keep_trainable_4bit_layout(base) == (14 if quantization == "4bit" else 0)  # as nora train does
        model = get_peft_model(base, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=self.TARGETS))
        _validation_forward(model)  # a forward first: the init must still see the real W0
        ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
        logits = model(ids).logits
        initialize(model, "nystrom")
        fp32 = load_file(str(tiny_llama_dir / "model.safetensors"))  # the unquantized checkpoint: independent
        layers = lora_layers(model)
        assert len(layers) == 14
        for name, lyr in layers:
            assert type(lyr.get_base_layer().weight).__name__ == ("Params4bit" if quantization == "4bit"
                                                                  else "Int8Params")
            w0 = fp32[f"{name}.weight"]
            a0, b0 = factors(model, name)
            expected = (w0 @ omega(0, name, (w0.shape[1], R))) * (0.1 / scaling())
            assert torch.count_nonzero(a0) == 0
            assert ((b0 - expected).norm() / expected.norm()).item() < self.QUANT_ERROR[quantization], name
        assert torch.equal(model(ids).logits, logits)
        with pytest.raises(NoraError, match="needs a float base weight"):
            initialize(model, "pissa")

    def test_repacked_4bit_weights_are_refused(self, tiny_llama_dir: Path) -> None:
        from nora_cli.models import load_causal_lm

        base, _ = load_causal_lm(str(tiny_llama_dir), quantization="4bit")
        model = get_peft_model(base, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj"]))
        _validation_forward(model)  # bnb repacks here (no keep_trainable_4bit_layout)
        b0 = [lyr.lora_B["default"].weight.detach().clone() for _, lyr in lora_layers(model)]
        with pytest.raises(NoraError, match="repacked by bitsandbytes into its CPU inference layout"):
            initialize(model, "nystrom")
        after = [lyr.lora_B["default"].weight for _, lyr in lora_layers(model)]
        assert all(map(torch.equal, b0, after))  # refused before touching any layer


@pytest.mark.slow
class TestSmolLM2:
    def test_real_weights(self) -> None:
        from nora_cli.models import load_causal_lm

        base, tokenizer = load_causal_lm("smollm2-135m")
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets)).eval()
        ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits
        start = time.perf_counter()
        initialize(model, "nystrom", seed=11)
        print(f"\nnystrom init of {len(lora_layers(model))} SmolLM2 layers: {time.perf_counter() - start:.3f}s")
        assert len(lora_layers(model)) == 30 * 7
        for name in ["model.layers.0.self_attn.q_proj", "model.layers.14.mlp.down_proj",
                     "model.layers.29.self_attn.v_proj"]:
            w0 = layer(model, name).get_base_layer().weight.detach()
            a0, b0 = factors(model, name)
            assert torch.count_nonzero(a0) == 0
            assert same_sketch(b0, (w0 @ omega(11, name, (w0.shape[1], 8))) * (0.1 / scaling(8, 16)))
        with torch.no_grad():
            assert torch.equal(model(ids).logits, logits)
