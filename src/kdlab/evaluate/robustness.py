"""Robustness to common corruptions (CIFAR-10-C style): accuracies, mCA, mCE, relative mCE.

Metrics (Hendrycks & Dietterich, ICLR 2019), with errors ``E = 1 - accuracy``:

- clean accuracy, and accuracy per corruption ``c`` x severity ``s``;
- mean corruption accuracy ``mCA = mean_{c,s} acc_{s,c}``;
- corruption error against a reference model ``ref`` (here: the baseline student)
  ``CE_c = sum_s E_{s,c} / sum_s E^ref_{s,c}``, and ``mCE = mean_c CE_c``;
- relative corruption error
  ``relCE_c = sum_s (E_{s,c} - E_clean) / sum_s (E^ref_{s,c} - E^ref_clean)``,
  ``relative mCE = mean_c relCE_c``.

CE and relative CE are ratios (the reference scores 1, i.e. 100%); a zero denominator gives NaN
(written as ``null`` in JSON). ``evaluate_robustness`` corrupts the test set on the fly with
`kdlab.data.corruptions.corrupt` (or reads the published CIFAR-10-C arrays), normalises with the
data set's mean/std *after* corrupting, and writes ``robustness.csv`` (long form),
``robustness.json``, ``robustness.md`` and ``robustness_heatmap.png``.
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

from kdlab.data.corruptions import (
    SEVERITIES,
    CorruptedSet,
    check_severity,
    load_cifar10c,
    parse_corruptions,
)

Acc = Mapping[str, Mapping[int, float]]  # corruption -> severity -> accuracy (or error)


# ---------------------------------------------------------------------------------------------
# metrics (pure functions of accuracies / errors)


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den != 0 else float("nan")


def mean_corruption_accuracy(acc: Acc) -> float:
    """``mCA``: mean of ``acc[c][s]`` over every corruption and severity."""
    vals = [float(a) for per_s in acc.values() for a in per_s.values()]
    return float(np.mean(vals)) if vals else float("nan")


def corruption_errors(err: Acc, ref_err: Acc) -> dict[str, float]:
    """``CE_c = sum_s err[c][s] / sum_s ref_err[c][s]`` for each corruption of ``err``."""
    out = {}
    for c, per_s in err.items():
        num = sum(float(per_s[s]) for s in per_s)
        den = sum(float(ref_err[c][s]) for s in per_s)
        out[c] = _ratio(num, den)
    return out


def mean_corruption_error(err: Acc, ref_err: Acc) -> float:
    """``mCE``: mean over corruptions of `corruption_errors` (NaN if any CE is undefined)."""
    ce = list(corruption_errors(err, ref_err).values())
    return float(np.mean(ce)) if ce else float("nan")


def relative_corruption_errors(err: Acc, clean_err: float, ref_err: Acc,
                               ref_clean_err: float) -> dict[str, float]:
    """``relCE_c = sum_s (err[c][s] - clean_err) / sum_s (ref_err[c][s] - ref_clean_err)``."""
    out = {}
    for c, per_s in err.items():
        num = sum(float(per_s[s]) - clean_err for s in per_s)
        den = sum(float(ref_err[c][s]) - ref_clean_err for s in per_s)
        out[c] = _ratio(num, den)
    return out


def relative_mean_corruption_error(err: Acc, clean_err: float, ref_err: Acc,
                                   ref_clean_err: float) -> float:
    """Relative mCE: mean over corruptions of `relative_corruption_errors`."""
    rce = list(relative_corruption_errors(err, clean_err, ref_err, ref_clean_err).values())
    return float(np.mean(rce)) if rce else float("nan")


def to_errors(acc: Acc) -> dict[str, dict[int, float]]:
    return {c: {s: 1.0 - float(a) for s, a in per_s.items()} for c, per_s in acc.items()}


def robustness_metrics(clean_acc: Mapping[str, float], acc: Mapping[str, Acc],
                       reference: str) -> dict[str, dict]:
    """All metrics for each model: ``clean_acc``, ``mCA``, ``mCE``, ``rel_mCE``, ``CE`` and
    ``rel_CE`` (per corruption), ``acc_by_corruption`` (mean over severities)."""
    if reference not in acc:
        raise KeyError(f"reference model {reference!r} is not among the evaluated models "
                       f"({', '.join(acc)}); pass one of them")
    ref_err = to_errors(acc[reference])
    ref_clean_err = 1.0 - float(clean_acc[reference])
    out = {}
    for name, a in acc.items():
        err = to_errors(a)
        clean_err = 1.0 - float(clean_acc[name])
        ce = corruption_errors(err, ref_err)
        rce = relative_corruption_errors(err, clean_err, ref_err, ref_clean_err)
        out[name] = {
            "clean_acc": float(clean_acc[name]),
            "mCA": mean_corruption_accuracy(a),
            "mCE": float(np.mean(list(ce.values()))) if ce else float("nan"),
            "rel_mCE": float(np.mean(list(rce.values()))) if rce else float("nan"),
            "acc_by_corruption": {c: float(np.mean([float(v) for v in per_s.values()]))
                                  for c, per_s in a.items()},
            "CE": ce,
            "rel_CE": rce,
        }
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
        """One number per model (``clean_acc``, ``mCA``, ``mCE`` or ``rel_mCE``), e.g. for the
        study report's robustness column."""
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
        with open(paths["csv"], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["model", "corruption", "severity", "acc"])
            w.writeheader()
            for r in self.rows():
                w.writerow({**r, "acc": f"{r['acc']:.6f}"})
        paths["json"].write_text(json.dumps(_jsonable(self.summary()), indent=2) + "\n")
        paths["md"].write_text(self.markdown())
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


