"""Progressive distillation of a diffusion sampler (Salimans & Ho, ICLR 2022): rounds
N → N/2 → … → end, each round a :class:`kdlab.train.trainer.Trainer` run in its own folder whose
student starts as its teacher (the previous round's model) and learns to do in one DDIM step what
the teacher does in two (:func:`kdlab.distill.diffusion.two_step_target`). An interrupted chain
resumes where it stopped: finished rounds are verified and kept, an unfinished one resumes from
its ``last.pt``.

Folder of a chain (one seed)::

    <out>/teacher/            the teacher's run (skipped with distill.teacher_checkpoint)
    <out>/steps032/ ...       one run per round, named by the student's step count
    <out>/chain.json          the summary, written last

:func:`run_progressive_study` runs the chain for every seed and scores, on the test split, the
teacher's own DDIM sampler at every step count (the baseline) and each round's student at its step
count, from the same starting noise: ``fd_vs_steps.{csv,md,json}``, ``fd_vs_steps.png`` and
sample grids. ``timing=True`` adds the sampling time per image at each step count.

Not in the classifier paradigm registry (whose paradigms wrap classification recipes): the diffusion
task (:mod:`kdlab.tasks.diffusion`) runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from kdlab.core.io import read_json, save_and_close, write_csv, write_json
from kdlab.tasks.diffusion_runs import (DiffusionRecipe, check_chain, ensure_feature_net, generate, load_data,
                                        load_denoiser, load_diffusion_recipe, run_chain, sample_noise, score,
                                        stats_line, time_sampler, train_run)


def _steps_list(recipe: DiffusionRecipe) -> list[int]:
    return [recipe.distill.start_steps] + recipe.distill.rounds()


def evaluate_chain(recipe: DiffusionRecipe, chain_dir, fnet, *, timing: bool = False, log=print) -> dict:
    """Scores on the test split of the teacher's DDIM at every step count and of each round's
    student at its own, all from the seed's fixed noise; cached in ``<chain>/steps_eval.json``
    (recomputed when a checkpoint changed). ``timing``: seconds per image of each sampler."""
    from kdlab.core.checkpoint import file_hash

    chain = Path(chain_dir)
    summary = read_json(chain / "chain.json", "chain summary")
    teacher_ck = Path(summary["teacher_checkpoint"])
    hashes = {"teacher": file_hash(teacher_ck),
              **{str(r["steps"]): file_hash(Path(r["run_dir"]) / "best.pt") for r in summary["rounds"]},
              "feature_net": fnet.hash, "samples": recipe.eval.samples}
    cache = chain / "steps_eval.json"
    if cache.is_file():
        old = read_json(cache, "step-count evaluation")
        if old.get("hashes") == hashes:
            if timing and not old.get("timed"):  # the scores stand; add the sampling times
                add_timings(old, summary, recipe, log=log)
                write_json(cache, old)
            return old
    seed = recipe.train.seed
    real = load_data(recipe).test.x
    real_feats = fnet.features(real)[0]
    den_t, _ = load_denoiser(teacher_ck)
    rows = []
    shape = tuple(real.shape[1:])

    def add_row(sampler: str, label: str, den, n: int) -> None:
        s = score(den, n, recipe, fnet, real, seed=seed, real_feats=real_feats)
        row = {"sampler": sampler, "steps": n, **{k: s[k] for k in ("fd", "coverage", "precision", "recall")}}
        if timing:
            row["s_per_image"] = time_sampler(den, n, shape)
        rows.append(row)
        log(f"seed {seed}: {label} {n:>3} steps  FD {s['fd']:.3f}")

    for n in _steps_list(recipe):
        add_row("teacher-ddim", "teacher DDIM", den_t, n)
    for r in summary["rounds"]:
        add_row("distilled", "distilled  ", load_denoiser(Path(r["run_dir"]) / "best.pt")[0], r["steps"])
    # the floor: real training images against the test images, same sample count
    splits = load_data(recipe)
    ntr = min(recipe.eval.samples, splits.train.x.shape[0])
    from kdlab.evaluate.generative import score_samples

    floor = score_samples(fnet, splits.train.x[:ntr], real, k=recipe.eval.knn_k, real_feats=real_feats)
    out = {"seed": seed, "rows": rows, "data_floor": {k: floor[k] for k in ("fd", "coverage", "precision", "recall")},
           "n_train_floor": ntr, "hashes": hashes, "timed": bool(timing), **fnet.describe(),
           "n_samples": recipe.eval.samples, "n_real": int(real.shape[0])}
    write_json(cache, out)
    return out


def add_timings(ev: dict, summary: dict, recipe: DiffusionRecipe, *, log=print) -> None:
    """Add ``s_per_image`` to every row of a step-count evaluation (in place)."""
    teacher, _ = load_denoiser(summary["teacher_checkpoint"])
    students = {r["steps"]: Path(r["run_dir"]) / "best.pt" for r in summary["rounds"]}
    shape = tuple(load_data(recipe).test.x.shape[1:])
    for row in ev["rows"]:
        den = teacher if row["sampler"] == "teacher-ddim" else load_denoiser(students[row["steps"]])[0]
        row["s_per_image"] = time_sampler(den, row["steps"], shape)
        log(f"seed {ev['seed']}: {row['sampler']:<12} {row['steps']:>3} steps  {row['s_per_image'] * 1e3:.3f} ms/image")
    ev["timed"] = True


def aggregate(evals: list[dict]) -> list[dict]:
    """One row per step count: mean ± sd over seeds of the teacher's DDIM and the distilled sampler."""
    steps = sorted({r["steps"] for e in evals for r in e["rows"]}, reverse=True)
    table = []
    for n in steps:
        row: dict = {"steps": n}
        for sampler, pre in (("teacher-ddim", "teacher"), ("distilled", "distilled")):
            for k in ("fd", "coverage", "precision", "recall", "s_per_image"):
                vals = [r[k] for e in evals for r in e["rows"] if r["sampler"] == sampler and r["steps"] == n and k in r]
                if vals:
                    row[f"{pre}_{k}_mean"], row[f"{pre}_{k}_sd"] = stats_line(vals)
        row["n_seeds"] = len(evals)
        table.append(row)
    return table


