"""`kdlab bench --accuracy`: do the fast settings keep the accuracy? (issue 30)

Live KD of a CIFAR ResNet student from a CIFAR ResNet teacher (default resnet56 -> resnet20, the
``cifar10/kd`` recipe otherwise: batch 64, SGD momentum 0.9, weight decay 5e-4, random crops; for a
short run lr 0.05 with a cosine schedule, which :data:`TRAIN` sets for teacher and students) for
``epochs`` epochs on learnable offline data: ``mnist5k`` (default: 5,000 real MNIST digits, 1x28x28,
3,600 for training, 1,000 for the test) or ``synthetic`` (:mod:`kdlab.data.cifar_synthetic`,
3x32x32: a class grating on a random background at a random place; a ResNet-56 stays near chance
for its first epochs there, so its 3-epoch accuracies say little). Chance is 10 %. Trained twice
per seed:

* ``default``: today's defaults (fp32, contiguous memory, ``train.fast_teacher: false``);
* ``fast``: ``train.amp: bf16``, ``train.channels_last: true``, ``train.fast_teacher: true``.

Both runs of seed k start from the same weights and see the same batches (same seed, same
``teacher_mode: live``), so the per-seed difference ``fast − default`` of test accuracy is a
paired sample; its mean and the two-sided 95 % Student-t interval (``scipy.stats.t``, n − 1
degrees of freedom) say whether the fast settings move accuracy beyond seed noise. The teacher
(trained first when missing, ``teacher_epochs`` epochs, CE, fp32) and generated data are kept in
``out`` and reused; the runs go to ``out/runs/<setting>/seed<k>``, which must be new.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional

TRAIN = ["train.lr=0.05", "train.schedule=cosine", "train.patience=null"]  # both settings and the teacher

SETTINGS = {
    "default": [],
    "fast": ["train.amp=bf16", "train.channels_last=true", "train.fast_teacher=true"],
}


def paired_t_interval(a, b, level: float = 0.95) -> dict:
    """Mean of ``b − a`` over pairs, its sample standard deviation and the two-sided Student-t
    interval at ``level`` (``mean ± t_{n−1} · sd / √n``); with one pair the interval is undefined
    (nan)."""
    from scipy import stats

    d = [float(y) - float(x) for x, y in zip(a, b)]
    n = len(d)
    if n == 0:
        raise ValueError("no paired values")
    mean = sum(d) / n
    if n < 2:
        return {"n": n, "diffs": d, "mean": mean, "sd": float("nan"), "lo": float("nan"), "hi": float("nan"),
                "level": level}
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "diffs": d, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half, "level": level}


#: fewer synthetic test images than this make the accuracy check warn (one image moves accuracy > 1 point)
FEW_TEST_IMAGES = 100


def accuracy_check(out, *, seeds=(0, 1, 2), epochs: int = 3, data: str = "mnist5k", n_train: int = 2560,
                   n_test: int = 512, teacher: str = "resnet56", student: str = "resnet20", teacher_epochs: int = 3,
                   device: str = "cpu", extra: Optional[list] = None, log=print) -> dict:
    """Train the ``default`` and ``fast`` settings (see the module doc) for every seed, alternating,
    and return per-seed test accuracies, the paired differences and their t-interval (also written
    to ``out/accuracy.json``). ``data``: ``mnist5k`` or ``synthetic`` (``n_train`` / ``n_test``
    generated images); ``extra``: ``--set`` overrides for both settings' recipes."""
    from kdlab.core.device import resolve_device
    from kdlab.core.io import check_out_dir, write_json
    from kdlab.train.recipe import load_recipe
    from kdlab.data.cifar_synthetic import write_synthetic_cifar
    from kdlab.models import model_kwargs
    from kdlab.train.build import teacher_finished, train

    out = Path(out)
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: give distinct seeds (got {seeds})")
    if int(epochs) != epochs or epochs < 1 or int(teacher_epochs) != teacher_epochs or teacher_epochs < 1:
        raise ValueError("--epochs must be a whole number >= 1")
    check_out_dir(out, "--out folder", create=False)
    resolve_device(device)  # before any data, teacher or run is written
    runs = out / "runs"
    if runs.exists() and any(runs.iterdir()):
        raise ValueError(f"{runs} is not empty (finished runs there would be reused, not trained); give "
                         f"--out a new folder or delete {runs} (the data and teacher in {out} are kept)")
    if data == "synthetic":
        folder = out / "data"
        data_ov = [f"data.data_dir={folder}"]
        what = f"{n_train} generated CIFAR-format images, test {n_test}"
    elif data == "mnist5k":
        data_ov = ["data.name=mnist5k", "data.data_dir=null", "data.augment.flip=false"]
        what = "mnist5k (3,600 training digits, test 1,000)"
    else:
        raise ValueError(f"the accuracy check's data is mnist5k or synthetic (got {data!r})")
    for flag, name in (("--teacher", teacher), ("--student", student)):
        try:
            model_kwargs(name)
        except KeyError as e:
            raise ValueError(f"{flag}: {e.args[0]}") from None
    ckpt = out / "teacher" / "best.pt"
    common = [*data_ov, f"train.device={device}", *TRAIN]
    t_recipe = load_recipe("cifar10/teacher", common + [f"student.model={teacher}", "student.kwargs={}",
                                                       f"train.epochs={teacher_epochs}"])
    base = common + [f"student.model={student}", "student.kwargs={}", f"teacher.model={teacher}",
                     "teacher.kwargs={}", f"teacher.checkpoint={ckpt}", f"train.epochs={epochs}",
                     "train.teacher_mode=live", *(extra or [])]
    # every run's recipe is read (and refused) before any data, teacher or run is written
    recipes = {(seed, name): load_recipe("cifar10/kd", base + ov + [f"train.seed={seed}"])
               for seed in seeds for name, ov in SETTINGS.items()}
    if data == "synthetic" and n_test < FEW_TEST_IMAGES:  # after every refusal: a refused input prints one line
        print(f"kdlab: warning: only {n_test} test images (from --synthetic-cifar {n_train}): one "
              f"image moves a test accuracy by {100 / n_test:.1f} points, so the interval says little; give "
              f"--synthetic-cifar {5 * FEW_TEST_IMAGES} or more", file=sys.stderr)
    if data == "synthetic" and not (folder / "cifar-10-batches-py" / "test_batch").is_file():
        write_synthetic_cifar(folder, n_train, n_test)
        log(f"accuracy check: generated CIFAR-format data ({n_train} training, {n_test} test images) in {folder}")
    if not teacher_finished(ckpt):
        log(f"accuracy check: training teacher {teacher} ({teacher_epochs} epochs) into {ckpt.parent}")
        res = train(t_recipe, ckpt.parent, progress=False, method="teacher")
        log(f"  teacher test accuracy {res['test_acc']:.4f} (chance 0.1000)")
    t_res = _read_result(ckpt.parent)
    acc: dict = {name: {} for name in SETTINGS}
    rows = []
    for seed in seeds:
        for name, ov in SETTINGS.items():  # alternating: default then fast, seed by seed
            res = train(recipes[seed, name], runs / name / f"seed{seed}", progress=False, method=f"kd-{name}")
            acc[name][seed] = float(res["test_acc"])
            rows.append({"setting": name, "seed": seed, "test_acc": res["test_acc"], "val_acc": res["val_acc"],
                         "test_loss": res["test_loss"], "train_time_s": res["train_time_s"],
                         "images_per_s": res.get("images_per_s")})
            log(f"  seed {seed} {name:<8} test accuracy {res['test_acc']:.4f}  (train {res['train_time_s']:.1f} s)")
    ci = paired_t_interval([acc["default"][s] for s in seeds], [acc["fast"][s] for s in seeds])
    verdict = ("within noise (the interval holds 0)" if ci["lo"] <= 0.0 <= ci["hi"] else
               "beyond noise (the interval excludes 0)" if ci["n"] > 1 else "one seed: no interval")
    lines = [f"accuracy after {epochs} epoch(s), live KD {teacher} -> {student}, {what} (chance 0.10; teacher "
             f"{t_res['test_acc'] if t_res else float('nan'):.4f}):",
             "| seed | default | fast (bf16 + channels-last + fast_teacher) | fast − default |",
             "|---:|---:|---:|---:|"]
    for s, d in zip(seeds, ci["diffs"]):
        lines.append(f"| {s} | {acc['default'][s]:.4f} | {acc['fast'][s]:.4f} | {d:+.4f} |")
    lines.append(f"paired difference fast − default: mean {ci['mean']:+.4f}, sd {ci['sd']:.4f}, "
                 f"{100 * ci['level']:.0f}% t-interval [{ci['lo']:+.4f}, {ci['hi']:+.4f}] over {ci['n']} seeds: "
                 f"{verdict}")
    for line in lines:
        log(line)
    result = {"epochs": epochs, "data": data, "n_train": n_train if data == "synthetic" else None,
              "n_test": n_test if data == "synthetic" else None, "teacher": teacher, "student": student,
              "teacher_test_acc": t_res.get("test_acc") if t_res else None, "settings": SETTINGS,
              "seeds": seeds, "runs": rows, "paired": ci, "verdict": verdict}
    write_json(out / "accuracy.json", result)
    return result


def _read_result(folder: Path) -> Optional[dict]:
    import json

    try:
        return json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        return None
