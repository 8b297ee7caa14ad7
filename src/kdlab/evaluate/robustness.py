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
``robustness.json``, ``robustness.md`` and ``robustness_heatmap.png``
(:mod:`kdlab.report.robustness` renders them). :func:`kdlab.experiments.robustness.
study_robustness` does this for every (method, seed) of a finished study and adds the columns to
its table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from kdlab.data.corruptions import (  # noqa: F401  (split_standard re-exported)
    SEVERITIES,
    STANDARD_CORRUPTIONS,
    CorruptedSet,
    check_severity,
    load_cifar10c,
    parse_corruptions,
    split_standard,
)
# rendering lives in kdlab.report.robustness (re-exported here: evaluate -> report is the allowed edge)
from kdlab.report.robustness import (REL_MCE_MIN_DEGRADATION, metrics_footer,  # noqa: F401
                                     robustness_heatmap, robustness_markdown, study_robustness_markdown,
                                     write_results)

Acc = Mapping[str, Mapping[int, float]]  # corruption -> severity -> accuracy (or error)



# ---------------------------------------------------------------------------------------------
# metrics (pure functions of accuracies / errors)


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den != 0 else float("nan")


def _mean(values) -> float:
    values = [float(v) for v in values]
    return float(np.mean(values)) if values else float("nan")


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
        """The result as Markdown (:func:`kdlab.report.robustness.robustness_markdown`)."""
        return robustness_markdown(self)

    def write(self, out_dir) -> dict[str, Path]:
        """Write ``robustness.csv``, ``.json``, ``.md`` and ``robustness_heatmap.png``
        (:func:`kdlab.report.robustness.write_results`)."""
        return write_results(self, out_dir)


# ---------------------------------------------------------------------------------------------
# evaluation


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return (x - m) / s


def check_robustness_inputs(who: str, models: Mapping, testset, corruptions, severities, batch_size: int,
                            reference: str | None):
    """The checked inputs of a robustness evaluation (``who`` names it in the errors):
    ``(model names, reference, corruptions, severities, test-set size)``. ``reference`` defaults to
    the first model; corruptions go through :func:`~kdlab.data.corruptions.parse_corruptions`,
    severities through :func:`~kdlab.data.corruptions.check_severity`. No model, an unknown
    reference, no corruption or severity, ``batch_size < 1`` or an empty test set raise."""
    if not models:
        raise ValueError(f"{who} needs at least one model")
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
    return names, reference, corrs, sevs, n


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
    from kdlab.core.progress import progress_bar

    names, reference, corrs, sevs, n = check_robustness_inputs(
        "evaluate_robustness", models, testset, corruptions, severities, batch_size, reference)
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
    bar = progress_bar(total, "robustness", "batch", enabled=progress)
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




__all__ = [
    "REL_MCE_MIN_DEGRADATION", "RobustnessResults", "check_robustness_inputs", "corruption_errors",
    "evaluate_robustness",
    "mean_corruption_accuracy", "mean_corruption_error", "metrics_footer",
    "reference_degradation", "relative_corruption_errors", "relative_mce_skipped",
    "relative_mean_corruption_error", "robustness_heatmap", "robustness_markdown",
    "robustness_metrics", "split_standard", "study_robustness_markdown",
]
