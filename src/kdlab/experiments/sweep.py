"""The explanation sweep: KD strength α × student size against one teacher.

α is the weight of the hard-label term, as in the research this comes from:
``loss = α·CE + (1 − α)·T²·KL``; α = 1 is plain cross-entropy (no KD). For every student size
and α, students are trained over seeds with the study machinery (same data order and
augmentation for all), then compared with the teacher: accuracy, attention rank alignment,
focus on the teacher's top-k parts, logit alignment, top-1 agreement and KL to the teacher
(`kdlab.evaluate.alignment`), with plots against α per student and an overlay picture.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kdlab.core.config import load_recipe, recipe_from_dict


def sweep_recipes(base, alphas, students, T: float = 4.0) -> dict:
    """name -> recipe for each (student model, α)."""
    out = {}
    for s in students:
        for a in alphas:
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"alpha {a} is outside [0, 1] (it is the weight of the label term)")
            d = base.to_dict()
            d["student"] = {"model": s, "kwargs": {}}
            loss = []
            if a > 0:
                loss.append({"term": "ce", "weight": a})
            if a < 1:
                loss.append({"term": "kd", "weight": 1.0 - a, "T": T})
            d["loss"] = loss
            d["mask"] = None
            d["name"] = f"{base.name}-sweep"
            r = recipe_from_dict(d, base.source or base.name)
            r.source = base.source
            out[f"{s}@a={a:g}"] = r
    return out


def run_sweep(recipe_ref="digits/kd", *, alphas=(1.0, 0.5, 0.1), students=("cnn_tiny", "cnn_small", "cnn_medium"),
              seeds=(0,), out_dir=None, data_dir=None, overrides=None, n_images=256, method="ig",
              grid=(4, 4), k=5, steps=32, T: float = 4.0, image_seed: int = 0, progress=True, log=print):
    from kdlab.core.checkpoint import load_model
    from kdlab.data import load_dataset
    from kdlab.cli.explain import explain_report, markdown, pick_images
    from kdlab.experiments.study import run_study
    from kdlab.train.build import ensure_teachers, load_teacher, with_data_dir
    from kdlab.train.runtime import resolve_device

    base = with_data_dir(load_recipe(recipe_ref, overrides), data_dir)
    if base.teacher is None:
        raise ValueError(f"recipe '{recipe_ref}' has no teacher; the sweep distils from one")
    out_dir = Path(out_dir or f"runs/{base.name}-sweep")
    recipes = sweep_recipes(base, alphas, students, T)
    log(f"sweep: {len(students)} students x alphas {list(alphas)} x seeds {list(seeds)} -> {out_dir}")
    ensure_teachers(base, data_dir=data_dir, progress=progress, log=log)
    first = next(iter(recipes))
    run_study(recipes, out_dir / "runs", seeds=list(seeds), progress=progress, log=log, baseline=first)

    d = base.data
    splits = load_dataset(d.name, d.data_dir, val_fraction=d.val_fraction)
    info = splits.info
    device = resolve_device(base.train.device)
    teacher = load_teacher(base, info, device)
    idx = torch.as_tensor(pick_images(len(splits.test.y), n_images, image_seed))
    x, y = splits.test.x[idx], splits.test.y[idx]
    students_ = []
    for name, r in recipes.items():
        s_model, a = name.split("@a=")
        for seed in seeds:
            run = out_dir / "runs" / name / f"seed{seed}"
            model, _ = load_model(run / "best.pt", device)
            res = json.loads((run / "result.json").read_text())
            students_.append((f"{s_model} a={a} s{seed}", model,
                              {"alpha": float(a), "size": s_model, "seed": seed,
                               "test_acc_full": res["test_acc"]}))
    log(f"explaining {len(students_)} students on {len(idx)} test images ({method}, grid {grid}, k={k})")
    rows = explain_report(teacher, students_, x, y, mean=info.mean, std=info.std,
                          out_dir=out_dir / "explain", method=method, grid=tuple(grid), k=k,
                          steps=steps, device=device,
                          settings={"recipe": base.source, "alphas": list(alphas),
                                    "students": list(students), "seeds": list(seeds),
                                    "image_seed": image_seed, "T": T})
    log("")
    log(markdown(rows, len(idx)))
    log(f"sweep report: {out_dir / 'explain'} (explain.md, sweep.png, overlays.png)")
    return rows
