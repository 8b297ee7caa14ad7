""""Gap closed": the share of the teacher's advantage that a distilled student keeps.

``gap closed = (a_student − a_alone) / (a_teacher − a_alone)`` with the accuracies of the distilled
student, of the same student trained alone (no teacher), and of the teacher: 1 means the student
matches the teacher, 0 that distillation did not help, < 0 that it hurt, > 1 that the student beat
its teacher. Undefined (nan) when the teacher is no better than the student alone
(``a_teacher ≤ a_alone``): there is no gap to close.
"""

from __future__ import annotations

import math


def gap_closed(student: float, alone: float, teacher: float) -> float:
    """``(student − alone) / (teacher − alone)``; nan when ``teacher <= alone`` or a value is missing."""
    vals = (student, alone, teacher)
    if any(v is None or not math.isfinite(float(v)) for v in vals):
        return float("nan")
    gap = float(teacher) - float(alone)
    if gap <= 0:
        return float("nan")
    return (float(student) - float(alone)) / gap


def gap_closed_by_seed(student: dict, alone: dict, teacher) -> dict:
    """Per seed (paired): ``{seed: gap_closed(student[seed], alone[seed], teacher)}`` over the seeds
    both runs have; ``teacher`` is one accuracy or a dict by seed."""
    out = {}
    for k in sorted(set(student) & set(alone)):
        t = teacher.get(k) if isinstance(teacher, dict) else teacher
        out[k] = gap_closed(student[k], alone[k], t)
    return out
