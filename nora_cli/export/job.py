"""What an exporter is given (ExportJob) and what it returns (MergeReport, VerifyReport)."""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nora_cli.errors import NoraError

DTYPES = ("fp32", "bf16", "fp16")


class VerifyError(NoraError):
    """The exported model does not reproduce base + adapter: a failed check, not a usage error."""

    exit_code = 1


@dataclass(frozen=True)
class ExportJob:
    adapter_dir: Path
    out_dir: Path  # the final location; exporters write into the staging dir they are handed
    base: str | None  # --base, or None for the one the adapter records
    dtype: str | None  # fp32|bf16|fp16, or None to keep the base's stored dtype
    max_shard_size: int  # bytes
    task: str  # nora.json "task": causal-lm, dreambooth, ...
    fmt: str
    allow_pickle: bool = False  # also load pickled .bin adapters/bases (torch.load(weights_only=True))

    def refuse_inside(self, path: Path | None, what: str) -> None:
        """Replacing --out must never delete an input."""
        if path is None:
            return
        out, path = self.out_dir.resolve(), path.resolve()
        if out == path or out in path.parents:
            raise NoraError(f"--out {self.out_dir} contains the {what} ({path}); choose another output dir")


@dataclass
class VerifyReport:
    """Max |logit difference| between the export and base + adapter (PEFT), on fixed prompts."""

    max_abs_diff: float
    tolerance: float
    adapter_effect: float  # max |logits(base + adapter) - logits(base)|: the signal the check can see
    dtype: str
    prompts: int

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def line(self) -> str:
        verdict = "OK" if self.passed else "FAILED"
        text = (f"verify: max |Δlogit| {self.max_abs_diff:.2e} over {self.prompts} prompts, tolerance "
                f"{self.tolerance:.2e} for {self.dtype} (adapter effect {self.adapter_effect:.2e}): {verdict}")
        if self.adapter_effect <= self.tolerance:
            text += "; the adapter's own effect is within the tolerance, so this check is inconclusive"
        return text


@dataclass
class MergeReport:
    out_dir: Path
    fmt: str
    method: str  # streaming | load+merge_and_unload | peft-export | ...
    adapter_dir: Path
    base: str | None
    dtype: str  # output dtype (fp32/bf16/fp16)
    files: list[str]
    total_bytes: int
    lora_weights: int  # base tensors changed by the adapter
    notes: list[str] = field(default_factory=list)
    peak_rss_mib: float = 0.0  # of the export itself, before any --verify
    seconds: float = 0.0
    verify: VerifyReport | None = None

    def lines(self) -> list[str]:
        size = f"{self.total_bytes / 1e6:.1f} MB" if self.total_bytes < 1e9 else f"{self.total_bytes / 1e9:.2f} GB"
        base = f" (base {self.base})" if self.base else ""
        out = [
            f"exported {self.adapter_dir}{base} as {self.fmt}: {self.out_dir} "
            f"({len(self.files)} weight file{'s' * (len(self.files) != 1)}, {size}, {self.dtype})",
            f"method: {self.method}; {self.lora_weights} weights changed by the adapter; "
            f"peak RSS {self.peak_rss_mib:.0f} MiB; {self.seconds:.1f} s",
        ]
        out += [f"note: {note}" for note in self.notes]
        if self.verify is not None:
            out.append(self.verify.line())
        return out


ExportFn = Callable[[ExportJob, Path], MergeReport]
VerifyFn = Callable[[ExportJob, Path, MergeReport], VerifyReport]


@dataclass(frozen=True)
class Exporter:
    """One (task, format) pair: writes into a staging dir; optionally re-checks what it wrote."""

    export: ExportFn
    verify: VerifyFn | None = None


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
