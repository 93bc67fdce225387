"""Matrix-factorization lab: the paper's Secs. 2-3 (Thms 1-5, Figs. 1 and 4) on synthetic problems.

Problems (eqs. 1, 4): symmetric min ½‖XXᵀ − A‖²_F with A = Q diag(σ) Qᵀ PSD (m×m), asymmetric
min ½‖XYᵀ − A‖²_F with A = U diag(σ) Vᵀ (m×n). The factor width r against r_A = len(σ) decides
the regime: exact (r = r_A), under- (r < r_A) or over-parametrized (r > r_A).

Torch float64 by default: Thm 1's quadratic phase is only visible if the error can fall from 1e-4
to 1e-8 to 1e-14 in consecutive steps. Random draws come from numpy's seeded generators. Pure
functions, no printing. Other tools read the object `run_preset`/`run_experiment` return; keep it:

    {"problem", "m", "n", "rank", "rank_A", "seed", "norm_A", "min_error",
     "runs": [{"label", "algorithm", "init", "lr", "xi", "xi_noise", "damping",
               "errors": [e_0, ..., e_T], "weak_errors": [...]}]}   # weak_errors: r < r_A only

e_t = ‖X_tX_tᵀ − A‖_F (or ‖X_tY_tᵀ − A‖_F) after t iterations, e_0 at initialization; weak
errors are ‖XᵀA†X − I_r‖_F (or ‖YᵀA†X − I_r‖_F, Defs. 1-2). An entry is null (None) once the
iterates stop being finite (e.g. GD diverging) or a preconditioner is singular; lists always hold
iters + 1 entries. min_error = ‖A − A_r‖_F (Eckart-Young), 0 unless under-parametrized.

Size (~400 lines): problems, inits, steps and the figure presets stay in one file so each preset reads
next to the math it sets up; figures live in lab/plot.py.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from nora_cli.errors import NoraError

EPS = 1e-10  # "converged": e_t / ‖A‖_F below this
PROBLEMS = ("symmetric", "asymmetric")
ALGORITHMS = ("gd", "scaledgd", "scaledgd-damped")
DTYPES = {"float64": torch.float64, "float32": torch.float32}
THREADS = 1  # m=1000, r<=60 products gain nothing from threads; on a shared CPU they run ~10x slower
SMALL_XI = 1e-3  # small init: [X0]_ij ~ N(0, ξ²)
PERTURB_XI = 1e-6  # ξ_N of Figs. 1b/4b: small enough that early iterations match clean Nyström

# App. E.1: σ = 1.0, 0.99, ..., 0.82 then 0.01 (κ = 100) for Figs. 1(a,b) and 4; Fig. 1(c) has
# 1.0 ... 0.64, 0.05, 0.025, 0.01 so that r = 20 < r_A = 40 cannot fit A exactly.
SPECTRA: dict[str, list[float]] = {
    "fig1a": [round(1.0 - 0.01 * i, 2) for i in range(19)] + [0.01],
    "fig1c": [round(1.0 - 0.01 * i, 2) for i in range(37)] + [0.05, 0.025, 0.01],
}


@dataclass(frozen=True)
class Problem:
    """A with its factors (so A† products cost O(m·r_A·r)) and the factor width r."""

    kind: str
    A: torch.Tensor
    U: torch.Tensor  # m × r_A (Q when symmetric)
    V: torch.Tensor  # n × r_A (== U when symmetric)
    spectrum: torch.Tensor
    rank: int
    seed: int

    @property
    def rank_A(self) -> int:
        return len(self.spectrum)

    @property
    def norm_A(self) -> float:
        return float(torch.linalg.norm(self.A))

    @property
    def under(self) -> bool:
        return self.rank < self.rank_A

    @property
    def over(self) -> bool:
        return self.rank > self.rank_A


@dataclass(frozen=True)
class RunSpec:
    """One curve: an optimizer, an initialization and their knobs."""

    algorithm: str = "scaledgd"
    init: str = "nystrom"
    lr: float = 0.5
    xi: float = 1.0  # std of Ω (Nyström) or of X0's entries (small init)
    xi_noise: float | None = None  # std of N in X0 = AΩ + N (nystrom-perturbed)
    damping: float | None = None  # λ of ScaledGD-(λ)
    label: str = ""


@dataclass
class Run:
    spec: RunSpec
    errors: list[float | None]
    weak_errors: list[float | None] | None = None


@dataclass
class Experiment:
    """A preset or a command line: one problem, several runs, one iteration budget."""

    problem: Problem
    runs: list[RunSpec]
    iters: int


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Run with `n` torch threads, then restore the caller's setting (tests share the process)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def parse_spectrum(text: str) -> list[float]:
    """A name from SPECTRA or comma-separated positive values ("1,0.5,0.01")."""
    if text in SPECTRA:
        return list(SPECTRA[text])
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise NoraError(f"--spectrum {text!r}: give comma-separated numbers or one of {', '.join(SPECTRA)}") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise NoraError(f"--spectrum {text!r}: needs at least one value, all finite and > 0")
    return values


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.from_numpy(rng.standard_normal((rows, cols))))
    return q * torch.sign(torch.diagonal(r))  # sign fix makes Q Haar-distributed


def make_problem(
    kind: str = "symmetric",
    m: int = 1000,
    n: int | None = None,
    rank: int | None = None,
    spectrum: list[float] | None = None,
    seed: int = 0,
    dtype: str = "float64",
) -> Problem:
    """A = Q diag(σ) Qᵀ or U diag(σ) Vᵀ with random orthonormal factors; r defaults to r_A."""
    if kind not in PROBLEMS:
        raise NoraError(f"unknown problem {kind!r}; choose one of {', '.join(PROBLEMS)}")
    if dtype not in DTYPES:
        raise NoraError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if kind == "symmetric" and n not in (None, m):
        raise NoraError("a symmetric problem is m×m: drop --n or use --problem asymmetric")
    sigma = torch.tensor(spectrum if spectrum is not None else SPECTRA["fig1a"], dtype=torch.float64)
    n = m if n is None else n
    rank = len(sigma) if rank is None else rank
    if seed < 0:
        raise NoraError(f"--seed must be >= 0 (got {seed})")
    if min(m, n, rank) < 1:
        raise NoraError(f"m, n and rank must be >= 1 (got m={m}, n={n}, rank={rank})")
    if max(len(sigma), rank) > min(m, n):
        raise NoraError(f"rank {rank} and r_A = {len(sigma)} must not exceed min(m, n) = {min(m, n)}")
    rng = np.random.default_rng([seed, 0])
    with _threads(THREADS):
        U = _orthonormal(rng, m, len(sigma))
        V = U if kind == "symmetric" else _orthonormal(rng, n, len(sigma))
        A = (U * sigma) @ V.T
    dt = DTYPES[dtype]
    return Problem(kind, A.to(dt), U.to(dt), V.to(dt), sigma.to(dt), rank, seed)


# ---- initializations: name -> (X0, Y0), Y0 is X0 for symmetric problems ---------------------------

Factors = tuple[torch.Tensor, torch.Tensor]


def _gauss(rng: np.random.Generator, rows: int, cols: int, std: float, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(std * rng.standard_normal((rows, cols))).to(like.dtype)


def _init_small(p: Problem, rng: np.random.Generator, s: RunSpec) -> Factors:
    m, n = p.A.shape
    X = _gauss(rng, m, p.rank, s.xi, p.A)
    return X, (X if p.kind == "symmetric" else _gauss(rng, n, p.rank, s.xi, p.A))


def _init_nystrom(p: Problem, rng: np.random.Generator, s: RunSpec) -> Factors:
    """Eqs. 3/5: X0 = AΩ puts every column in col(A) (no residual space); asymmetric Y0 = 0."""
    m, n = p.A.shape
    X = p.A @ _gauss(rng, n, p.rank, s.xi, p.A)
    if s.init == "nystrom-perturbed":  # Figs. 1b/4b dotted lines: noise in the residual space
        X = X + _gauss(rng, m, p.rank, s.xi_noise, p.A)
    return X, (X if p.kind == "symmetric" else torch.zeros(n, p.rank, dtype=p.A.dtype))


INITS: dict[str, Callable[[Problem, np.random.Generator, RunSpec], Factors]] = {
    "small": _init_small,
    "nystrom": _init_nystrom,
    "nystrom-perturbed": _init_nystrom,
}


# ---- optimizers: each factor moves by -η·R·W(other factor), R = XYᵀ − A -------------------------


def _right_factor(Z: torch.Tensor, how: str, lam: float | None) -> torch.Tensor:
    """W = Z (GD), Z(ZᵀZ)⁻¹ (eqs. 2, 6), Z(ZᵀZ)† = pinv(Z)ᵀ (eq. 26) or Z(ZᵀZ + λI)⁻¹.

    The undamped inverses never form ZᵀZ, whose condition number is cond(Z)²: with X0 = AΩ the
    normal equations leave ‖X1Y1ᵀ − A‖/‖A‖ ~ 1e-10 after Thm 3's step instead of ~1e-13. The
    pseudo-inverse drops singular values below √eps·σ_max: inverting the rounding noise in Z's
    numerically-null directions destroys Thm 5's quadratic rate (Fig. 4a).
    """
    if how == "gd":
        return Z
    if how == "inverse":
        Q, T = torch.linalg.qr(Z)  # Z(ZᵀZ)⁻¹ = Q·T⁻ᵀ
        return torch.linalg.solve_triangular(T, Q.T, upper=True).T
    if how == "pinv":
        return torch.linalg.pinv(Z, rtol=math.sqrt(torch.finfo(Z.dtype).eps)).T
    return torch.linalg.solve(Z.T @ Z + lam * torch.eye(Z.shape[1], dtype=Z.dtype), Z.T).T


def _step(p: Problem, s: RunSpec, t: int, X: torch.Tensor, Y: torch.Tensor, R: torch.Tensor) -> Factors:
    """One iteration. GD's (XXᵀ − A)X is the gradient of ¼‖XXᵀ − A‖², so η means what it does in eq. 2."""
    how = {"gd": "gd", "scaledgd-damped": "damped"}.get(s.algorithm, "pinv" if p.over else "inverse")
    if p.kind == "symmetric":
        X = X - s.lr * (R @ _right_factor(X, how, s.damping))
        return X, X
    # Eq. 6: simultaneous updates; modified ScaledGD keeps X1 = X0 because (Y0ᵀY0)⁻¹ with Y0 = 0 is undefined.
    keep_x = s.algorithm == "scaledgd" and t == 0
    X_new = X if keep_x else X - s.lr * (R @ _right_factor(Y, how, s.damping))
    return X_new, Y - s.lr * (R.T @ _right_factor(X, how, s.damping))


