"""`merge_adapter`: the exporter for (task, format) from TASKS, into a staging dir, verify, move into place.

Nothing at --out is touched until the export (and --verify) succeeded: exporters write into a
hidden sibling directory that is renamed onto --out at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from nora_cli.errors import NoraError
from nora_cli.export.job import DTYPES, Exporter, ExportJob, MergeReport, VerifyError, peak_rss_mib
from nora_cli.run_dir import recorded_task
from nora_cli.safety import check_writable, publish_modes
from nora_cli.tasks import TASKS


def _pick_exporter(task: str, fmt: str | None) -> tuple[str, Exporter]:
    """--format (default: the task's) and its exporter, both from TASKS; exit 2 for a format nora does not
    know, or one this adapter's task has no exporter for."""
    spec = TASKS.get(task)
    fmt = fmt or (spec.default_format if spec else "merged")
    known = dict.fromkeys(f for t in TASKS.values() for f in t.exporters)
    if fmt not in known:
        raise NoraError(f"--format {fmt!r}: expected one of {', '.join(known)}")
    formats = spec.exporters if spec else {}
    if fmt not in formats:
        hint = f"; available: {', '.join(sorted(formats))}" if formats else ""
        raise NoraError(f"--format {fmt} is not available for this adapter (task {task!r}){hint}")
    return fmt, formats[fmt]


def parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        value = parse_size_to_int(size)
    except (ValueError, OverflowError):  # "abc", "nanGB", "infGB"
        value = 0
    if value <= 0:
        raise NoraError(f"--max-shard-size {size!r}: expected a positive size like 5GB, 500MB or 100KB")
    return value


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NoraError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise NoraError(f"--out {out} exists and is not empty; pass --overwrite to replace it")


def _commit(staging: Path, out: Path, overwrite: bool) -> None:
    """Rename staging onto out; a non-empty out (only with --overwrite) is swapped out, then deleted."""
    _check_out(out, overwrite)  # again: something may have appeared while we were exporting
    if out.is_dir() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old)  # old is an empty dir, so this rename is allowed and atomic
        try:
            os.replace(staging, out)
        except OSError:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)  # onto a missing or empty directory: atomic


def merge_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    base: str | None = None,
    dtype: str | None = None,
    fmt: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    verify: bool = False,
    allow_pickle: bool = False,
) -> MergeReport:
    """Export an adapter as `fmt` (default: "merged" for causal LMs) into `out_dir`.

    Raises NoraError (exit 2) for bad input before anything is written, VerifyError (exit 1) when
    `verify` finds the export does not reproduce base + adapter; --out is then left as it was.
    """
    start = time.perf_counter()
    adapter_dir = Path(adapter_dir).expanduser()
    if not adapter_dir.is_dir():
        raise NoraError(f"adapter directory not found: {adapter_dir}")
    if dtype is not None and dtype not in DTYPES:
        raise NoraError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    task = recorded_task(adapter_dir) or "causal-lm"  # no adapter at all: the causal-LM reader says what is missing
    fmt, exporter = _pick_exporter(task, fmt)
    if verify and exporter.verify is None:
        raise NoraError(f"--verify is not available for --format {fmt} (task {task!r})")
    out = Path(out_dir).expanduser()
    _check_out(out, overwrite)
    check_writable(out, "--out directory")  # before the export, not after minutes of work
    job = ExportJob(adapter_dir, out, base, dtype, parse_size(max_shard_size), task, fmt, allow_pickle)
    job.refuse_inside(adapter_dir, "adapter")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        report = exporter.export(job, staging)
        report.peak_rss_mib = peak_rss_mib()
        if verify:
            assert exporter.verify is not None
            report.verify = exporter.verify(job, staging, report)
            if not report.verify.passed:
                raise VerifyError(f"{report.verify.line()}; --out {out} was left unchanged")
        publish_modes(staging)
        _commit(staging, out, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful commit
    report.seconds = time.perf_counter() - start
    return report
