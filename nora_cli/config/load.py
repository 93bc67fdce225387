"""Finding and loading recipes: shipped recipes by name, YAML with duplicate-key checks, `--set` overrides,
paths resolved against the recipe file, one-line validation errors."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from nora_cli.config.schema import Recipe
from nora_cli.errors import NoraError, read_text, shown


def recipes_dir() -> Path:
    """$NORA_RECIPES, else the repo's top-level recipes/ (editable install / Docker COPY beside the package),
    else recipes packaged inside nora_cli/ (wheel install)."""
    if env := os.environ.get("NORA_RECIPES"):
        return Path(env).expanduser().resolve()
    here = Path(__file__).resolve().parent.parent  # nora_cli/
    for candidate in (here.parent / "recipes", here / "recipes"):
        if candidate.is_dir():
            return candidate
    return here.parent / "recipes"


RECIPES_DIR = recipes_dir()


def shipped_recipes() -> list[Path]:
    """Every shipped recipe file, sorted by name."""
    folder = recipes_dir()
    return sorted(folder.glob("*.yaml")) if folder.is_dir() else []


def recipe_description(path: Path) -> str:
    """The one-line description from a recipe's leading comment (the line after the `nora ...` command)."""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text and not text.startswith(("nora ", "$ ")):
            return text
    return ""


def find_recipe(path_or_name: str) -> Path:
    """A recipe file path as given, or a shipped recipe by name (with or without .yaml)."""
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return path
    if len(path.parts) > 1:
        raise NoraError(f"recipe file not found: {path}")
    name = path.stem if path.suffix in (".yaml", ".yml") else path.name
    shipped = recipes_dir() / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(p.stem for p in shipped_recipes()) or "none"
    raise NoraError(f"no recipe file or shipped recipe named {path_or_name!r}; shipped recipes: {names}")


# --- loading ---------------------------------------------------------------------------------------------

_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".tsv", ".txt", ".arrow")
# (section, key, file suffixes that mark a bare name as a path rather than a hub id)
_PATH_FIELDS = (
    ("model", "source", (".gguf",)),
    ("data", "path", _DATA_SUFFIXES),
    ("dreambooth", "instance_data_dir", ()),
    ("dreambooth", "class_data_dir", ()),
)


def _looks_like_path(value: str, base: Path, suffixes: Iterable[str] = ()) -> bool:
    """Explicit paths (./, ../, /, ~), file names with a known suffix, or anything existing under `base`.
    Hub ids (`org/name`) contain a slash too, so a bare `a/b` counts only if it exists or has a suffix."""
    if not value or value.startswith("builtin:"):
        return False
    if value.startswith(("./", "../", "/", "~")) or value.lower().endswith(tuple(suffixes)):
        return True
    return (base / value).exists()


def _absolute(value: str, base: Path) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _resolve_paths(tree: dict[str, Any], base: Path) -> None:
    """Make input paths in a raw recipe tree absolute against `base` (in place). Wrong types are left for
    pydantic to report."""
    for section, key, suffixes in _PATH_FIELDS:
        values = tree.get(section)
        value = values.get(key) if isinstance(values, dict) else None
        if isinstance(value, str) and _looks_like_path(value, base, suffixes):
            values[key] = _absolute(value, base)
    data = tree.get("data")
    template = data.get("template") if isinstance(data, dict) else None
    if isinstance(template, str) and template.endswith(".jinja"):  # a chat template file, not a template name
        data["template"] = _absolute(template, base)
    entries = data.get("datasets") if isinstance(data, dict) else None
    for entry in entries if isinstance(entries, list) else ():  # data.datasets: each entry's path as data.path
        value = entry.get("path") if isinstance(entry, dict) else None
        if isinstance(value, str) and _looks_like_path(value, base, _DATA_SUFFIXES):
            entry["path"] = _absolute(value, base)
    evaluation = tree.get("eval")
    if isinstance(evaluation, dict) and isinstance(evaluation.get("data"), dict):
        for task, value in evaluation["data"].items():
            if isinstance(value, str) and not value.startswith("builtin:"):
                evaluation["data"][task] = _absolute(value, base)


