"""Distillation paradigms: training schedules built on kdlab.train.trainer.train (or, for DML, a small
joint loop of its own). Each returns a dict of results and writes run folders under ``out_dir``.

* ``dml``      Deep Mutual Learning: K peers trained together, each with CE + KL to the others.
* ``ban``      Born-Again Networks: k generations of the same architecture + their ensemble.
* ``ta``       Teacher Assistant: teacher -> assistant -> student chain.
* ``self``     self-distillation: a model taught by a frozen trained copy of itself.
* ``deepinv``  data-free KD (DeepInversion): synthesise inputs from the teacher's BN statistics.
"""

from __future__ import annotations

from pathlib import Path

PARADIGMS = [
    ("dml", "Deep Mutual Learning: K peers trained jointly, each with CE + mean KL to the other peers",
     "Zhang, Xiang, Hospedales & Lu, Deep Mutual Learning, CVPR 2018"),
    ("ban", "Born-Again Networks: k generations of one architecture, each taught by the previous, + ensemble",
     "Furlanello et al., Born-Again Neural Networks, ICML 2018"),
    ("ta", "Teacher Assistant: teacher -> assistant (chosen or sized between) -> student",
     "Mirzadeh et al., Improved Knowledge Distillation via Teacher Assistant, AAAI 2020"),
    ("self", "self-distillation: a model taught by a frozen trained copy of itself",
     "Furlanello et al. 2018; Zhang et al., Be Your Own Teacher, ICCV 2019"),
    ("deepinv", "data-free KD: DeepInversion (BN-statistics matching + TV prior + class targets), then KD",
     "Yin et al., Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion, CVPR 2020"),
]


def ensure_extra_teachers(recipe, *, data_dir=None, progress=True, log=print) -> None:
    """Train the extra teachers of ``mtkd`` terms (``checkpoints`` with ``recipes``) when missing."""
    from kdlab.core.config import load_recipe
    from kdlab.train.trainer import train

    for t in recipe.loss:
        if t.term != "mtkd":
            continue
        p = t.params
        for ck, rref in zip(p.get("checkpoints") or [], p.get("recipes") or []):
            if Path(ck).is_file():
                continue
            r = load_recipe(rref, [f"data.data_dir={data_dir}"] if data_dir else None)
            log(f"training extra teacher {r.name} -> {Path(ck).parent}")
            train(r, Path(ck).parent, progress=progress, method="teacher")
