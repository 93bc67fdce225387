"""`nora evaluate`: LLM-Adapters generation protocol and lm-eval-style loglikelihood on commonsense/math tasks.

Importing this package stays light (no torch); the heavy imports happen inside the functions.
"""

from nora_cli.evaluate.runner import (
    LoadedModel,
    PreparedTask,
    evaluate_model,
    load_for_eval,
    prepare_task,
    prepare_tasks,
    run_evaluation,
)
from nora_cli.evaluate.tasks import TASKS, Task, get_task

__all__ = [
    "TASKS",
    "LoadedModel",
    "PreparedTask",
    "Task",
    "evaluate_model",
    "get_task",
    "load_for_eval",
    "prepare_task",
    "prepare_tasks",
    "run_evaluation",
]
