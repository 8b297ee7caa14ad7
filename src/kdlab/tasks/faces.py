"""``task: faces``: face verification and its distillation (docs/faces.md).

A faces recipe is an ordinary kdlab recipe with ``task: faces``: an identity data set
(``mnist-identities``, ``faces-folder``), embedding networks (:mod:`kdlab.models.faces`) and the
terms of :mod:`kdlab.distill.losses.faces` (``arcface``, ``cosface``, ``embed_kd``,
``adadistill``, ``qud``, ``quantface``). Runs are built by :func:`kdlab.train.build.build_run` and
trained by the one Trainer; what differs is the objective's evaluation: validation and test are
pair protocols scored by :mod:`kdlab.evaluate.verification` (10-fold accuracy selects the best
epoch), and no train accuracy is logged (embeddings have no classes).

A recipe with a ``quantface`` term is a QuantFace run: its student is a fake-quantised copy
(:func:`kdlab.compress.quantize.prepare_fake_quant`) of the full-precision teacher, calibrated on
and trained on synthetic images only (:func:`synthesize_identities`: BN-statistics inversion of
the full-precision model); before training, the calibrated copy is scored on the real pairs (the
post-training-quantisation baseline, ``ptq.json``).

Size (over 500 lines): the task plug-in, its verification objective and the QuantFace run
(calibration, synthetic images, fake-quantised student) share the recipe helpers here; the
QuantFace run is the candidate to move into its own module next.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from kdlab.tasks.base import Metric, Task, register_task

FACE_METRICS = (
    Metric("acc", "max", "%", 100.0, "verification accuracy"),
    Metric("eer", "min", "%", 100.0, "EER"),
    Metric("tar@far1e-3", "max", "%", 100.0, "TAR@FAR=1e-3"),
    Metric("tar@far1e-4", "max", "%", 100.0, "TAR@FAR=1e-4"),
)

#: the study ladder: method -> the shipped recipe whose ``loss`` it uses
LADDER = {"baseline": "faces/baseline", "embed_kd": "faces/embed_kd", "adadistill": "faces/adadistill",
          "qud": "faces/qud"}


class PairLoader:
    """A validation / test loader with its split's pair protocol (``pairs``: [P, 4])."""

    def __init__(self, loader, pairs: torch.Tensor, split: str):
        self.loader, self.pairs, self.split = loader, pairs, split

    def epoch(self, e: int):
        return self.loader.epoch(e)

    def __len__(self) -> int:
        return len(self.loader)


def faces_objective(base):
    """The faces objective of a built :class:`kdlab.train.objective.DistillObjective`: the same
    student, terms and teacher, with verification evaluation (see the module doc)."""
    from kdlab.train.objective import DistillObjective

    class FacesObjective(DistillObjective):
        monitor = ("acc", "max")

        def evaluate(self, name: str, loader) -> dict:
            from kdlab.evaluate.verification import evaluate_pairs

            if not isinstance(loader, PairLoader):
                raise ValueError("task faces evaluates on pair protocols (a PairLoader)")
            metrics, scores = evaluate_pairs(self.models()[name], loader, loader.pairs)
            self.scores[loader.split] = scores
            return metrics

        def step(self, batch, ctx):
            rec = self.record(batch, ctx.epoch, ctx.step)
            total, parts = self.losses(rec)
            logs = {"loss": total.detach(), **{k: v.detach() for k, v in parts.items()}, "n": rec.y.shape[0]}
            for _, _, t in self.terms:
                if hasattr(t, "last_alpha"):
                    logs["alpha"] = torch.tensor(t.last_alpha)
            return total, logs

    obj = FacesObjective.__new__(FacesObjective)
    obj.__dict__.update(base.__dict__)
    obj.scores = {}
    return obj


