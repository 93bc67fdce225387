"""nora_cli.tasks.TASKS is the one task registry: the recipe schema accepts exactly its names, every lazy entry
point resolves, and importing it stays cheap (no torch) so `nora --help` stays fast."""

from __future__ import annotations

import importlib
import subprocess
import sys
import typing

from nora_cli.config.schema import Recipe
from nora_cli.tasks import TASKS


def test_recipe_task_literal_is_the_registry() -> None:
    # config sits below tasks and cannot import TASKS: this test keeps the two lists equal
    assert typing.get_args(Recipe.model_fields["task"].annotation) == tuple(TASKS)


def test_every_task_entry_point_resolves() -> None:
    for name, task in TASKS.items():
        assert task.name == name
        assert task.default_format in task.exporters
        hooks = [task.build_job, task.preflight, task.check_data, task.sample]
        hooks += [f for exporter in task.exporters.values() for f in (exporter.export, exporter.verify)]
        for hook in filter(None, hooks):
            assert callable(getattr(importlib.import_module(hook.module), hook.name)), f"{name}: {hook}"


def test_importing_tasks_loads_no_torch() -> None:
    code = "import sys, nora_cli.tasks; heavy = {'torch', 'transformers', 'diffusers'} & set(sys.modules); print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "set()"