class _RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice is an error (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {shown(key)}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    text = read_text(path, "recipe")
    loader = _RecipeLoader(text)
    try:
        tree = loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise NoraError(f"{where}: invalid YAML: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise NoraError(f"{path}: invalid YAML: {err}") from None
    finally:
        loader.dispose()
    if tree is None:  # an empty file would otherwise train 250 steps of defaults into out/run
        raise NoraError(f"recipe {path} is empty; start from `nora recipes show smollm2-135m-demo`")
    if not isinstance(tree, dict):
        raise NoraError(f"{path}: a recipe must be a YAML mapping of sections, got {type(tree).__name__}")
    return tree


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(k.strip() for k in keys):
        raise NoraError(f"bad --set {text!r}: expected KEY=VALUE with a dotted key, e.g. train.max_steps=10")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. `a: b` inside a string): take it literally
    return [k.strip() for k in keys], value


def _nest(keys: list[str], value: Any) -> dict[str, Any]:
    tree: dict[str, Any] = {keys[-1]: value}
    for key in reversed(keys[:-1]):
        tree = {key: tree}
    return tree


def _merge(into: dict[str, Any], update: dict[str, Any], trail: str = "") -> None:
    """Deep-merge one override into the raw tree; a value cannot be indexed like a section."""
    for key, value in update.items():
        here, current = f"{trail}{key}", into.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            _merge(current, value, f"{here}.")
        elif isinstance(value, dict) and current is not None:
            raise NoraError(
                f"bad --set {here}.{next(iter(value))}: {here} is a value ({shown(current)}), not a section"
            )
        else:
            into[key] = value


def _field_names(loc: tuple[Any, ...]) -> list[str]:
    """Valid keys at the level of `loc` (a path of section names from the Recipe root)."""
    model: type[BaseModel] = Recipe
    for part in loc:
        if isinstance(part, int):  # an entry of a list of sections (data.datasets[0])
            continue
        field = model.model_fields.get(str(part))
        found = _section_in(getattr(field, "annotation", None))
        if found is None:
            return []
        model = found
    return list(model.model_fields)


def _section_in(annotation: Any) -> type[BaseModel] | None:
    """The section model an annotation holds: `X`, `X | None`, `list[X] | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for arg in getattr(annotation, "__args__", ()) if (m := _section_in(arg))), None)


def _dotted(loc: tuple[Any, ...]) -> str:
    """A pydantic location as the user writes it: data.datasets[0].path."""
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")


def _format_error(err: dict[str, Any]) -> str:
    """One line for one pydantic error: dotted path, what was expected, what was given."""
    loc = tuple(err["loc"])
    dotted = _dotted(loc)
    if err["type"] == "extra_forbidden":
        valid = _field_names(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"; did you mean {_dotted((*loc[:-1], close[0]))!r}?" if close else ""
        return f"unknown key {shown(dotted)}{hint} (valid here: {', '.join(valid)})"
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
        return f"{dotted}: {msg}" if dotted else msg
    if err["type"] == "missing" and loc and isinstance(loc[-1], int):  # short tuple, e.g. betas: [0.9]
        parent = dotted.rsplit("[", 1)[0]
        return f"{parent}: too few values, got {shown(err['input'])}"
    msg = re.sub(r"^Input should be (?=greater|less)", "expected a value ", msg)
    msg = msg.replace("Input should be ", "expected ")
    hint = ""
    if err["type"] == "literal_error":
        expected = re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))
        close = difflib.get_close_matches(err["input"], expected, n=1) if isinstance(err["input"], str) else []
        hint = f"; did you mean {close[0]!r}?" if close else ""
    given = "a mapping" if isinstance(err["input"], dict) else shown(err["input"])
    return f"{dotted or 'recipe'}: {msg}, got {given}{hint}"


def validate_recipe(tree: dict[str, Any], source: str = "recipe") -> Recipe:
    """Build a Recipe from a raw (already path-resolved) tree; the first error becomes one NoraError line."""
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        errors = err.errors(include_url=False)
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise NoraError(f"{source}: {_format_error(errors[0])}{more}") from None


def load_recipe(path_or_name: str, overrides: Iterable[str] = ()) -> Recipe:
    """Load a recipe file or shipped recipe, apply `--set key.path=value` overrides, validate and resolve.

    Paths written in the file resolve against the file's folder; paths given in overrides resolve against
    the current directory (where the user typed them). output.dir always resolves against the current
    directory: shipped recipes may live in a read-only install. The returned recipe holds absolute paths."""
    path = find_recipe(str(path_or_name))
    tree = _read_yaml(path)
    _resolve_paths(tree, path.resolve().parent)
    for text in overrides:
        keys, value = _parse_override(text)
        update = _nest(keys, value)
        _resolve_paths(update, Path.cwd())
        _merge(tree, update)
    recipe = validate_recipe(tree, source=str(path))
    recipe.output.dir = _absolute(recipe.output.dir, Path.cwd())
    return recipe


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (saved as out/recipe.yaml; `load_recipe` reads it back equal)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