@dataclass
class FacesContext:
    """Shared by a study's runs: loaded splits (by data settings) and a teacher-output cache."""

    splits: dict = field(default_factory=dict)
    store: Any = None
    synthetic: dict = field(default_factory=dict)  # QuantFace's synthetic images, shared by bit widths

    def splits_of(self, recipe):
        from kdlab.train.build import load_splits

        key = repr((recipe.data.model_dump(), recipe.train.seed))
        if key not in self.splits:
            self.splits[key] = load_splits(recipe)
        return self.splits[key]


def quant_term(recipe):
    """The recipe's ``quantface`` term (built), or None."""
    from kdlab.distill.losses import build_terms

    for _, _, t in build_terms(recipe.loss):
        if t.name == "quantface":
            return t
    return None


@register_task("faces", "face verification: identity data, embedding networks, pair-protocol metrics")
class FacesTask(Task):
    metrics = FACE_METRICS
    select = "acc"
    primary = "acc"
    sample_unit = "images"

    # -- recipes -----------------------------------------------------------------------------------
    def load_recipe(self, ref, overrides=None):
        from kdlab.core.config import RecipeError
        from kdlab.train.recipe import load_recipe

        r = load_recipe(ref, overrides)
        if r.task != "faces":
            raise RecipeError(f"{r.source or ref}: task is {r.task!r}; a faces recipe says task: faces")
        return r

    def ablation_methods(self, recipe, mode: str = "ladder") -> dict:
        """baseline (ArcFace), embed_kd, adadistill, qud: the given recipe (data, student, teacher,
        training) with each method's loss terms (from the shipped ``faces/<method>`` recipes). The
        methods are alternatives, not cumulative components, so ``loo`` gives the same list."""
        out = {}
        for m, ref in LADDER.items():
            loss = self.load_recipe(ref).loss
            out[m] = recipe.derive(loss=loss, name=f"{recipe.name}-{m}")
        return out

    # -- runs ----------------------------------------------------------------------------------------
    def prepare_study(self, recipes: dict, out_dir, *, data_dir=None, progress: bool = True,
                      log: Callable = print) -> FacesContext:
        from kdlab.distill.teachers import TeacherStore

        ctx = FacesContext(store=TeacherStore(None))
        for r in recipes.values():
            self.ensure_teacher(r, context=ctx, progress=progress, log=log)
        return ctx

    def ensure_teacher(self, recipe, *, context=None, progress=True, log=print) -> Optional[str]:
        """Train the recipe's teacher (``teacher.recipe`` into ``teacher.checkpoint``'s folder) when
        its run is missing or unfinished; returns the checkpoint (None without a teacher)."""
        from kdlab.train.build import teacher_finished

        tc = recipe.teacher
        if tc is None or not recipe.needs_teacher():
            return None
        if not tc.checkpoint:
            raise ValueError("a faces recipe with a teacher needs teacher.checkpoint (and teacher.recipe to train it)")
        ck = Path(tc.checkpoint)
        if teacher_finished(ck):
            return str(ck)
        if not tc.recipe:
            raise FileNotFoundError(f"teacher checkpoint {ck} not found and the recipe names no teacher.recipe; "
                                    f"train it first (kdlab distill <teacher recipe> --out {ck.parent})")
        tr = self.load_recipe(tc.recipe)
        # the same identities as the student (a margin head's classes; the checkpoint records them)
        tr = tr.derive(data={**recipe.data.model_dump(mode="json"), "transfer": []})
        log(f"training teacher {tr.student.model} ({tr.name}) into {ck.parent.resolve()} (its checkpoint is missing "
            f"or its run unfinished)")
        res = self.train(tr, ck.parent, context=context, method="teacher", progress=progress)
        log(f"teacher: val acc {res['val_acc']:.4f}  test acc {res['test_acc']:.4f}  EER {res['test_eer']:.4f}")
        return str(ck)

    def train(self, recipe, run_dir, *, context=None, method: str = "", progress: bool = True,
              resume: bool = True) -> dict:
        from kdlab.core.io import read_json

        run_dir = Path(run_dir)
        if resume and (run_dir / "result.json").is_file():
            return read_json(run_dir / "result.json")
        ctx = context or FacesContext()
        if quant_term(recipe) is not None:
            return self.train_quantface(recipe, run_dir, context=ctx, method=method, progress=progress,
                                        resume=resume)
        from kdlab.train.build import build_run, with_extra_transfer

        splits = ctx.splits_of(recipe)
        if recipe.data.transfer:
            from kdlab.train.runtime import resolve_device

            splits = with_extra_transfer(recipe, splits, None, resolve_device(recipe.train.device))
        run = build_run(recipe, splits=splits, store=ctx.store if recipe.needs_teacher() else None)
        return self.fit_run(run, splits, run_dir, method=method or recipe.name, progress=progress, resume=resume)

    def fit_run(self, run, splits, run_dir, *, method: str, progress: bool, resume: bool) -> dict:
        """Fit a built run with verification evaluation; writes ``test_scores.json`` (the test
        pairs' scores and labels, for ROC curves) beside ``result.json``."""
        from kdlab.core.io import write_json
        from kdlab.train.build import trainer_for

        run.objective = faces_objective(run.objective)
        run.val_loader = PairLoader(run.val_loader, splits.val.pairs, "val")
        run.test_loader = PairLoader(run.test_loader, splits.test.pairs, "test")
        res = trainer_for(run, run_dir, progress=progress, method=method).fit(resume=resume)
        if "test" in run.objective.scores:
            p = splits.test.pairs
            write_json(Path(run_dir) / "test_scores.json",
                       {"scores": [round(float(s), 6) for s in run.objective.scores["test"]],
                        "same": p[:, 2].tolist(), "fold": p[:, 3].tolist()})
        return res

    # -- QuantFace -----------------------------------------------------------------------------------
    def train_quantface(self, recipe, run_dir, *, context, method: str, progress: bool, resume: bool) -> dict:
        from kdlab.compress.quantize import calibrate, fake_quant_config, prepare_fake_quant
        from kdlab.core.checkpoint import atomic_save, file_hash
        from kdlab.models.adapters import load_model
        from kdlab.core.io import write_json
        from kdlab.data.splits import Splits, TensorSet
        from kdlab.evaluate.verification import evaluate_pairs
        from kdlab.train.build import build_run, make_loaders, student_meta
        from kdlab.train.runtime import Runtime

        term = quant_term(recipe)
        if recipe.teacher is None or not recipe.teacher.checkpoint:
            raise ValueError("a quantface recipe needs teacher.checkpoint: the full-precision model it quantises")
        fp_path = Path(self.ensure_teacher(recipe, context=context, progress=progress) or recipe.teacher.checkpoint)
        splits = context.splits_of(recipe)
        info = splits.info
        runtime = Runtime.from_cfg(recipe.train)
        dev = runtime.device
        fp, ck = load_model(fp_path, dev)
        if ck["model_name"] != recipe.student.model or dict(ck.get("model_kwargs") or {}) != dict(recipe.student.kwargs):
            raise ValueError(f"QuantFace quantises the full-precision model itself: set student.model to "
                             f"{ck['model_name']} and student.kwargs to {ck.get('model_kwargs') or {}} (the teacher's)")
        run_dir.mkdir(parents=True, exist_ok=True)
        syn_path = run_dir / "synthetic.pt"
        # one synthetic set per (model, size, iterations, seed): bit widths of a study share it
        key = (file_hash(fp_path), term.n_synthetic, term.inversion_iters, term.synthetic_seed)
        if syn_path.is_file():
            x_syn = torch.load(syn_path, weights_only=True)
        elif key in context.synthetic:
            x_syn = context.synthetic[key]
        else:
            x_syn = synthesize_identities(fp, term.n_synthetic, info.input_shape, iters=term.inversion_iters,
                                          seed=term.synthetic_seed, mean=info.mean, std=info.std).cpu()
        context.synthetic[key] = x_syn
        if not syn_path.is_file():
            atomic_save(x_syn, syn_path)
        syn = Splits(train=TensorSet(x_syn, torch.zeros(len(x_syn), dtype=torch.int64)), val=splits.val,
                     test=splits.test, info=info)
        q = prepare_fake_quant(fp, term.weight_bits, term.act_bits)
        train_loader, val_loader, test_loader = make_loaders(recipe, syn, runtime, 0)
        calibrate(q, (b[0] for b in train_loader.epoch(0)), max_batches=term.calib_batches)
        ptq = {}
        for split, loader, s in (("val", val_loader, splits.val), ("test", test_loader, splits.test)):
            for name, model in (("fp", fp), ("ptq", q)):
                m, _ = evaluate_pairs(model, loader, s.pairs)
                ptq.update({f"{name}_{split}_{k}": v for k, v in m.items()})
        sizes = quantized_size(fp, term.weight_bits)
        write_json(run_dir / "ptq.json", {**ptq, **sizes, "weight_bits": term.weight_bits,
                                          "act_bits": term.act_bits, "n_synthetic": len(x_syn)})
        meta = {**student_meta(recipe, info), "quantized": fake_quant_config(q)}
        run = build_run(recipe, splits=syn, runtime=runtime, student=q, meta=meta)
        res = self.fit_run(run, syn, run_dir, method=method or recipe.name, progress=progress, resume=resume)
        return res

    # -- reports -------------------------------------------------------------------------------------
    def profile(self, recipe) -> dict:
        from kdlab.evaluate.efficiency import count_flops
        from kdlab.models.adapters import build_model

        shape = self.input_shape(recipe)
        m = build_model(recipe.student.model, 2, shape[0], recipe.student.kwargs, None)
        params = sum(p.numel() for p in m.parameters())
        out = {"params": int(params), "size_mb": params * 4 / 1e6,
               "macs": int(count_flops(m, (1, *shape))["macs"])}
        t = quant_term(recipe)
        if t is not None:
            out.update(quantized_size(m, t.weight_bits))
        return out

    @staticmethod
    def input_shape(recipe) -> tuple:
        hw = recipe.data.image_size or [28, 28]
        ch = 1 if recipe.data.name in ("mnist-identities",) else None
        if ch is None:
            from kdlab.data import load_dataset

            info = load_dataset(recipe.data.name, recipe.data.data_dir, **recipe.data.options()).info
            return info.input_shape
        return (ch, int(hw[0]), int(hw[1]))

    def teacher_result(self, recipes: dict) -> Optional[dict]:
        from kdlab.core.io import read_json

        for r in recipes.values():
            if r.teacher is not None and r.teacher.checkpoint:
                p = Path(r.teacher.checkpoint).parent / "result.json"
                if p.is_file():
                    return read_json(p)
        return None

    def figures(self, study_dir, rows: list, recipes: dict, log: Callable = print) -> list:
        """``roc.png``: the ROC of each method's lowest-seed run on the test pairs."""
        try:
            return [roc_of_study(study_dir, list(recipes) or None, log=log)]
        except FileNotFoundError as e:
            log(f"no ROC figure: {e}")
            return []

    def fit_one(self, recipe, out, *, progress: bool = True, resume: bool = True, log: Callable = print) -> dict:
        """``kdlab distill`` of a faces recipe: its teacher first when missing, then the run."""
        ctx = self.prepare_study({recipe.name: recipe}, Path(out).parent, progress=progress, log=log)
        return self.train(recipe, out, context=ctx, method=recipe.name, progress=progress, resume=resume)


