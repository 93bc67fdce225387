"""`nora factorize`: the paper's matrix-factorization facts, checked on the CLI's JSON output.

Each preset runs once per session (module fixture) through the real CLI. Relative errors are
e_t / ‖A‖_F; "floor" is float64 round-off (~2e-16 relative), so quadratic-rate checks only use
steps that land above 1e-13.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from nora_cli.cli import app

runner = CliRunner()


def _strict(text: str) -> dict:
    """Parse exactly one JSON object, rejecting NaN/Infinity (divergence must come out as null)."""

    def bad(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=bad)


def _json(*args: str) -> dict:
    result = runner.invoke(app, ["factorize", *args, "--json"])
    assert result.exit_code == 0, result.output
    return _strict(result.stdout)  # the whole of stdout must be the one object


@pytest.fixture(scope="module")
def preset():
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = _json("--preset", name)
        return cache[name]

    return get


def _rel(out: dict, label: str, key: str = "errors") -> list[float]:
    run = next(r for r in out["runs"] if r["label"] == label)
    assert len(run[key]) == len(out["runs"][0]["errors"])
    return [e / out["norm_A"] if key == "errors" else e for e in run[key]]


def _hit(rel: list[float], eps: float = 1e-10) -> int | None:
    return next((t for t, e in enumerate(rel) if e < eps), None)


def _assert_quadratic(rel: list[float]) -> int:
    """The last two steps into e < 1e-10 (above the floor) satisfy e_{t+1} <= 50·e_t², log-ratio >= 1.5."""
    t_star = _hit(rel)
    assert t_star is not None
    steps = [k for k in range(t_star) if rel[k + 1] > 1e-13][-2:]
    assert len(steps) == 2, rel[: t_star + 1]
    for k in steps:
        assert rel[k + 1] <= 50 * rel[k] ** 2, (k, rel[k], rel[k + 1])
        assert math.log(rel[k + 1]) / math.log(rel[k]) >= 1.5, (k, rel[k], rel[k + 1])
    return t_star


def _assert_linear(rel: list[float], start: int, stop: int, lo: float, hi: float) -> None:
    """e_{t+1}/e_t stays in [lo, hi] over [start, stop): a constant contraction, not a squaring."""
    ratios = [rel[k + 1] / rel[k] for k in range(start, stop)]
    assert all(lo <= q <= hi for q in ratios), ratios
    assert max(ratios) / min(ratios) < 1.3, ratios


def test_thm3_one_step_asymmetric(preset):
    out = preset("thm3")
    assert out["problem"] == "asymmetric" and out["rank"] == out["rank_A"] == 20
    (run,) = out["runs"]
    assert (run["algorithm"], run["init"], run["lr"]) == ("scaledgd", "nystrom", 1.0)
    e0, e1 = run["errors"]
    assert e0 == pytest.approx(out["norm_A"], rel=1e-12)  # Y0 = 0
    assert e1 / out["norm_A"] < 1e-10


def test_thm4_weak_optimality_in_one_step(preset):
    out = preset("thm4")
    (run,) = out["runs"]
    assert out["rank"] < out["rank_A"]
    assert run["weak_errors"][0] == pytest.approx(math.sqrt(out["rank"]))  # Y0 = 0: ‖−I_r‖_F
    assert run["weak_errors"][1] < 1e-10
    assert run["errors"][1] > 1.05 * out["min_error"]  # weakly, not globally, optimal


def test_fig1a_nystrom_quadratic_others_linear(preset):
    out = preset("fig1a")
    assert (out["m"], out["rank"], out["rank_A"]) == (1000, 20, 20)
    nys, small, gd = _rel(out, "ScaledGD (Nyström)"), _rel(out, "ScaledGD (small)"), _rel(out, "GD (small)")
    t_star = _assert_quadratic(nys)
    assert t_star <= 15
    # At that iteration count small-init ScaledGD and GD are far from 1e-10 and contracting linearly.
    assert small[t_star] > 1e-6 and gd[t_star] > 0.5
    _assert_linear(small, t_star, t_star + 10, 0.4, 0.6)
    _assert_linear(gd, t_star - 5, t_star + 5, 0.99, 1.0)
    assert _hit(small) >= t_star + 10 and _hit(gd) is None
    nys_abs = next(r["errors"] for r in out["runs"] if r["label"] == "ScaledGD (Nyström)")
    assert min(nys_abs) < 1e-10 and min(nys) < 1e-14  # absolute target, then the float64 floor


def test_fig1b_any_xi_is_quadratic_perturbed_is_linear(preset):
    out = preset("fig1b")
    for xi in ("0.1", "1", "10"):
        clean, noisy = _rel(out, f"Nyström ξ={xi}"), _rel(out, f"perturbed ξ={xi}")
        t_star = _assert_quadratic(clean)
        assert t_star <= 15
        assert clean[:3] == pytest.approx(noisy[:3], rel=1e-3)  # the noise is invisible at first...
        assert noisy[t_star] > 1e-9 and _hit(noisy) >= t_star + 5  # ...but the squaring phase is gone
        band = [k for k in range(len(noisy)) if 1e-12 < noisy[k] < 1e-8]
        assert len(band) >= 8 and len([e for e in clean if 1e-12 < e < 1e-8]) <= 1
        _assert_linear(noisy, band[0], band[-1], 0.4, 0.6)  # residual space shrinks by 1 − η per step


def test_fig1c_under_parametrized_weak_optimality(preset):
    out = preset("fig1c")
    assert (out["rank"], out["rank_A"]) == (20, 40)
    weak = _rel(out, "η=0.5", "weak_errors")
    assert weak[0] > 10 and weak[-1] < 1e-3
    assert all(b < a for a, b in zip(weak[50:], weak[51:], strict=False))  # still decreasing
    final = out["runs"][0]["errors"][-1]
    assert out["min_error"] <= final < 1.005 * out["min_error"]  # ≈ the Eckart-Young optimum
    assert _rel(out, "η=0.01", "weak_errors")[-1] > weak[-1]  # smaller steps are slower
    assert all("weak_errors" in r for r in out["runs"])


def test_fig4_over_parametrized_pinv_quadratic(preset):
    out = preset("fig4")
    assert (out["rank"], out["rank_A"]) == (60, 20)
    t_star = _assert_quadratic(_rel(out, "ScaledGD (Nyström)"))
    assert _rel(out, "ScaledGD-(λ=0.01) (small)")[-1] > 1e-6
    assert _rel(out, "GD (small)")[-1] > 0.5
    noisy = _rel(out, "ScaledGD (perturbed Nyström)")
    assert noisy[t_star] > 1e-4 and _hit(noisy) >= t_star + 5
    assert "weak_errors" not in out["runs"][0]


def test_custom_asymmetric_over_parametrized_one_step():
    """App. C.3: r > r_A asymmetric, η = 1, pinv in (6b): one step still gives X1Y1ᵀ = A."""
    out = _json("--problem", "asymmetric", "--m", "60", "--n", "40", "--rank", "5", "--spectrum", "1,0.5,0.1",
                "--lr", "1", "--iters", "1", "--seed", "3")
    assert (out["m"], out["n"], out["rank"], out["rank_A"]) == (60, 40, 5, 3)
    assert out["runs"][0]["errors"][1] / out["norm_A"] < 1e-12


def test_divergence_is_null_and_json_stays_valid():
    out = _json("--m", "50", "--spectrum", "1,0.5", "--algorithm", "gd", "--xi", "10", "--lr", "2", "--iters", "8")
    errors = out["runs"][0]["errors"]
    assert len(errors) == 9 and errors[0] is not None and errors[-1] is None


def test_float32_runs_and_stops_at_its_floor():
    out = _json("--m", "200", "--spectrum", "fig1a", "--iters", "30", "--dtype", "float32")
    final = out["runs"][0]["errors"][-1] / out["norm_A"]
    assert 1e-10 < final < 1e-5


def test_table_and_plot(tmp_path):
    png = tmp_path / "sub" / "thm3.png"
    result = runner.invoke(app, ["factorize", "--preset", "thm3", "--plot", str(png)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if "ScaledGD (Nyström), η=1" in line)
    assert row.split()[-5:-2] == ["scaledgd", "nystrom", "1"] and row.split()[-1] == "1"  # hit 1e-10 at t=1
    assert f"wrote {png}" in result.stdout
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_json_with_plot_prints_only_json(tmp_path):
    png = tmp_path / "fig.png"
    out = _json("--m", "40", "--spectrum", "1,0.5,0.25", "--rank", "2", "--iters", "3", "--plot", str(png))
    assert len(out["runs"][0]["weak_errors"]) == 4  # r < r_A: second panel
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, match",
    [
        (["--algorithm", "adam"], "unknown algorithm 'adam'"),
        (["--init", "zeros"], "unknown init"),
        (["--lr", "-1"], "--lr must be"),
        (["--lr", "abc"], "--lr 'abc'"),
        (["--iters", "2.5"], "--iters '2.5'"),
        (["--spectrum", "1,-2"], "--spectrum"),
        (["--preset", "fig9"], "unknown preset"),
        (["--preset", "fig1a", "--lr", "0.1"], "cannot be combined with --preset"),
        (["--problem", "symmetric", "--n", "5"], "symmetric problem is m×m"),
        (["--m", "10", "--rank", "20"], "must not exceed"),
        (["--dtype", "float16"], "unknown dtype"),
        (["--preset", "thm3", "--seed", "-1"], "--seed must be >= 0"),
        (["--init", "nystrom-perturbed", "--xi-noise", "0"], "--xi-noise"),
        (["--plot", "out.jpg"], "must end in .png"),
    ],
)
def test_bad_values_raise_nora_error(args, match):
    result = runner.invoke(app, ["factorize", *args])
    assert result.exit_code == 2 and result.stderr.startswith("error: "), result.output
    assert match in result.stderr


def test_bad_flag_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "nora_cli", "factorize", "--lr", "abc", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == "error: --lr 'abc': expected a number", proc.stderr


def test_fig1a_axis_labels_render_F_as_a_subscript(preset):
    """Every label is mathtext whose rendering has no '_' glyph and draws F smaller than A (a subscript)."""
    from matplotlib.mathtext import MathTextParser

    from nora_cli.lab.plot import plot_figure

    fig = plot_figure(preset("fig1a"))
    labels = [ax.get_ylabel() for ax in fig.axes] + [fig._suptitle.get_text()]
    assert len(labels) == 2 and "_F" in labels[0]
    for label in labels:
        assert all("_" not in plain for plain in label.split("$")[0::2]), label  # outside $…$ '_' shows as is
        for part in label.split("$")[1::2]:  # the mathtext pieces
            glyphs = MathTextParser("path").parse(f"${part}$", dpi=72).glyphs
            chars = {chr(g[2]) if isinstance(g[2], int) else g[2]: g[1] for g in glyphs}
            assert "_" not in chars, label
            if "F" in chars:
                assert chars["F"] < chars["A"], label