def _fmt(row, key, digits=2):
    m = row.get(f"{key}_mean")
    if m is None:
        return "—"
    return f"{m:.{digits}f} ± {row[f'{key}_sd']:.{digits}f}"


def verdicts(evals: list[dict], check_steps: int, ratio: float = 1.5) -> list[str]:
    """The issue's claims, per seed and on the means: FD(distilled k) ≤ ratio × FD(teacher, N) and
    FD(distilled k) < FD(teacher DDIM, k)."""
    lines = []
    per = []
    for e in evals:
        get = {(r["sampler"], r["steps"]): r["fd"] for r in e["rows"]}
        top = max(r["steps"] for r in e["rows"])
        d, t_top, t_k = get.get(("distilled", check_steps)), get.get(("teacher-ddim", top)), get.get(("teacher-ddim", check_steps))
        if d is None:
            continue
        per.append((e["seed"], d, t_top, t_k, top))
    if not per:
        return [f"no distilled {check_steps}-step sampler in these chains"]
    for seed, d, t_top, t_k, top in per:
        lines.append(f"seed {seed}: distilled {check_steps}-step FD {d:.3f} vs teacher {top}-step FD {t_top:.3f} "
                     f"(ratio {d / t_top:.2f}, {'≤' if d <= ratio * t_top else '>'} {ratio}) and vs teacher DDIM "
                     f"{check_steps}-step FD {t_k:.3f} ({'better' if d < t_k else 'not better'})")
    dm, tm, km = (float(np.mean([p[i] for p in per])) for i in (1, 2, 3))
    ok1, ok2 = dm <= ratio * tm, dm < km
    lines.append(f"mean over {len(per)} seeds: distilled {check_steps}-step FD {dm:.3f}, teacher {per[0][4]}-step FD "
                 f"{tm:.3f} (ratio {dm / tm:.2f}: {'meets' if ok1 else 'misses'} ≤ {ratio}×), teacher DDIM "
                 f"{check_steps}-step FD {km:.3f} ({'better' if ok2 else 'not better'})")
    return lines