def roc_of_study(study_dir, methods=None, log: Callable = print, out=None) -> Path:
    """The ROC figure of a study folder (``<method>/seed<k>/test_scores.json``)."""
    from kdlab.core.io import read_json
    from kdlab.evaluate.verification import roc_figure

    study_dir = Path(study_dir)
    curves = {}
    names = list(methods) if methods is not None else sorted(p.name for p in study_dir.iterdir() if p.is_dir())
    for d in (study_dir / n for n in names):
        seeds = sorted(d.glob("seed*/test_scores.json"), key=lambda p: int(p.parent.name[4:] or 0))
        if seeds:
            js = read_json(seeds[0])
            curves[f"{d.name} ({seeds[0].parent.name})"] = (np.asarray(js["scores"]), np.asarray(js["same"]))
    if not curves:
        raise FileNotFoundError(f"{study_dir} holds no <method>/seed<k>/test_scores.json; run the study first")
    path = roc_figure(curves, out or study_dir / "report" / "roc.png")
    log(f"ROC: {path}")
    return path


# --------------------------------------------------------------------------- QuantFace helpers
def quantized_size(model, weight_bits: int) -> dict:
    """Size of ``model`` with its conv / linear weights at ``weight_bits`` and everything else
    (biases, BatchNorm, PReLU) at 32 bits: ``size_mb_fp32`` and ``size_mb_q``."""
    from torch import nn

    q_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    total = sum(p.numel() for p in model.parameters())
    return {"size_mb_fp32": total * 4 / 1e6, "size_mb_q": (q_params * weight_bits / 8 + (total - q_params) * 4) / 1e6}


