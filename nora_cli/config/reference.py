"""The recipe schema as JSON schema (editors, `nora recipes schema`) and as the README reference table."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from nora_cli.config.schema import Recipe


def recipe_json_schema() -> dict[str, Any]:
    """JSON schema of the recipe (for editors and `nora recipes schema`)."""
    return Recipe.model_json_schema()


def recipe_reference_markdown() -> str:
    """The README's recipe reference, generated from the schema (a test keeps README in sync)."""
    lines: list[str] = []
    def section_model(annotation: Any) -> type[BaseModel] | None:
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                return candidate
        return None

    sections = [("", Recipe)] + [
        (name, model) for name, info in Recipe.model_fields.items() if (model := section_model(info.annotation))
    ]
    for prefix, model in sections:
        rows = [(name, info) for name, info in model.model_fields.items() if not section_model(info.annotation)]
        if not rows:
            continue
        lines += [f"**`{prefix or 'top level'}`**", "", "| key | default | meaning |", "|---|---|---|"]
        for name, info in rows:
            default = None if info.is_required() else info.get_default(call_default_factory=True)
            shown = "required" if info.is_required() else "—" if default is None else f"`{yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}`"
            desc = (info.description or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{name}` | {shown} | {desc} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