def write_report(recipe: DiffusionRecipe, evals: list[dict], out_dir, *, command: str = "", log=print) -> dict:
    out = Path(out_dir)
    table = aggregate(evals)
    timed = any("teacher_s_per_image_mean" in r for r in table)
    write_csv(out / "fd_vs_steps.csv", table)
    floor = stats_line(e["data_floor"]["fd"] for e in evals)
    e0 = evals[0]
    head = ["steps", "teacher DDIM FD", "distilled FD", "teacher coverage (bits)", "distilled coverage (bits)",
            "teacher P / R", "distilled P / R"] + (["s/image (teacher)", "s/image (distilled)"] if timed else [])
    lines = [f"# {recipe.name}: FD against sampling steps ({len(evals)} seeds: "
             f"{', '.join(str(e['seed']) for e in evals)})", "",
             f"FD on the penultimate features of {e0['feature_net']} (sha256 {e0['feature_net_sha256']}), "
             f"{e0['n_samples']} generated images against the {e0['n_real']} test images; mean ± sd over seeds. "
             f"Floor (real training images vs test, same count): FD {floor[0]:.2f} ± {floor[1]:.2f}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        pr_t = (f"{r['teacher_precision_mean']:.2f} / {r['teacher_recall_mean']:.2f}"
                if "teacher_precision_mean" in r else "—")
        pr_d = (f"{r['distilled_precision_mean']:.2f} / {r['distilled_recall_mean']:.2f}"
                if "distilled_precision_mean" in r else "—")
        cells = [str(r["steps"]), _fmt(r, "teacher_fd"), _fmt(r, "distilled_fd"), _fmt(r, "teacher_coverage"),
                 _fmt(r, "distilled_coverage"), pr_t, pr_d]
        if timed:
            cells += [_fmt(r, "teacher_s_per_image", 5), _fmt(r, "distilled_s_per_image", 5)]
        lines.append("| " + " | ".join(cells) + " |")
    check = 4 if 4 in recipe.distill.rounds() else recipe.distill.end_steps
    v = verdicts(evals, check)
    lines += ["", *[f"- {x}" for x in v]]
    if command:
        lines += ["", f"Command: `{command}`"]
    (out / "fd_vs_steps.md").write_text("\n".join(lines) + "\n")
    write_json(out / "fd_vs_steps.json", {"table": table, "verdicts": v, "evals": evals})
    try:
        figs = figures(recipe, evals, table, out)
    except ImportError:
        figs = []
    for line in v:
        log(line)
    return {"table": table, "verdicts": v, "figures": [str(f) for f in figs]}


def figures(recipe: DiffusionRecipe, evals: list[dict], table: list[dict], out: Path) -> list[Path]:
    """``fd_vs_steps.png`` (mean ± sd over seeds, both samplers) and ``samples_seed<k>.png``
    (a grid per step count: the teacher's DDIM beside the distilled sampler, same noise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for pre, label, mk in (("teacher", "teacher DDIM", "o-"), ("distilled", "progressive distillation", "s-")):
        pts = [(r["steps"], r[f"{pre}_fd_mean"], r[f"{pre}_fd_sd"]) for r in table if f"{pre}_fd_mean" in r]
        if pts:
            s, m, sd = map(np.array, zip(*sorted(pts)))
            ax.errorbar(s, m, yerr=sd, fmt=mk, capsize=3, label=label)
    floor = np.mean([e["data_floor"]["fd"] for e in evals])
    ax.axhline(floor, color="grey", ls=":", label="real train vs test")
    ax.set_xscale("log", base=2)
    ticks = sorted(r["steps"] for r in table)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("FD (classifier features)")
    ax.set_title(f"{recipe.data.name}: FD vs steps ({len(evals)} seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(save_and_close(fig, out / "fd_vs_steps.png", dpi=120))
    return paths


def sample_grid(recipe: DiffusionRecipe, chain_dir, out_path, *, n: int = 16) -> Path:
    """Rows: step counts (start, ..., end); left the teacher's DDIM, right the distilled sampler,
    the same ``n`` starting noises everywhere."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chain = Path(chain_dir)
    summary = read_json(chain / "chain.json", "chain summary")
    den_t, ck = load_denoiser(summary["teacher_checkpoint"])
    shape = (ck["in_channels"],) + tuple(load_data(recipe).test.x.shape[2:])
    noise = sample_noise(n, shape, recipe.train.seed)
    students = {r["steps"]: Path(r["run_dir"]) / "best.pt" for r in summary["rounds"]}
    steps = _steps_list(recipe)

    def strip(imgs):
        imgs = imgs.numpy()
        return np.concatenate([np.pad(im[0], 1, constant_values=1.0) for im in imgs], axis=1)

    fig, axes = plt.subplots(len(steps), 2, figsize=(2 * n * 0.35, len(steps) * 0.55 + 0.6), squeeze=False)
    for row, k in enumerate(steps):
        t_img = strip(generate(den_t, noise, k, clip=recipe.sampler.clip_x))
        axes[row, 0].imshow(t_img, cmap="gray", vmin=0, vmax=1)
        if k in students:
            den_s, _ = load_denoiser(students[k])
            axes[row, 1].imshow(strip(generate(den_s, noise, k, clip=recipe.sampler.clip_x)), cmap="gray", vmin=0, vmax=1)
        else:
            axes[row, 1].imshow(t_img, cmap="gray", vmin=0, vmax=1)  # the top row: the teacher itself
        axes[row, 0].set_ylabel(f"{k}", rotation=0, labelpad=12, fontsize=8)
        for a in axes[row]:
            a.set_xticks([])
            a.set_yticks([])
    axes[0, 0].set_title("teacher DDIM", fontsize=9)
    axes[0, 1].set_title("progressive distillation", fontsize=9)
    fig.suptitle(f"{recipe.data.name}, seed {recipe.train.seed}: rows = sampling steps", fontsize=9)
    fig.tight_layout()
    return save_and_close(fig, out_path, dpi=120)