def synthesize_identities(model, n: int, shape, *, iters: int = 200, lr: float = 0.1, batch_size: int = 128,
                          a_bn: float = 1.0, a_tv: float = 1e-2, a_l2: float = 1e-4, a_div: float = 1.0,
                          seed: int = 0, mean=(0.0,), std=(1.0,)) -> torch.Tensor:
    """``n`` synthetic images ``[n, *shape]`` in [0, 1] from a frozen embedding network: DeepInversion
    (Yin et al., CVPR 2020) without a class term (an embedding network has no classes): inputs
    start as Gaussian noise in the normalised space and Adam minimises

        α_bn · Σ_l (‖μ_l(x̂) − μ_l^BN‖₂ + ‖σ²_l(x̂) − σ²_l^BN‖₂) + α_tv · R_TV(x̂) + α_l2 · mean(x̂²)
        + α_div · mean_{i≠j} cos(f(x̂_i), f(x̂_j))

    where the last term keeps the batch's embeddings apart (distinct synthetic identities)."""
    from kdlab.core.seeding import derive_seed
    from kdlab.distill.inversion import BNStatHook, tv_prior

    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(derive_seed(seed, "quantface-synthesis"))
    hook = BNStatHook(model)
    m = torch.tensor(mean, device=dev).view(1, -1, 1, 1)
    s = torch.tensor(std, device=dev).view(1, -1, 1, 1)
    out = []
    try:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            x = torch.randn(b, *shape, generator=g).to(dev).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            for _ in range(iters):
                opt.zero_grad(set_to_none=True)
                e = F.normalize(model(x), dim=1)
                sim = e @ e.t()
                div = (sim.sum() - sim.diagonal().sum()) / max(b * (b - 1), 1)
                loss = a_bn * hook.pop() + a_tv * tv_prior(x) + a_l2 * x.pow(2).mean() + a_div * div
                loss.backward()
                opt.step()
            hook.terms = []
            out.append((x.detach() * s + m).clamp(0, 1))
    finally:
        hook.close()
    return torch.cat(out)


