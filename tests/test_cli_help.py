"""`nora ... --help` as a user sees it: flags are shown as flags, never as `--debug <bool>`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer.main

from nora_cli.cli import app

NORA = Path(sys.executable).with_name("nora")


def _commands(group: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every command and group, as (argv path, command); Typer vendors click, so match by shape, not class."""
    found: list[tuple[tuple[str, ...], Any]] = [(path, group)]
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            found += _commands(command, (*path, name))
        else:
            found.append(((*path, name), command))
    return found


COMMANDS = _commands(typer.main.get_command(app))


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(p) or "nora" for p, _ in COMMANDS])
def test_help_shows_flags_without_a_value(path: tuple[str, ...], command: Any) -> None:
    proc = subprocess.run([str(NORA), *path, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "<bool>" not in proc.stdout
    flags = [p for p in command.params if p.param_type_name == "option" and p.is_flag]
    assert flags or path not in {(), ("train",), ("merge",)}, path  # these have flags: the check below must run
    for flag in flags:
        names = ", ".join(sorted(flag.opts, key=len))
        # the option's names, then only spaces before its help text (or a line break): no `<type>` between
        assert re.search(rf"^  {re.escape(names)}(\s{{2,}}\S|\n)", proc.stdout, re.M), (names, proc.stdout)
        assert not re.search(rf"^  {re.escape(names)} <", proc.stdout, re.M), proc.stdout
    assert re.search(r"^  -h, --help\s{2,}Show this message and exit\.$", proc.stdout, re.M), proc.stdout


@pytest.mark.parametrize("path", [(), ("recipes",)])
def test_a_bare_group_prints_its_help(path: tuple[str, ...]) -> None:
    proc = subprocess.run([str(NORA), *path], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("Usage: nora") and ("train" in proc.stdout if not path else "validate" in proc.stdout)
