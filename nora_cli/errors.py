"""One exception type for user mistakes: the CLI prints its message on one line and exits 2.

Plus the two helpers every reader of a user-named file goes through, so a missing, unreadable, binary or
malformed file is always one line that names the file (never a UnicodeDecodeError traceback)."""

from __future__ import annotations

import json
import reprlib
from pathlib import Path
from typing import Any


class NoraError(Exception):
    """A problem with the user's input (recipe, path, flag). Never a bug in nora."""

    exit_code = 2


_SHORT = reprlib.Repr()  # Python 3.11's Repr takes no keyword arguments
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4
_SHORT.maxlevel = 2


def shown(value: object, limit: int = 80) -> str:
    """repr(value) in at most ~`limit` characters, without ever building the full repr (a YAML alias bomb
    is a small tree whose full repr is gigabytes)."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_text(path: Path, what: str) -> str:
    """A user's text file as str; unreadable or not UTF-8 (binary, UTF-16) is a NoraError naming it."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise NoraError(f"cannot read {what} {path}: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise NoraError(f"{what} {path} is not UTF-8 text (byte {err.start}: {err.reason}); is it a binary "
                        "or UTF-16 file?") from None
    if "\x00" in text:
        raise NoraError(f"{what} {path} is a binary file (it contains NUL bytes), not text")
    return text


def read_json(path: Path, what: str) -> Any:
    """A user's JSON file; bad JSON is a NoraError with the file, line and column."""
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as err:
        raise NoraError(f"{what} {path} is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})") \
            from None