def quantface_table(study_dir, methods=("quantface_w6a6", "quantface_w4a4")) -> list[dict]:
    """Rows of the QuantFace table from a folder ``<method>/seed<k>/{result,ptq}.json``: the
    full-precision model, PTQ (calibrated on the synthetic images, no training) and QuantFace, per
    bit width, as mean ± sd over seeds of the test metrics, with the model sizes."""
    from kdlab.core.io import read_json

    study_dir = Path(study_dir)
    rows, fp_done = [], False
    for meth in methods:
        runs = sorted((study_dir / meth).glob("seed*/result.json"))
        if not runs:
            continue
        res = [read_json(p) for p in runs]
        ptq = [read_json(p.parent / "ptq.json") for p in runs]
        wb, ab = ptq[0]["weight_bits"], ptq[0]["act_bits"]

        def stat(vals):
            v = np.asarray(vals, dtype=float)
            return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0

        def row(label, prefix_of, size, bits):
            r = {"model": label, "bits": bits, "size_mb": size, "n": len(runs)}
            for m in FACE_METRICS:
                r[m.name] = stat([prefix_of(k, m.name) for k in range(len(runs))])
            return r

        if not fp_done:
            rows.append(row("full precision", lambda k, n: ptq[k][f"fp_test_{n}"], ptq[0]["size_mb_fp32"], "w32a32"))
            fp_done = True
        rows.append(row(f"PTQ w{wb}a{ab}", lambda k, n: ptq[k][f"ptq_test_{n}"], ptq[0]["size_mb_q"], f"w{wb}a{ab}"))
        rows.append(row(f"QuantFace w{wb}a{ab}", lambda k, n: res[k][f"test_{n}"], ptq[0]["size_mb_q"], f"w{wb}a{ab}"))
    return rows


