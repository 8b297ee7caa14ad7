"""Tasks: what is learned (classification, language modelling, detection, face verification,
diffusion sampling) as plug-ins of one study machinery. See :mod:`kdlab.tasks.base`."""

from kdlab.tasks.base import Metric, Task, get_task, list_tasks, load_recipe, read_raw, register_task, task_of

__all__ = ["Metric", "Task", "get_task", "list_tasks", "load_recipe", "read_raw", "register_task", "task_of"]