def _weak_error(p: Problem, X: torch.Tensor, Y: torch.Tensor) -> float:
    """‖YᵀA†X − I_r‖_F with A† = V diag(1/σ) Uᵀ (Y = X when symmetric)."""
    M = (Y.T @ p.V / p.spectrum) @ (p.U.T @ X)
    return float(torch.linalg.norm(M - torch.eye(p.rank, dtype=M.dtype)))


def validate_spec(s: RunSpec) -> None:
    """Reject bad knobs with a message naming the flag to fix."""
    if s.algorithm not in ALGORITHMS:
        raise NoraError(f"unknown algorithm {s.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if s.init not in INITS:
        raise NoraError(f"unknown init {s.init!r}; choose one of {', '.join(INITS)}")
    for flag, value in (("--lr", s.lr), ("--xi", s.xi)):
        if not (math.isfinite(value) and value > 0):
            raise NoraError(f"{flag} must be a finite number > 0 (got {value})")
    if s.init == "nystrom-perturbed" and not (s.xi_noise and math.isfinite(s.xi_noise) and s.xi_noise > 0):
        raise NoraError("--init nystrom-perturbed needs --xi-noise > 0")
    if s.algorithm == "scaledgd-damped" and not (s.damping and math.isfinite(s.damping) and s.damping > 0):
        raise NoraError("--algorithm scaledgd-damped needs --damping > 0")


def run(problem: Problem, spec: RunSpec, iters: int) -> Run:
    """Iterate `iters` times from the spec's initialization, recording e_t (and weak errors if r < r_A)."""
    validate_spec(spec)
    if iters < 0:
        raise NoraError(f"--iters must be >= 0 (got {iters})")
    p = problem
    rng = np.random.default_rng([p.seed, 1])  # the same Ω for every run: clean vs perturbed is a fair pair
    X, Y = INITS[spec.init](p, rng, spec)
    errors: list[float | None] = []
    weak: list[float | None] | None = [] if p.under else None
    with _threads(THREADS), torch.no_grad():
        for t in range(iters + 1):
            R = X @ Y.T - p.A
            e = float(torch.linalg.norm(R))
            if not math.isfinite(e):
                break
            errors.append(e)
            if weak is not None:
                w = _weak_error(p, X, Y)
                weak.append(w if math.isfinite(w) else None)
            if t == iters:
                break
            try:
                X, Y = _step(p, spec, t, X, Y, R)
            except torch.linalg.LinAlgError:  # singular damped system: a breakdown, reported as nulls
                break
    errors += [None] * (iters + 1 - len(errors))
    if weak is not None:
        weak += [None] * (iters + 1 - len(weak))
    return Run(spec, errors, weak)


def iters_to_eps(errors: list[float | None], norm_A: float, eps: float = EPS) -> int | None:
    """First t with e_t / ‖A‖_F < eps, or None if never reached."""
    return next((t for t, e in enumerate(errors) if e is not None and e < eps * norm_A), None)


def default_label(s: RunSpec) -> str:
    name = {"gd": "GD", "scaledgd": "ScaledGD", "scaledgd-damped": f"ScaledGD-(λ={s.damping:g})"}
    init = {"small": "small", "nystrom": "Nyström", "nystrom-perturbed": "perturbed Nyström"}
    return f"{name[s.algorithm]} ({init[s.init]})"


def run_experiment(exp: Experiment) -> dict:
    """Run every curve of `exp`; returns the JSON object described in the module docstring."""
    p = exp.problem
    runs = []
    for spec in exp.runs:
        r = run(p, spec, exp.iters)
        entry = {
            "label": spec.label or default_label(spec),
            "algorithm": spec.algorithm,
            "init": spec.init,
            "lr": spec.lr,
            "xi": spec.xi,
            "xi_noise": spec.xi_noise if spec.init == "nystrom-perturbed" else None,
            "damping": spec.damping if spec.algorithm == "scaledgd-damped" else None,
            "errors": r.errors,
        }
        if r.weak_errors is not None:
            entry["weak_errors"] = r.weak_errors
        runs.append(entry)
    m, n = p.A.shape
    tail = p.spectrum[p.rank:].double()
    return {"problem": p.kind, "m": m, "n": n, "rank": p.rank, "rank_A": p.rank_A, "seed": p.seed,
            "norm_A": p.norm_A, "min_error": float(torch.linalg.norm(tail)), "runs": runs}


# ---- presets: App. E.1 setups, iteration counts sized for a few seconds on 2 CPU cores -----------


def _exact(seed: int, dtype: str, rank: int = 20) -> Problem:
    return make_problem("symmetric", 1000, rank=rank, spectrum=SPECTRA["fig1a"], seed=seed, dtype=dtype)


def _fig1a(seed: int, dtype: str) -> Experiment:
    runs = [RunSpec("gd", "small", 0.01, SMALL_XI, label="GD (small)"),
            RunSpec("scaledgd", "small", 0.5, SMALL_XI, label="ScaledGD (small)"),
            RunSpec("scaledgd", "nystrom", 0.5, 1.0, label="ScaledGD (Nyström)")]
    return Experiment(_exact(seed, dtype), runs, iters=60)


def _fig1b(seed: int, dtype: str) -> Experiment:
    runs = [RunSpec("scaledgd", "nystrom", 0.5, xi, label=f"Nyström ξ={xi:g}") for xi in (0.1, 1.0, 10.0)]
    runs += [RunSpec("scaledgd", "nystrom-perturbed", 0.5, xi, PERTURB_XI, label=f"perturbed ξ={xi:g}")
             for xi in (0.1, 1.0, 10.0)]
    return Experiment(_exact(seed, dtype), runs, iters=50)


def _fig1c(seed: int, dtype: str) -> Experiment:
    p = make_problem("symmetric", 1000, rank=20, spectrum=SPECTRA["fig1c"], seed=seed, dtype=dtype)
    return Experiment(p, [RunSpec("scaledgd", "nystrom", lr, 1.0, label=f"η={lr:g}") for lr in (0.5, 0.1, 0.01)],
                      iters=100)


def _fig4(seed: int, dtype: str) -> Experiment:
    runs = [RunSpec("gd", "small", 0.01, SMALL_XI, label="GD (small)"),
            RunSpec("scaledgd-damped", "small", 0.5, SMALL_XI, damping=0.01, label="ScaledGD-(λ=0.01) (small)"),
            RunSpec("scaledgd", "nystrom", 0.5, 1.0, label="ScaledGD (Nyström)"),
            RunSpec("scaledgd", "nystrom-perturbed", 0.5, 1.0, PERTURB_XI, label="ScaledGD (perturbed Nyström)")]
    return Experiment(_exact(seed, dtype, rank=60), runs, iters=60)


def _one_step(spectrum: str, seed: int, dtype: str) -> Experiment:
    """Thm 3 (r = r_A: X1Y1ᵀ = A) and Thm 4 (r < r_A: Y1ᵀA†X1 = I_r): η = 1, one step from Nyström."""
    p = make_problem("asymmetric", 1000, 800, rank=20, spectrum=SPECTRA[spectrum], seed=seed, dtype=dtype)
    return Experiment(p, [RunSpec("scaledgd", "nystrom", 1.0, 1.0, label="ScaledGD (Nyström), η=1")], iters=1)


PRESETS: dict[str, Callable[[int, str], Experiment]] = {
    "fig1a": _fig1a,
    "fig1b": _fig1b,
    "fig1c": _fig1c,
    "fig4": _fig4,
    "thm3": lambda seed, dtype: _one_step("fig1a", seed, dtype),
    "thm4": lambda seed, dtype: _one_step("fig1c", seed, dtype),
}


def run_preset(name: str, seed: int = 0, iters: int | None = None, dtype: str = "float64") -> dict:
    """Build preset `name` (optionally with another iteration budget) and run it."""
    if name not in PRESETS:
        raise NoraError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    exp = PRESETS[name](seed, dtype)
    if iters is not None:
        exp.iters = iters
    return run_experiment(exp)


def run_custom(
    problem: str = "symmetric",
    m: int = 1000,
    n: int | None = None,
    rank: int | None = None,
    spectrum: list[float] | None = None,
    algorithm: str = "scaledgd",
    init: str = "nystrom",
    lr: float = 0.5,
    xi: float | None = None,
    xi_noise: float = PERTURB_XI,
    damping: float = 0.01,
    iters: int = 60,
    seed: int = 0,
    dtype: str = "float64",
) -> dict:
    """One run from command-line knobs; ξ defaults to 1e-3 for small init and 1 for Nyström."""
    if xi is None:
        xi = SMALL_XI if init == "small" else 1.0
    spec = RunSpec(algorithm, init, lr, xi, xi_noise, damping)
    validate_spec(spec)  # before building A: a typo should not cost a 1000×1000 QR
    return run_experiment(Experiment(make_problem(problem, m, n, rank, spectrum, seed, dtype), [spec], iters))