def run_progressive_study(recipe: DiffusionRecipe, out_dir, *, seeds: Optional[list[int]] = None,
                          timing: bool = False, progress: bool = True, command: str = "", log=print) -> dict:
    """The chain for every seed (``<out>/seed<k>``), the step-count evaluation, the table and figures."""
    check_chain(recipe)
    out = Path(out_dir)
    seeds = list(seeds if seeds is not None else recipe.study.seeds)
    evals = []
    fnet = None
    for k in seeds:
        r = recipe.with_seed(k)
        run_chain(r, out / f"seed{k}", progress=progress, log=log)
        if fnet is None:
            fnet = ensure_feature_net(r, load_data(r).info, progress=progress, log=log)
        evals.append(evaluate_chain(r, out / f"seed{k}", fnet, timing=timing, log=log))
    rep = write_report(recipe, evals, out, command=command, log=log)
    grid = sample_grid(recipe.with_seed(seeds[0]), out / f"seed{seeds[0]}", out / f"samples_seed{seeds[0]}.png")
    rep["figures"].append(str(grid))
    return rep


# ------------------------------------------------------------------------------ command entry points
def train_recipe(ref, overrides: Optional[list[str]] = None, *, out_dir=None, seed: Optional[int] = None,
                 restart: bool = False, progress: bool = True, log=print) -> dict:
    """``kdlab diffusion train``: a teacher recipe trains one run, a distill recipe its whole chain
    (default folder ``runs/<recipe name>/seed<k>``)."""
    recipe = load_diffusion_recipe(ref, overrides)
    if seed is not None:
        recipe = recipe.with_seed(seed)
    out = Path(out_dir) if out_dir else Path("runs") / recipe.name / f"seed{recipe.train.seed}"
    if recipe.distill is None:
        res = train_run(recipe, out, progress=progress, resume=not restart, log=log)
        log(f"{recipe.name} seed {recipe.train.seed}: test FD {res['test_fd']:.3f} ({recipe.sampler.steps} steps), "
            f"coverage {res['test_coverage']:.2f} bits  [{out}]")
        return res
    return run_chain(recipe, out, progress=progress, resume=not restart, log=log)


def study_recipe(ref, overrides: Optional[list[str]] = None, *, out_dir=None, seeds: Optional[list[int]] = None,
                 timing: bool = False, progress: bool = True, command: str = "", log=print) -> dict:
    """``kdlab diffusion study``: :func:`run_progressive_study` of a distill recipe (default folder
    ``runs/<recipe name>``)."""
    recipe = load_diffusion_recipe(ref, overrides)
    out = Path(out_dir) if out_dir else Path("runs") / recipe.name
    rep = run_progressive_study(recipe, out, seeds=seeds, timing=timing, progress=progress, command=command, log=log)
    log(f"table: {out / 'fd_vs_steps.md'}; figures: {', '.join(rep['figures'])}")
    return rep
