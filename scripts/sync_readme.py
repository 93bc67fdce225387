"""Regenerate the recipe reference in README.md from the schema (tests/test_readme.py checks it)."""

import re
from pathlib import Path

from nora_cli.config.reference import recipe_reference_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- recipe-reference:start -->", "<!-- recipe-reference:end -->"

text = README.read_text()
new = re.sub(f"{re.escape(START)}.*?{re.escape(END)}", f"{START}\n{recipe_reference_markdown()}{END}", text, flags=re.S)
README.write_text(new)
print("README.md recipe reference updated" if new != text else "README.md already in sync")
