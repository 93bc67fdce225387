"""README claims that must stay true: the test command CI runs, the recipe reference, the command list."""

from __future__ import annotations

import re
from pathlib import Path

from nora_cli.config.load import shipped_recipes
from nora_cli.config.reference import recipe_reference_markdown

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _fenced_after(heading: str) -> list[str]:
    section = README.split(heading, 1)[1]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def test_ci_runs_the_readme_test_command() -> None:
    command = _fenced_after("Run the tests")[0].strip()
    assert command in (REPO / ".ci/run").read_text()


def test_readme_demo_command_exists() -> None:
    command = _fenced_after("Run the demo")[0].strip()
    assert command == "bash scripts/demo.sh" and (REPO / "scripts/demo.sh").is_file()


def test_recipe_reference_matches_schema() -> None:
    block = README.split("<!-- recipe-reference:start -->\n", 1)[1].split("<!-- recipe-reference:end -->", 1)[0]
    assert block == recipe_reference_markdown(), "run: python scripts/sync_readme.py"


def test_every_shipped_recipe_and_command_is_documented() -> None:
    for path in shipped_recipes():
        assert f"`{path.stem}`" in README, path.stem
    from nora_cli.cli import app

    names = [c.name for c in app.registered_commands] + [g.name for g in app.registered_groups]
    for name in names:
        assert f"`nora {name}" in README, name
