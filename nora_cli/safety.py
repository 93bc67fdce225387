"""Guards that keep the user's files safe whatever happens: atomic writes with plain file modes, writability
probes, and SIGTERM → clean exit 143.

SIGTERM's default action kills the process on the spot, so `finally:` blocks never run and staging
directories (a half-written merged model can be gigabytes) stay behind. `exit_on_sigterm` turns the signal
into a `SystemExit(143)` raised in the main thread, which unwinds through every cleanup handler. The
training loop installs its own handler while it runs (checkpoint first, then exit 143) and restores this
one afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nora_cli.errors import NoraError


class Terminated(SystemExit):
    """SIGTERM arrived outside the training loop: unwind (cleanups run), then exit 128 + 15."""


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM during cleanup kills at once
    print("terminated by SIGTERM: removing partial output, exiting with 143", file=sys.stderr, flush=True)
    raise Terminated(128 + signal.SIGTERM)


def exit_on_sigterm() -> None:
    """Install the SIGTERM handler (main thread only; a no-op elsewhere, e.g. under a test runner thread)."""
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, _on_sigterm)


def check_writable(target: Path, what: str) -> None:
    """`target` (a file or folder to be created or replaced) can be written: its nearest existing ancestor
    is a directory in which a temp dir can be made. Permission bits lie to root and about read-only mounts,
    so this really creates (and removes) something, but never in `target` itself."""
    if target.exists() and not target.is_dir() and what.endswith("directory"):
        raise NoraError(f"{what} {target} exists and is not a directory")
    existing = target.parent if not target.is_dir() else target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NoraError(f"{what} {target} cannot be created: {existing} is not a directory")
    try:
        tempfile.TemporaryDirectory(dir=existing, prefix=".nora-probe-").cleanup()
    except OSError as err:
        raise NoraError(f"{what} {target} is not writable ({existing}: {err.strerror})") from None


def fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask: from /proc on Linux, else by setting it and putting it back at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def publish_modes(root: Path) -> None:
    """Give a staged file or tree the modes of a plain write (0666/0777 minus the umask) before it is renamed
    into place: mkstemp/mkdtemp, and safetensors' own atomic save, create everything 0600/0700."""
    mask = _umask()
    for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        publish_modes(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """Let `write` fill a fresh temp dir, then swap it in for `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
    try:
        write(tmp)
        swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def swap_in(staging: Path, target: Path) -> None:
    """Publish a fully written `staging` dir as `target`: plain modes, fsynced, renamed into place. An existing
    `target` is moved aside first and deleted only once the new one is in place, never in place."""
    publish_modes(staging)
    fsync_tree(staging)
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
