"""Robustness to common corruptions (CIFAR-10-C style): accuracies, mCA, mCE, relative mCE.

Metrics (Hendrycks & Dietterich, ICLR 2019), with errors ``E = 1 - accuracy``:

- clean accuracy, and accuracy per corruption ``c`` x severity ``s``;
- mean corruption accuracy ``mCA = mean_{c,s} acc_{s,c}``;
- corruption error against a reference model ``ref`` (here: the baseline student)
  ``CE_c = sum_s E_{s,c} / sum_s E^ref_{s,c}``, and ``mCE = mean_c CE_c``;
- relative corruption error
  ``relCE_c = sum_s (E_{s,c} - E_clean) / sum_s (E^ref_{s,c} - E^ref_clean)``,
  ``relative mCE = mean_c relCE_c``.

**Which corruptions are averaged.** As published, mCA, mCE and relative mCE average the **15
standard corruptions** only; the 4 extra ones (speckle_noise, gaussian_blur, spatter, saturate,
held out for validation in the paper) -- and any corruption registered later with
``group="extra"`` -- are averaged separately into ``mCA_extra`` / ``mCE_extra`` /
``rel_mCE_extra``. ``*_all`` averages everything evaluated (kdlab's numbers before the split).

**Guard on relative mCE.** A corruption enters the relative mCE only if the reference's error
rises by at least ``REL_MCE_MIN_DEGRADATION`` = 1 percentage point on average over the
severities, ``mean_s (E^ref_{s,c} - E^ref_clean) >= 0.01``; below that the denominator is
noise (it can be ~0 or negative, and one corruption then dominates the mean). Skipped
corruptions are listed (``rel_mCE_skipped``) with the reference's degradation
(``ref_degradation``); their ``relCE_c`` is still reported.

CE and relative CE are ratios (the reference scores 1, i.e. 100%); a zero denominator gives NaN
(written as ``null`` in JSON). ``evaluate_robustness`` corrupts the test set on the fly with
`kdlab.data.corruptions.corrupt` (or reads the published CIFAR-10-C arrays), normalises with the
data set's mean/std *after* corrupting, and writes ``robustness.csv`` (long form),
``robustness.json``, ``robustness.md`` and ``robustness_heatmap.png``. ``study_robustness`` does
this for every (method, seed) of a finished study and adds the columns to its table.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from kdlab.core.io import atomic_write_text, read_json, write_csv
from kdlab.data.corruptions import (
    SEVERITIES,
    STANDARD_CORRUPTIONS,
    CorruptedSet,
    check_severity,
    load_cifar10c,
    parse_corruptions,
)

Acc = Mapping[str, Mapping[int, float]]  # corruption -> severity -> accuracy (or error)

#: relative mCE skips a corruption whose reference error rises by less than this (mean over
#: severities, as a fraction: 0.01 = 1 percentage point) above the reference's clean error
REL_MCE_MIN_DEGRADATION = 0.01


# ---------------------------------------------------------------------------------------------
# metrics (pure functions of accuracies / errors)


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den != 0 else float("nan")


def _mean(values) -> float:
    values = [float(v) for v in values]
    return float(np.mean(values)) if values else float("nan")


def split_standard(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """``(standard, extra)``: the names among the 15 standard corruptions (in the given order)
    and all the others."""
    names = list(names)
    return ([c for c in names if c in STANDARD_CORRUPTIONS],
            [c for c in names if c not in STANDARD_CORRUPTIONS])


def mean_corruption_accuracy(acc: Acc) -> float:
    """``mCA``: mean of ``acc[c][s]`` over every corruption and severity given."""
    return _mean(a for per_s in acc.values() for a in per_s.values())


def corruption_errors(err: Acc, ref_err: Acc) -> dict[str, float]:
    """``CE_c = sum_s err[c][s] / sum_s ref_err[c][s]`` for each corruption of ``err``."""
    out = {}
    for c, per_s in err.items():
        num = sum(float(per_s[s]) for s in per_s)
        den = sum(float(ref_err[c][s]) for s in per_s)
        out[c] = _ratio(num, den)
    return out


def mean_corruption_error(err: Acc, ref_err: Acc) -> float:
    """``mCE``: mean over the corruptions of ``err`` of `corruption_errors` (NaN if any CE is
    undefined). Pass the 15 standard corruptions for the published mCE (`robustness_metrics`
    does, see `split_standard`)."""
    return _mean(corruption_errors(err, ref_err).values())


def relative_corruption_errors(err: Acc, clean_err: float, ref_err: Acc,
                               ref_clean_err: float) -> dict[str, float]:
    """``relCE_c = sum_s (err[c][s] - clean_err) / sum_s (ref_err[c][s] - ref_clean_err)``."""
    out = {}
    for c, per_s in err.items():
        num = sum(float(per_s[s]) - clean_err for s in per_s)
        den = sum(float(ref_err[c][s]) - ref_clean_err for s in per_s)
        out[c] = _ratio(num, den)
    return out


def reference_degradation(ref_err: Acc, ref_clean_err: float) -> dict[str, float]:
    """``mean_s (ref_err[c][s] - ref_clean_err)`` per corruption: how much the reference's error
    rises under ``c`` (the denominator of relative CE divided by the number of severities)."""
    return {c: _mean(float(e) - ref_clean_err for e in per_s.values())
            for c, per_s in ref_err.items()}


def relative_mce_skipped(ref_err: Acc, ref_clean_err: float,
                         min_degradation: float | None = REL_MCE_MIN_DEGRADATION) -> list[str]:
    """Corruptions left out of the relative mCE: those whose `reference_degradation` is below
    ``min_degradation`` (None: none are left out)."""
    if min_degradation is None:
        return []
    deg = reference_degradation(ref_err, ref_clean_err)
    return [c for c, d in deg.items() if not d >= min_degradation]


def relative_mean_corruption_error(err: Acc, clean_err: float, ref_err: Acc,
                                   ref_clean_err: float, *,
                                   min_degradation: float | None = REL_MCE_MIN_DEGRADATION
                                   ) -> float:
    """Relative mCE: mean of `relative_corruption_errors` over the corruptions of ``err`` whose
    reference degradation is at least ``min_degradation`` (see `relative_mce_skipped`; NaN when
    every corruption is skipped; ``min_degradation=None`` averages them all, unguarded)."""
    rce = relative_corruption_errors(err, clean_err, ref_err, ref_clean_err)
    skip = set(relative_mce_skipped({c: ref_err[c] for c in err}, ref_clean_err,
                                    min_degradation))
    return _mean(v for c, v in rce.items() if c not in skip)


def to_errors(acc: Acc) -> dict[str, dict[int, float]]:
    return {c: {s: 1.0 - float(a) for s, a in per_s.items()} for c, per_s in acc.items()}


def robustness_metrics(clean_acc: Mapping[str, float], acc: Mapping[str, Acc],
                       reference: str, *,
                       min_degradation: float | None = REL_MCE_MIN_DEGRADATION
                       ) -> dict[str, dict]:
    """All metrics for each model.

    ``clean_acc``; ``mCA``, ``mCE``, ``rel_mCE`` over the standard corruptions evaluated (the
    published numbers); ``mCA_extra``, ``mCE_extra``, ``rel_mCE_extra`` over the others;
    ``mCA_all``, ``mCE_all``, ``rel_mCE_all`` over all; ``CE`` and ``rel_CE`` per corruption
    (relCE unguarded), ``acc_by_corruption`` (mean over severities), ``ref_degradation`` and
    ``rel_mCE_skipped`` (the guard, see `relative_mce_skipped`), ``n_standard``, ``n_extra``.
    """
    if reference not in acc:
        raise KeyError(f"reference model {reference!r} is not among the evaluated models "
                       f"({', '.join(acc)}); pass one of them")
    ref_err = to_errors(acc[reference])
    ref_clean_err = 1.0 - float(clean_acc[reference])
    deg = reference_degradation(ref_err, ref_clean_err)
    skipped = relative_mce_skipped(ref_err, ref_clean_err, min_degradation)
    out = {}
    for name, a in acc.items():
        err = to_errors(a)
        clean_err = 1.0 - float(clean_acc[name])
        ce = corruption_errors(err, ref_err)
        rce = relative_corruption_errors(err, clean_err, ref_err, ref_clean_err)
        std, extra = split_standard(a)
        row = {"clean_acc": float(clean_acc[name])}
        for suffix, group in (("", std), ("_extra", extra), ("_all", std + extra)):
            row["mCA" + suffix] = mean_corruption_accuracy({c: a[c] for c in group})
            row["mCE" + suffix] = _mean(ce[c] for c in group)
            row["rel_mCE" + suffix] = _mean(rce[c] for c in group if c not in skipped)
        row.update({
            "n_standard": len(std),
            "n_extra": len(extra),
            "acc_by_corruption": {c: _mean(per_s.values()) for c, per_s in a.items()},
            "CE": ce,
            "rel_CE": rce,
            "ref_degradation": deg,
            "rel_mCE_skipped": list(skipped),
            "rel_mCE_min_degradation": min_degradation,
        })
        out[name] = row
    return out


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class RobustnessResults:
    """Accuracies of several models on clean and corrupted test images, plus the metrics."""

    models: list[str]
    corruptions: list[str]
    severities: list[int]
    reference: str
    clean_acc: dict[str, float]
    acc: dict[str, dict[str, dict[int, float]]]  # model -> corruption -> severity -> acc
    n_images: int = 0
    seed: int = 0
    source: str = "on-the-fly"
    settings: dict = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, dict]:
        return robustness_metrics(self.clean_acc, self.acc, self.reference)

    def column(self, metric: str = "mCA") -> dict[str, float]:
        """One number per model (``clean_acc``, ``mCA``, ``mCE``, ``rel_mCE``, their ``_extra``
        / ``_all`` forms), e.g. for the study report's robustness column."""
        return {m: v[metric] for m, v in self.metrics.items()}

    def rows(self) -> list[dict]:
        """Long form: one row per (model, corruption, severity); clean rows have
        ``corruption="clean", severity=0``."""
        rows = []
        for m in self.models:
            rows.append({"model": m, "corruption": "clean", "severity": 0,
                         "acc": self.clean_acc[m]})
            for c in self.corruptions:
                for s in self.severities:
                    rows.append({"model": m, "corruption": c, "severity": s,
                                 "acc": self.acc[m][c][s]})
        return rows

    def summary(self) -> dict:
        met = self.metrics
        return {
            "reference": self.reference,
            "seed": self.seed,
            "source": self.source,
            "n_images": self.n_images,
            "corruptions": list(self.corruptions),
            "severities": list(self.severities),
            "settings": self.settings,
            "models": {m: {**met[m], "acc": {c: {str(s): a for s, a in per_s.items()}
                                             for c, per_s in self.acc[m].items()}}
                       for m in self.models},
        }

    def markdown(self) -> str:
        return robustness_markdown(self)

    def heatmap(self, path) -> Path:
        met = self.metrics
        return robustness_heatmap(
            {m: met[m]["acc_by_corruption"] for m in self.models}, path,
            clean={m: met[m]["clean_acc"] for m in self.models},
            title=f"accuracy (%) under corruption, mean over severities {self._sev_label()}")

    def _sev_label(self) -> str:
        return ",".join(map(str, self.severities))

    def write(self, out_dir) -> dict[str, Path]:
        """Write ``robustness.csv``, ``.json``, ``.md`` and ``robustness_heatmap.png``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {k: out / f"robustness.{k}" for k in ("csv", "json", "md")}
        write_csv(paths["csv"], [{**r, "acc": f"{r['acc']:.6f}"} for r in self.rows()],
                  ["model", "corruption", "severity", "acc"])
        atomic_write_text(paths["json"], json.dumps(_jsonable(self.summary()), indent=2) + "\n")
        atomic_write_text(paths["md"], self.markdown())
        paths["png"] = self.heatmap(out / "robustness_heatmap.png")
        return paths


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _pct(v: float, digits: int = 2) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.{digits}f}"


def metrics_footer(reference: str, n_standard: int, extra: Sequence[str],
                   skipped: Mapping[str, float] | None = None,
                   min_degradation: float | None = REL_MCE_MIN_DEGRADATION) -> str:
    """The note under a robustness table: what mCA / mCE / rel. mCE average, where the extra
    corruptions went, and which corruptions the relative-mCE guard skipped (``skipped``:
    corruption -> the reference's degradation, or a count of seeds)."""
    which = ("the 15 standard corruptions" if n_standard == len(STANDARD_CORRUPTIONS) else
             f"the {n_standard} of the 15 standard corruptions that were evaluated")
    parts = [f"mCA, mCE and rel. mCE average {which} (Hendrycks & Dietterich, ICLR 2019); "
             f"mCE and rel. mCE are in % of `{reference}`."]
    if extra:
        many = len(extra) != 1
        parts.append(f"The {len(extra)} extra corruption{'s' if many else ''} "
                     f"({', '.join(extra)}) {'are' if many else 'is'} held out, as published, "
                     f"and averaged separately (\"extra\" columns).")
    if min_degradation is not None:
        note = (f"rel. mCE leaves out corruptions where the reference's error rises by less than "
                f"{100 * min_degradation:g} pp on average over severities")
        if skipped:
            items = [f"{c} ({v:+.2f} pp)" if isinstance(v, float) else f"{c} ({v})"
                     for c, v in skipped.items()]
            note += ": " + ", ".join(items)
        else:
            note += " (none here)"
        parts.append(note + ".")
    return " ".join(parts)


def robustness_markdown(res: RobustnessResults) -> str:
    met = res.metrics
    _, extra = split_standard(res.corruptions)
    has_extra = bool(extra)
    head = "| model | clean acc | mCA | mCE | rel. mCE |"
    rule = "|---|---:|---:|---:|---:|"
    if has_extra:
        head += " mCA extra | mCE extra | rel. mCE extra |"
        rule += "---:|---:|---:|"
    lines = [
        f"Robustness on {res.n_images} test images ({res.source}, seed {res.seed}, severities "
        f"{res._sev_label()}, {len(res.corruptions)} corruptions). Accuracies in %; mCE and "
        f"relative mCE in % of the reference `{res.reference}`.",
        "",
        head,
        rule,
    ]
    for m in res.models:
        v = met[m]
        ref = " (ref)" if m == res.reference else ""
        line = (f"| {m}{ref} | {_pct(v['clean_acc'])} | {_pct(v['mCA'])} | "
                f"{_pct(v['mCE'], 1)} | {_pct(v['rel_mCE'], 1)} |")
        if has_extra:
            line += (f" {_pct(v['mCA_extra'])} | {_pct(v['mCE_extra'], 1)} | "
                     f"{_pct(v['rel_mCE_extra'], 1)} |")
        lines.append(line)
    ref_m = met[res.reference]
    skipped = {c: 100 * ref_m["ref_degradation"][c] for c in ref_m["rel_mCE_skipped"]}
    n_std = ref_m["n_standard"]
    lines += ["", metrics_footer(res.reference, n_std, extra, skipped,
                                 ref_m["rel_mCE_min_degradation"])]
    lines += ["", "Accuracy (%) per corruption, mean over severities:", "",
              "| corruption | " + " | ".join(res.models) + " |",
              "|---|" + "---:|" * len(res.models)]
    for c in res.corruptions:
        lines.append(f"| {c} | " + " | ".join(_pct(met[m]["acc_by_corruption"][c])
                                             for m in res.models) + " |")
    lines += ["", f"Corruption error CE (% of `{res.reference}`):", "",
              "| corruption | " + " | ".join(res.models) + " |",
              "|---|" + "---:|" * len(res.models)]
    for c in res.corruptions:
        lines.append(f"| {c} | " + " | ".join(_pct(met[m]["CE"][c], 1) for m in res.models)
                     + " |")
    return "\n".join(lines) + "\n"


def robustness_heatmap(acc_by_corruption: Mapping[str, Mapping[str, float]], path, *,
                       clean: Mapping[str, float] | None = None, title: str | None = None,
                       spread: Mapping[str, Mapping[str, float]] | None = None) -> Path:
    """Heat map, corruptions (rows) x models or methods (columns), of accuracies in [0, 1]
    (e.g. the mean over severities), annotated in %; a ``clean`` row on top and, at the bottom,
    an ``mCA`` row (mean over the standard corruptions) and, when extra corruptions are shown,
    a ``mean extra`` row. The colour scale is fixed to 0-100%. ``spread`` (same keys, e.g. the
    sd over seeds) is printed under each value. Usable by the study report with method names as
    keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(acc_by_corruption)
    corrs = list(next(iter(acc_by_corruption.values()))) if models else []
    std, extra = split_standard(corrs)
    rows, labels, sds = [], [], []
    if clean is not None:
        rows.append([clean[m] for m in models])
        labels.append("clean")
        sds.append([np.nan] * len(models))
    for c in corrs:
        rows.append([acc_by_corruption[m][c] for m in models])
        labels.append(c)
        sds.append([spread[m][c] if spread is not None else np.nan for m in models])
    summary_rows = [("mCA (standard)" if extra else "mean (mCA)", std)] if std else []
    if extra:
        summary_rows.append(("mean extra", extra))
    if not std and not extra:
        summary_rows = [("mean (mCA)", [])]
    for label, group in summary_rows:
        rows.append([float(np.mean([acc_by_corruption[m][c] for c in group])) if group
                     else np.nan for m in models])
        labels.append(label)
        sds.append([np.nan] * len(models))
    a = 100 * np.asarray(rows, dtype=np.float64)
    e = 100 * np.asarray(sds, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * max(1, len(models)), 1.2 + 0.32 * len(labels)))
    im = ax.imshow(a, aspect="auto", cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            txt = "n/a" if not np.isfinite(a[i, j]) else f"{a[i, j]:.1f}"
            if np.isfinite(e[i, j]):
                txt += f"\n±{e[i, j]:.1f}"
            ax.text(j, i, txt, ha="center", va="center", fontsize=6 if np.isfinite(e[i, j]) else 7,
                    color="black" if np.isfinite(a[i, j]) and a[i, j] > 50 else "white")
    if clean is not None:
        ax.axhline(0.5, color="white", lw=1.5)
    ax.axhline(len(labels) - len(summary_rows) - 0.5, color="white", lw=1.5)
    if std and extra and corrs[:len(std)] == std:  # standard rows first: mark where extras begin
        ax.axhline((1 if clean is not None else 0) + len(std) - 0.5, color="white", lw=0.8,
                   ls="--")
    fig.colorbar(im, ax=ax, label="accuracy (%)", fraction=0.05)
    if title:
        import textwrap

        ax.set_title(textwrap.fill(title, width=max(28, int(12 * fig.get_size_inches()[0]))),
                     fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# evaluation


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return (x - m) / s


def evaluate_robustness(
    models: Mapping[str, nn.Module],
    testset,
    info,
    corruptions: str | Sequence[str] | None = "all",
    severities: Iterable[int] = SEVERITIES,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    *,
    reference: str | None = None,
    out_dir=None,
    cifar_c_dir=None,
    progress: bool = False,
) -> RobustnessResults:
    """Accuracy of every model on ``testset`` (a `TensorSet`, x in [0, 1]) clean and under each
    corruption x severity; returns `RobustnessResults` (and writes them to ``out_dir``).

    Each batch is corrupted once (seeded by ``seed``, per image by its position in
    ``testset``) and fed to all models, after normalising with ``info.mean`` / ``info.std``.
    ``reference`` (default: the first model) is the model CE / mCE are relative to -- the
    baseline student in a study. With ``cifar_c_dir`` the corrupted images are read from the
    published CIFAR-10-C ``.npy`` files there instead (``testset`` then supplies the clean
    accuracy and must be the CIFAR-10 test set in its order, or its first images: the same
    number of corrupted images is used).
    """
    from tqdm.auto import tqdm

    if not models:
        raise ValueError("evaluate_robustness needs at least one model")
    names = list(models)
    reference = names[0] if reference is None else reference
    if reference not in models:
        raise KeyError(f"reference {reference!r} is not one of the models ({', '.join(names)}); "
                       f"pass one of them")
    corrs = parse_corruptions(corruptions)
    sevs = [check_severity(s) for s in severities]
    if not corrs or not sevs:
        raise ValueError("give at least one corruption and one severity")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(testset)
    if n == 0:
        raise ValueError("the test set is empty")
    if testset.x.shape[1] != len(info.mean):
        raise ValueError(f"test images have {testset.x.shape[1]} channels but {info.name}'s "
                         f"mean has {len(info.mean)} values; pass the matching dataset info")
    for m in models.values():
        m.to(device).eval()

    def sources():
        yield "clean", 0, None
        for c in corrs:
            for s in sevs:
                yield c, s, (load_cifar10c(cifar_c_dir, c, s) if cifar_c_dir is not None
                             else CorruptedSet(testset, c, s, seed))

    n_batches = math.ceil(n / batch_size)
    total = n_batches * (1 + len(corrs) * len(sevs))
    bar = tqdm(total=total, disable=not progress, desc="robustness", unit="batch",
               dynamic_ncols=True)
    clean_acc: dict[str, float] = {}
    acc: dict[str, dict[str, dict[int, float]]] = {m: {c: {} for c in corrs} for m in names}
    with torch.inference_mode():
        for c, s, src in sources():
            bar.set_postfix_str(c if s == 0 else f"{c} s{s}")
            if src is None:
                batches = ((testset.x[i:i + batch_size], testset.y[i:i + batch_size])
                           for i in range(0, n, batch_size))
                count = n
            elif isinstance(src, CorruptedSet):
                batches, count = src.batches(batch_size), len(src)
            else:  # published arrays: the CIFAR-10 test images in order; use the first n
                if len(src) < n or not torch.equal(src.y[:n], testset.y.cpu()):
                    raise ValueError(
                        f"the CIFAR-10-C labels in {cifar_c_dir} do not match the test set's "
                        f"first {n} labels; evaluate the CIFAR-10 test set (in its order)")
                batches = ((src.x[i:min(i + batch_size, n)], src.y[i:min(i + batch_size, n)])
                           for i in range(0, n, batch_size))
                count = n
            correct = dict.fromkeys(names, 0)
            for xb, yb in batches:
                xb = _normalise(xb.to(device, torch.float32), info.mean, info.std)
                yb = yb.to(device)
                for m in names:
                    correct[m] += int((models[m](xb).argmax(1) == yb).sum())
                bar.update(1)
            for m in names:
                if s == 0:
                    clean_acc[m] = correct[m] / count
                else:
                    acc[m][c][s] = correct[m] / count
    bar.close()
    res = RobustnessResults(
        models=names, corruptions=corrs, severities=sevs, reference=reference,
        clean_acc=clean_acc, acc=acc, n_images=n, seed=int(seed),
        source="CIFAR-10-C files" if cifar_c_dir is not None else "on-the-fly",
        settings={"batch_size": batch_size,
                  "cifar_c_dir": str(cifar_c_dir) if cifar_c_dir else None,
                  "dataset": getattr(info, "name", None)},
    )
    if out_dir is not None:
        res.write(out_dir)
    return res




# ---------------------------------------------------------------------------------------------
# a finished study

STUDY_METRICS = ("mCA", "mCE", "rel_mCE", "mCA_extra", "mCE_extra", "rel_mCE_extra",
                 "mCA_all", "mCE_all", "rel_mCE_all")


def aggregate_over_seeds(values: Sequence[float]) -> tuple[float, float, float]:
    """``(mean, sample sd, 95% t half-width)`` of the finite per-seed values (sd and the
    half-width are NaN below 2 values); `kdlab.report.tables.mean_sd_ci`."""
    from kdlab.report.tables import mean_sd_ci

    return mean_sd_ci([v for v in values if v is not None and math.isfinite(v)])


def study_robustness_markdown(stats: Sequence[Mapping], baseline: str, n_seeds: int,
                              extra: Sequence[str], n_standard: int) -> str:
    """The study's robustness table (one row per method, mean ± sd over seeds) and its note."""
    from kdlab.report.tables import fmt_pct, markdown_table

    has_extra = bool(extra)
    head = ["method", "seeds", "mCA % (mean ± sd)", "mCE %", "rel. mCE %"]
    if has_extra:
        head += ["mCA extra %", "mCE extra %", "rel. mCE extra %"]
    rows = []
    keys = ("mCA", "mCE", "rel_mCE") + (("mCA_extra", "mCE_extra", "rel_mCE_extra")
                                        if has_extra else ())
    for r in stats:
        if "mCA" not in r:
            continue
        cells = [r["method"], r.get("n_robust_seeds", "—")]
        cells += [fmt_pct(r.get(k), r.get(k + "_sd"), 1 if "CE" in k else 2) for k in keys]
        rows.append(cells)
    skipped: dict[str, str] = {}
    for r in stats:
        for c, n in (r.get("rel_mCE_skipped") or {}).items():
            skipped[c] = f"{n} of {n_seeds} seed{'s' if n_seeds != 1 else ''}"
    note = metrics_footer(baseline, n_standard, extra, skipped) + (
        f" ± is the sd over seeds; each seed's reference is '{baseline}' of the same seed.")
    return markdown_table(head, rows) + "\n\n" + note + "\n"


def study_robustness(study_dir, *, corruptions="all", severities=(1, 2, 3, 4, 5), seed: int = 0,
                     batch_size: int = 256, device: str = "cpu", data_dir=None, limit=None,
                     progress: bool = True, log=print) -> dict:
    """Robustness of every (method, seed) student of a finished study.

    For each study seed the methods' best checkpoints are evaluated on the same corrupted test
    images (corruption draws seeded by ``seed``), with CE / mCE relative to the baseline of the
    same study seed (``report/robustness/seed<k>/``). The study table gains, per method, the
    mean over seeds of mCA, mCE and relative mCE over the 15 standard corruptions, with their
    sd and 95% t half-width over seeds (``mCA_sd``, ``mCA_ci95``, ...), the same for the extra
    corruptions (``mCA_extra``, ...) and for all of them (``mCA_all``, ...), ``n_robust_seeds``
    and ``rel_mCE_skipped`` (corruption -> seeds where the relative-mCE guard left it out).
    Writes ``report/robustness.md`` (the robustness table and its note),
    ``report/robustness_heatmap.png`` (corruption x method accuracy, mean over severities and
    seeds, with the sd over seeds) and the study table (`kdlab.report.tables.write_tables`),
    whose result it returns.
    """
    from kdlab.core.checkpoint import load_model
    from kdlab.data import load_dataset
    from kdlab.report.tables import write_tables

    study_dir = Path(study_dir)
    table_path = study_dir / "report" / "table.json"
    if not table_path.is_file():
        raise FileNotFoundError(f"{table_path} not found; run `kdlab ablate` for this study first")
    table = read_json(table_path, "study table", need=("methods", "baseline"), fix=f"rebuild it with `kdlab report {study_dir}`")
    stats, baseline = table["methods"], table["baseline"]
    from kdlab.core.io import check_out_dir

    check_out_dir(study_dir / "report" / "robustness", "study report folder")  # before the evaluation
    methods = [r["method"] for r in stats]
    seeds = sorted({s for r in stats for s in r["seeds"]})
    per = {m: {**{k: [] for k in STUDY_METRICS}, "by_c": [], "clean": [], "skipped": []}
           for m in methods}
    splits = None
    corrs: list[str] = []
    for s in seeds:
        models = {}
        for m in methods:
            path = study_dir / m / f"seed{s}" / "best.pt"
            if path.is_file():
                models[m], ck = load_model(path, device)
        if not models:
            continue
        if splits is None:
            d = ck["recipe"]["data"]
            splits = load_dataset(d["name"], data_dir or d.get("data_dir"),
                                  val_fraction=d["val_fraction"])
        test = splits.test if limit is None else type(splits.test)(splits.test.x[:limit],
                                                                   splits.test.y[:limit])
        ref = baseline if baseline in models else next(iter(models))
        log(f"robustness, study seed {s}: {len(models)} methods, reference '{ref}'")
        res = evaluate_robustness(models, test, splits.info, corruptions, severities, seed=seed,
                                  batch_size=batch_size, device=device, reference=ref,
                                  out_dir=study_dir / "report" / "robustness" / f"seed{s}",
                                  progress=progress)
        corrs = res.corruptions
        met = res.metrics
        for m in models:
            for k in STUDY_METRICS:
                per[m][k].append(met[m][k])
            per[m]["by_c"].append(met[m]["acc_by_corruption"])
            per[m]["clean"].append(met[m]["clean_acc"])
            per[m]["skipped"].append(met[m]["rel_mCE_skipped"])
    if splits is None:
        raise FileNotFoundError(f"no best.pt under {study_dir}/<method>/seed<k>/; "
                                f"run the study first")
    mean = lambda v: aggregate_over_seeds(v)[0]  # noqa: E731
    for r in stats:
        p = per[r["method"]]
        if not p["mCA"]:
            continue
        for k in STUDY_METRICS:
            r[k], r[k + "_sd"], r[k + "_ci95"] = aggregate_over_seeds(p[k])
        r["n_robust_seeds"] = len(p["mCA"])
        r["rel_mCE_skipped"] = {c: sum(c in sk for sk in p["skipped"])
                                for c in corrs if any(c in sk for sk in p["skipped"])}
    heat = {m: {c: mean([bc[c] for bc in per[m]["by_c"]]) for c in corrs}
            for m in methods if per[m]["by_c"]}
    spread = {m: {c: aggregate_over_seeds([bc[c] for bc in per[m]["by_c"]])[1] for c in corrs}
              for m in heat}
    robustness_heatmap(heat, study_dir / "report" / "robustness_heatmap.png",
                       clean={m: mean(per[m]["clean"]) for m in heat}, spread=spread,
                       title=f"accuracy (%) under corruption: mean over severities, then "
                             f"mean ± sd over {len(seeds)} seeds")
    std, extra = split_standard(corrs)
    atomic_write_text(study_dir / "report" / "robustness.md", 
        study_robustness_markdown(stats, baseline, len(seeds), extra, len(std)))
    return write_tables(study_dir / "report", stats, baseline, table.get("wall_time_s"), log)


__all__ = [
    "REL_MCE_MIN_DEGRADATION", "RobustnessResults", "corruption_errors", "evaluate_robustness",
    "mean_corruption_accuracy", "mean_corruption_error", "metrics_footer",
    "reference_degradation", "relative_corruption_errors", "relative_mce_skipped",
    "relative_mean_corruption_error", "robustness_heatmap", "robustness_markdown",
    "robustness_metrics", "split_standard", "study_robustness", "study_robustness_markdown",
]
