"""`nora recipes list|show|schema|validate`: browse shipped recipes and check your own (cli.py groups them)."""

from __future__ import annotations

import json
import sys

from nora_cli.options import RecipeArg, SetOption


def list_() -> None:
    """List shipped recipes: name, method, base model and what each one reproduces."""
    import yaml
    from rich.console import Console
    from rich.table import Table

    from nora_cli.config.load import recipe_description, recipes_dir, shipped_recipes

    table = Table(title=f"recipes in {recipes_dir()}")
    for column in ("name", "method", "model"):
        table.add_column(column, no_wrap=True)
    table.add_column("description")
    for path in shipped_recipes():
        raw = yaml.safe_load(path.read_text()) or {}
        model = raw.get("model") or {}
        table.add_row(
            path.stem, str(raw.get("method", "nora")), str(model.get("source", "")), recipe_description(path)
        )
    Console(soft_wrap=True).print(table)


def show(name: RecipeArg) -> None:
    """Print a recipe's YAML verbatim (redirect it to a file to start your own)."""
    from nora_cli.config.load import find_recipe
    from nora_cli.errors import read_text

    sys.stdout.write(read_text(find_recipe(name), "recipe"))


def schema() -> None:
    """Print the recipe JSON schema (every key, type, default and meaning)."""
    from nora_cli.config.reference import recipe_json_schema

    print(json.dumps(recipe_json_schema(), indent=2))


def validate(name: RecipeArg, overrides: SetOption = None) -> None:
    """Check a recipe (plus --set overrides) and print it fully resolved: presets filled, paths absolute.

    Also checks, without loading the model, that a local model source and the data exist and that the
    records parse (what `nora train` checks before loading anything); what was checked goes to stderr."""
    from nora_cli.config.load import load_recipe, recipe_to_yaml
    from nora_cli.models import check_model_exists
    from nora_cli.tasks import TASKS

    recipe = load_recipe(name, overrides or [])
    checked = [check_model_exists(recipe.model.source, recipe.model.gguf_file), TASKS[recipe.task].check_data(recipe)]
    sys.stdout.write(recipe_to_yaml(recipe))
    for line in checked:
        print(f"ok: {line}", file=sys.stderr)