# --------------------------------------------------------------------------- the study (until the generic one)
def run_faces_study(out_dir, *, recipe: str = "faces/ladder", seeds=(0, 1, 2), overrides=(),
                    methods: Optional[list] = None, progress: bool = False, log: Callable = print) -> dict:
    """Train every method of the faces ladder (baseline, embed_kd, adadistill, qud) for each seed
    into ``<out>/<method>/seed<k>/`` (the teacher first, into ``<out>/teacher/`` unless the
    overrides name another ``teacher.checkpoint``), then write the paired table and the ROC figure
    (:func:`faces_study_report`). Finished runs are reused."""
    out_dir = Path(out_dir)
    task = FacesTask()
    ov = [f"teacher.checkpoint={out_dir / 'teacher' / 'best.pt'}", *overrides]
    base = task.load_recipe(recipe, ov)
    ladder = task.ablation_methods(base)
    if methods:
        ladder = {m: r for m, r in ladder.items() if m in methods}
    ctx = task.prepare_study(ladder, out_dir, progress=progress, log=log)
    for k in seeds:
        for m, r in ladder.items():
            res = task.train(r.with_seed(k), out_dir / m / f"seed{k}", context=ctx, method=m, progress=progress)
            log(f"{m} seed {k}: test acc {res['test_acc']:.4f}  EER {res['test_eer']:.4f}  "
                f"TAR@FAR1e-3 {res['test_tar@far1e-3']:.4f}")
    return faces_study_report(out_dir, ladder, log=log)


