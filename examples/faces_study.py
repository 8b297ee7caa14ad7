"""The faces studies of docs/faces.md, until `kdlab ablate` drives task plug-ins:

    OMP_NUM_THREADS=1 PYTHONPATH=src python examples/faces_study.py ladder runs/faces-study \
        --set data.label_fraction=0.5
    OMP_NUM_THREADS=1 PYTHONPATH=src python examples/faces_study.py quantface runs/faces-quant \
        --set data.label_fraction=0.5 teacher.checkpoint=runs/faces-study/teacher/best.pt

``ladder``: baseline / embed_kd / adadistill / qud over ``--seeds`` (paired table, Holm p, ROC);
``quantface``: full precision, PTQ and QuantFace at w6a6 and w4a4 (table with sizes).
"""

import argparse

from kdlab.tasks.faces import run_faces_study, run_quantface_study

p = argparse.ArgumentParser()
p.add_argument("study", choices=["ladder", "quantface"])
p.add_argument("out")
p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides")
p.add_argument("--methods", nargs="*", help="ladder: only these methods")
a = p.parse_args()
if a.study == "ladder":
    run_faces_study(a.out, seeds=a.seeds, overrides=a.set, methods=a.methods)
else:
    run_quantface_study(a.out, seeds=a.seeds, overrides=a.set)
