"""Guards that keep the user's files safe whatever happens: writability probes and SIGTERM → clean exit 143.

SIGTERM's default action kills the process on the spot, so `finally:` blocks never run and staging
directories (a half-written merged model can be gigabytes) stay behind. `exit_on_sigterm` turns the signal
into a `SystemExit(143)` raised in the main thread, which unwinds through every cleanup handler. The
training loop installs its own handler while it runs (checkpoint first, then exit 143) and restores this
one afterwards.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import tempfile
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