def faces_study_report(out_dir, recipes: dict, *, baseline: str = "baseline", log: Callable = print) -> dict:
    """``<out>/report/table.{md,json}``: per method mean ± sd over seeds of the test verification
    accuracy, EER and TAR@FAR=1e-3 (and 1e-4), the paired difference to ``baseline`` with its
    paired t-test p (:func:`kdlab.report.statistics.paired_test`) and Holm-adjusted p over the
    methods (:func:`kdlab.report.statistics.holm`), the student's params and MACs; and
    ``report/roc.png``."""
    from kdlab.core.io import atomic_write_text, read_json, write_json
    from kdlab.report.statistics import fmt_p, holm, paired_test

    out_dir = Path(out_dir)
    task = FacesTask()
    runs = {m: {int(p.parent.name[4:]): read_json(p) for p in (out_dir / m).glob("seed*/result.json")}
            for m in recipes}
    runs = {m: v for m, v in runs.items() if v}
    if baseline not in runs:
        raise FileNotFoundError(f"{out_dir}/{baseline} has no finished run; run the study first")
    shown = [m for m in FACE_METRICS if m.name != "tar@far1e-4"] + [task.metric("tar@far1e-4")]
    rows = []
    for meth, by_seed in runs.items():
        prof = task.profile(recipes[meth])
        row = {"method": meth, "seeds": sorted(by_seed), "params": prof["params"], "macs": prof["macs"]}
        for met in shown:
            v = np.asarray([by_seed[k][f"test_{met.name}"] for k in sorted(by_seed)], dtype=float)
            row[met.name] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
            if meth != baseline:
                pr = paired_test({k: r[f"test_{met.name}"] for k, r in by_seed.items()},
                                 {k: r[f"test_{met.name}"] for k, r in runs[baseline].items()})
                row[met.name].update({"delta": float(pr["mean"]), "p": float(pr["p_ttest"])})
        rows.append(row)
    for met in shown:  # Holm over the methods compared with the baseline, per metric
        others = [r for r in rows if r["method"] != baseline]
        for r, ph in zip(others, holm([r[met.name]["p"] for r in others])):
            r[met.name]["p_holm"] = float(ph)
    teacher = task.teacher_result(recipes)
    write_json(out_dir / "report" / "table.json", {"rows": rows, "teacher": teacher})
    head = ["method", "n"] + [f"{m.title} (%)" for m in shown] + \
        [f"Δ {m.title} (pp), Holm p" for m in shown[:3]] + ["params", "MACs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], str(len(r["seeds"]))]
        cells += [f"{100 * r[m.name]['mean']:.2f} ± {100 * r[m.name]['sd']:.2f}" for m in shown]
        for m in shown[:3]:
            d = r[m.name]
            cells.append("—" if "delta" not in d else f"{100 * d['delta']:+.2f}, {fmt_p(d['p_holm'])}")
        cells += [f"{r['params']:,}", f"{r['macs'] / 1e6:.2f} M"]
        lines.append("| " + " | ".join(cells) + " |")
    if teacher:
        lines.append("")
        lines.append(f"teacher (one run): verification accuracy {100 * teacher['test_acc']:.2f}%, EER "
                     f"{100 * teacher['test_eer']:.2f}%, TAR@FAR=1e-3 {100 * teacher['test_tar@far1e-3']:.2f}%")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out_dir / "report" / "table.md", text)
    log(text)
    roc_of_study(out_dir, list(runs), log=log)
    return {"rows": rows, "table": text}


def run_quantface_study(out_dir, *, recipes=("faces/quantface_w6a6", "faces/quantface_w4a4"), seeds=(0, 1, 2),
                        overrides=(), progress: bool = False, log: Callable = print) -> list:
    """QuantFace runs ``<out>/<method>/seed<k>/`` for each recipe and seed, then
    ``<out>/report/quantface.{md,json}`` (:func:`quantface_table`)."""
    from kdlab.core.io import atomic_write_text, write_json

    out_dir = Path(out_dir)
    task = FacesTask()
    ctx = FacesContext()
    names = []
    for ref in recipes:
        r = task.load_recipe(ref, list(overrides))
        name = Path(ref).name
        names.append(name)
        for k in seeds:
            res = task.train(r.with_seed(k), out_dir / name / f"seed{k}", context=ctx, method=name, progress=progress)
            log(f"{name} seed {k}: test acc {res['test_acc']:.4f}")
    rows = quantface_table(out_dir, names)
    write_json(out_dir / "report" / "quantface.json", rows)
    head = ["model", "bits", "size (MB)", "n"] + [f"{m.title} (%)" for m in FACE_METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["model"], r["bits"], f"{r['size_mb']:.3f}", str(r["n"])]
                                       + [f"{100 * r[m.name][0]:.2f} ± {100 * r[m.name][1]:.2f}"
                                          for m in FACE_METRICS]) + " |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out_dir / "report" / "quantface.md", text)
    log(text)
    return rows
