"""Built-in tasks and how to get one by name.

>>> from rlhf_env.tasks import get_task
>>> get_task("sentiment").best_gold
0.8571428571428571
"""

from __future__ import annotations

from rlhf_env.tasks.arithmetic import ArithmeticTask
from rlhf_env.tasks.base import AnnotatorConfig, Task
from rlhf_env.tasks.custom import FileTask
from rlhf_env.tasks.dataset import DatasetTask
from rlhf_env.tasks.sentiment import SentimentTask
from rlhf_env.tasks.verbose import VerboseTask

TASKS: dict[str, type[Task]] = {"sentiment": SentimentTask, "arithmetic": ArithmeticTask, "verbose": VerboseTask}
DEFAULT_TASK = "sentiment"


def get_task(name: str | Task) -> Task:
    """The built-in task called `name` (a `Task` instance passes through)."""
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks are {sorted(TASKS)}")
    return TASKS[name]()


__all__ = [
    "AnnotatorConfig",
    "Task",
    "SentimentTask",
    "ArithmeticTask",
    "VerboseTask",
    "FileTask",
    "DatasetTask",
    "TASKS",
    "DEFAULT_TASK",
    "get_task",
]