def robustness_markdown(res: RobustnessResults) -> str:
    met = res.metrics
    lines = [
        f"Robustness on {res.n_images} test images ({res.source}, seed {res.seed}, severities "
        f"{res._sev_label()}, {len(res.corruptions)} corruptions). Accuracies in %; mCE and "
        f"relative mCE in % of the reference `{res.reference}`.",
        "",
        "| model | clean acc | mCA | mCE | rel. mCE |",
        "|---|---:|---:|---:|---:|",
    ]
    for m in res.models:
        v = met[m]
        ref = " (ref)" if m == res.reference else ""
        lines.append(f"| {m}{ref} | {_pct(v['clean_acc'])} | {_pct(v['mCA'])} | "
                     f"{_pct(v['mCE'], 1)} | {_pct(v['rel_mCE'], 1)} |")
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
                       clean: Mapping[str, float] | None = None, title: str | None = None) -> Path:
    """Heat map, corruptions (rows) x models or methods (columns), of accuracies in [0, 1]
    (e.g. the mean over severities), annotated in %; a ``clean`` row on top and an ``mCA``
    (row mean) row at the bottom. Usable by the study report with method names as keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(acc_by_corruption)
    corrs = list(next(iter(acc_by_corruption.values()))) if models else []
    rows, labels = [], []
    if clean is not None:
        rows.append([clean[m] for m in models])
        labels.append("clean")
    for c in corrs:
        rows.append([acc_by_corruption[m][c] for m in models])
        labels.append(c)
    rows.append([float(np.mean([acc_by_corruption[m][c] for c in corrs])) if corrs else np.nan
                 for m in models])
    labels.append("mean (mCA)")
    a = 100 * np.asarray(rows, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * max(1, len(models)), 1.2 + 0.32 * len(labels)))
    im = ax.imshow(a, aspect="auto", cmap="viridis", vmin=np.nanmin(a) if a.size else 0,
                   vmax=np.nanmax(a) if a.size else 100)
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    mid = np.nanmean(a) if a.size else 0
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            ax.text(j, i, "n/a" if not np.isfinite(a[i, j]) else f"{a[i, j]:.1f}",
                    ha="center", va="center", fontsize=7,
                    color="black" if a[i, j] > mid else "white")
    if clean is not None:
        ax.axhline(0.5, color="white", lw=1.5)
    ax.axhline(len(labels) - 1.5, color="white", lw=1.5)
    fig.colorbar(im, ax=ax, label="accuracy (%)", fraction=0.05)
    if title:
        ax.set_title(title, fontsize=9)
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


__all__ = [
    "RobustnessResults", "corruption_errors", "evaluate_robustness",
    "mean_corruption_accuracy", "mean_corruption_error", "relative_corruption_errors",
    "relative_mean_corruption_error", "robustness_heatmap", "robustness_markdown",
    "robustness_metrics",
]
