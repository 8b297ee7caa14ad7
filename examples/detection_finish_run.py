"""Finish an interrupted detection run where it stands (docs/detection.md, "The teacher"): its
``best.pt`` (the best validation epoch so far) is scored on the validation and test scenes and
``result.json`` written by the Trainer's own ``finish`` (``stopped_early: true``), so studies can use
the run as a teacher:

    OMP_NUM_THREADS=1 PYTHONPATH=src python examples/detection_finish_run.py detection/teacher_s3a runs/teacher-s3a
"""

import sys

import torch

from kdlab.tasks import get_task
from kdlab.tasks.detection import build_detection_run
from kdlab.train.trainer import Trainer


def main(ref, run_dir):
    torch.set_num_threads(1)
    task = get_task("detection")
    r = task.load_recipe(ref)
    objective, tr, va, te, runtime, info = build_detection_run(r)
    t = Trainer(objective, tr, va, te, r.train, run_dir, runtime=runtime, identity=r.to_dict(), method="teacher",
                progress=False, info={"recipe": r.name, "model": r.student.model, "dataset": info.name,
                                      "sample_unit": task.sample_unit, "task": task.name})
    if not t.try_resume():
        raise SystemExit(f"kdlab: error: {run_dir} holds no last.pt to finish; train it first")
    res = t.finish(True)
    print({k: v for k, v in res.items() if "map" in k or "epoch" in k})


if __name__ == "__main__":
    main(*sys.argv[1:])
