"""Does a student look where its teacher looks? Per-image alignment metrics and their summary.

All metrics are computed per image (one value per row) and then summarised with
:func:`mean_ci` (mean and a t-distribution confidence half-width). Rows where a metric is not
defined give NaN (or inf, see :func:`topk_focus`) and are *excluded* from the summary; the
summary's ``n`` says how many images were kept.

* :func:`spearman` – Spearman rank correlation per row: Pearson correlation of the rows' ranks,
  ties getting their average rank. Equals ``1 - 6 sum d^2 / (n (n^2 - 1))`` when there are no
  ties. A row that is constant in either input has no defined correlation -> NaN. NaN entries
  (e.g. a superpixel absent from an image) are dropped from that row first.
* :func:`rank_alignment` – Spearman between the student's and the teacher's part-importance
  vectors (see :func:`kdlab.evaluate.explain.region_importance`).
* :func:`topk_focus` – student attribution mass inside the teacher's top-k parts divided by the
  mass outside them; :func:`topk_fraction` – inside divided by the total (bounded in [0, 1]).
* :func:`logit_alignment` – Spearman between the student's and the teacher's logit vectors.
* :func:`top1_agreement` – 1 where both predict the same class, else 0.
* :func:`kl_to_teacher` – ``KL(p_t || p_s)`` with ``p = softmax(logits / T)`` (no ``T^2`` factor).

:func:`compare_models` runs a student and its teacher over a data set and returns every metric
as ``(mean, ci_half_width, n)``.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "spearman", "rank_alignment", "topk_focus", "topk_fraction", "logit_alignment",
    "top1_agreement", "kl_to_teacher", "mean_ci", "summarize", "compare_models", "METRICS",
]

#: metric name -> one-line description (used by tables and docs)
METRICS = {
    "rank_alignment": "Spearman correlation of student vs teacher part importance",
    "topk_focus": "student attribution mass in teacher's top-k parts / mass outside",
    "topk_fraction": "student attribution mass in teacher's top-k parts / total mass",
    "logit_alignment": "Spearman correlation of student vs teacher logits",
    "top1_agreement": "fraction of images where student and teacher predict the same class",
    "kl_to_teacher": "KL(p_teacher || p_student) at temperature T",
    "student_acc": "student top-1 accuracy",
    "teacher_acc": "teacher top-1 accuracy",
    "ig_completeness_student": "IG relative completeness error |sum(attr) - (F(x) - F(b))| / |F(x) - F(b)|, student",
    "ig_completeness_teacher": "IG relative completeness error, teacher",
}


def _as_2d(a) -> np.ndarray:
    if isinstance(a, Tensor):
        a = a.detach().cpu().double().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"expected a vector [D] or a batch of vectors [N, D], got shape {a.shape}")
    return a


def _pearson_rows(ra: np.ndarray, rb: np.ndarray) -> np.ndarray:
    da = ra - ra.mean(axis=1, keepdims=True)
    db = rb - rb.mean(axis=1, keepdims=True)
    num = (da * db).sum(axis=1)
    den = np.sqrt((da * da).sum(axis=1) * (db * db).sum(axis=1))
    out = np.full(num.shape, np.nan)
    ok = den > 0
    out[ok] = num[ok] / den[ok]
    return np.clip(out, -1.0, 1.0)


def spearman(a, b) -> Tensor:
    """Spearman rank correlation of each row of ``a`` with the same row of ``b``.

    ``a``, ``b``: ``[N, D]`` (or ``[D]``, treated as one row). Returns float64 ``[N]``.
    Ties get average ranks (then Pearson on the ranks). A row constant in ``a`` or ``b``, or with
    fewer than two entries left after dropping NaN positions, gives NaN.
    """
    from scipy.stats import rankdata

    x, y = _as_2d(a), _as_2d(b)
    if x.shape != y.shape:
        raise ValueError(f"spearman needs equal shapes, got {x.shape} and {y.shape}")
    n = x.shape[0]
    if x.shape[1] == 0:
        return torch.full((n,), float("nan"), dtype=torch.float64)
    bad = np.isnan(x) | np.isnan(y)
    if not bad.any():
        out = _pearson_rows(rankdata(x, axis=1), rankdata(y, axis=1))
    else:
        out = np.full(n, np.nan)
        for i in range(n):
            keep = ~bad[i]
            if keep.sum() >= 2:
                out[i] = _pearson_rows(rankdata(x[i, keep])[None], rankdata(y[i, keep])[None])[0]
    return torch.as_tensor(out, dtype=torch.float64)


def rank_alignment(imp_s, imp_t) -> Tensor:
    """Attention rank alignment: :func:`spearman` of part-importance vectors ``[N, P]``."""
    return spearman(imp_s, imp_t)


def _topk_masses(imp_s, imp_t, k: int) -> tuple[Tensor, Tensor]:
    s = torch.as_tensor(_as_2d(imp_s))
    t = torch.as_tensor(_as_2d(imp_t))
    if s.shape != t.shape:
        raise ValueError(f"student and teacher importances differ in shape: {tuple(s.shape)} vs {tuple(t.shape)}")
    valid = ~(torch.isnan(s) | torch.isnan(t))
    k = int(k)
    if not 1 <= k < s.shape[1]:
        raise ValueError(f"k must be in 1..{s.shape[1] - 1} (fewer than the {s.shape[1]} parts), got {k}")
    s = torch.where(valid, s.abs(), torch.zeros_like(s))
    t_rank = torch.where(valid, t, torch.full_like(t, -math.inf))
    # descending, stable: equal teacher values -> the lower part index ranks first
    order = torch.argsort(t_rank, dim=1, descending=True, stable=True)
    top = torch.zeros_like(s, dtype=torch.bool).scatter_(1, order[:, :k], True)
    inside = (s * top).sum(dim=1)
    outside = (s * (~top)).sum(dim=1)
    # rows with no more than k valid parts (possible with superpixels) have no "outside": NaN
    few = valid.sum(dim=1) <= k
    inside[few] = float("nan")
    outside[few] = float("nan")
    return inside, outside


def topk_focus(imp_s, imp_t, k: int = 5) -> Tensor:
    """Focus of the student on the teacher's top-k parts, per image ``[N]``.

    ``inside / outside`` where ``inside`` is the student's absolute importance summed over the
    ``k`` parts the teacher ranks highest (ties: lower part index first) and ``outside`` the sum
    over the other parts. Division by zero is guarded: ``outside == 0`` gives ``inf`` when
    ``inside > 0`` and NaN when the student map is all zero; both are excluded (and counted) by
    :func:`mean_ci`. ``k`` must be smaller than the number of parts.
    """
    inside, outside = _topk_masses(imp_s, imp_t, k)
    out = torch.full_like(inside, float("nan"))
    pos = outside > 0
    out[pos] = inside[pos] / outside[pos]
    out[(~pos) & (inside > 0)] = math.inf
    return out


def topk_fraction(imp_s, imp_t, k: int = 5) -> Tensor:
    """Share of the student's attribution mass inside the teacher's top-k parts, ``[N]`` in
    ``[0, 1]`` (NaN for an all-zero student map). ``f = focus / (1 + focus)``."""
    inside, outside = _topk_masses(imp_s, imp_t, k)
    total = inside + outside
    out = torch.full_like(inside, float("nan"))
    pos = total > 0
    out[pos] = inside[pos] / total[pos]
    return out


def logit_alignment(s_logits, t_logits) -> Tensor:
    """:func:`spearman` of the student's and the teacher's logit vectors ``[N, K]``."""
    return spearman(s_logits, t_logits)


def top1_agreement(s_logits: Tensor, t_logits: Tensor) -> Tensor:
    """1.0 where ``argmax`` of student and teacher logits agree, else 0.0, ``[N]``."""
    s, t = torch.as_tensor(s_logits), torch.as_tensor(t_logits)
    if s.shape != t.shape:
        raise ValueError(f"logit shapes differ: {tuple(s.shape)} vs {tuple(t.shape)}")
    return (s.argmax(dim=-1) == t.argmax(dim=-1)).double()


def kl_to_teacher(s_logits: Tensor, t_logits: Tensor, T: float = 1.0) -> Tensor:
    """``KL(p_t || p_s) = sum_k p_t,k (log p_t,k - log p_s,k)`` per image ``[N]``, with
    ``p = softmax(logits / T)``. No ``T^2`` scaling (that belongs to the KD loss, not here)."""
    s = torch.as_tensor(s_logits).double()
    t = torch.as_tensor(t_logits).double()
    if s.shape != t.shape:
        raise ValueError(f"logit shapes differ: {tuple(s.shape)} vs {tuple(t.shape)}")
    if not T > 0:
        raise ValueError(f"temperature T must be > 0, got {T}")
    from kdlab.distill.losses.response import kl_rows

    return kl_rows(s, t, T).clamp_min(0.0)


def mean_ci(values, conf: float = 0.95) -> tuple[float, float]:
    """Mean and confidence half-width ``t_{(1+conf)/2, n-1} * s / sqrt(n)`` (``s``: sample
    standard deviation, ``ddof=1``). Non-finite values (NaN, inf) are dropped first. With no
    values the result is ``(nan, nan)``; with one value the half-width is NaN."""
    return summarize(values, conf)[:2]


def summarize(values, conf: float = 0.95) -> tuple[float, float, int]:
    """``(mean, ci_half_width, n)`` over the finite values (see :func:`mean_ci`)."""

    if not 0 < conf < 1:
        raise ValueError(f"conf must be in (0, 1), got {conf}")
    if isinstance(values, Tensor):
        values = values.detach().cpu().double().numpy()
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = float(v.mean())
    if n == 1:
        return mean, float("nan"), 1
    from kdlab.report.statistics import t_interval

    _, _, half = t_interval(v, conf)
    return mean, float(half), n


# ---------------------------------------------------------------------------------------------
# student vs teacher over a data set


def _batches(data, batch_size: int) -> Iterable[tuple[Tensor, Tensor | None]]:
    """Yield ``(x, y_or_None)`` from a BatchLoader (``.epoch``), an object with ``.x``/``.y``
    (TensorSet), a tuple ``(x, y)``, a tensor ``x``, or an iterable of batch tuples."""
    if hasattr(data, "epoch") and callable(data.epoch):
        for batch in data.epoch(0):
            yield batch[0], batch[1]
        return
    if isinstance(data, Tensor):
        data = (data, None)
    if hasattr(data, "x") and hasattr(data, "y"):
        data = (data.x, data.y)
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        x, y = data
        for i in range(0, x.shape[0], batch_size):
            yield x[i:i + batch_size], (None if y is None else y[i:i + batch_size])
        return
    for batch in data:
        if isinstance(batch, Tensor):
            yield batch, None
        else:
            yield batch[0], (batch[1] if len(batch) > 1 else None)


def _targets(spec, y, s_logits, t_logits):
    """Targets (student, teacher) for attribution."""
    if isinstance(spec, int):
        t = torch.full((s_logits.shape[0],), spec, dtype=torch.long, device=s_logits.device)
        return t, t
    if spec == "label":
        if y is None:
            raise ValueError("target='label' needs labelled data; pass (x, y) or use target='teacher'")
        return y, y
    if spec == "teacher":
        t = t_logits.argmax(dim=1)
        return t, t
    if spec == "pred":
        return s_logits.argmax(dim=1), t_logits.argmax(dim=1)
    raise ValueError(f"target must be 'label', 'teacher', 'pred' or a class index, got {spec!r}")


def compare_models(student: nn.Module, teacher: nn.Module, data, method: str = "ig",
                   grid: Sequence[int] = (4, 4), k: int = 5, *, target="label",
                   layer_student: str | None = None, layer_teacher: str | None = None,
                   baseline="zeros", steps: int = 32, internal_batch_size: int | None = None,
                   T: float = 1.0, batch_size: int = 64, mean=None, std=None,
                   superpixel: int | None = None, conf: float = 0.95, device="cpu",
                   return_per_image: bool = False):
    """Alignment of ``student`` with ``teacher`` over ``data``.

    ``data``: a BatchLoader (its epoch 0, already normalised), a TensorSet / ``(x, y)`` / ``x``
    (then ``mean`` and ``std``, if given, normalise ``(x - mean) / std`` before the models; leave
    them None when ``x`` is already what the models take), or an iterable of ``(x, y, ...)``.

    Attributions (``method`` with ``layer_*``, ``baseline``, ``steps``, ``internal_batch_size``)
    explain the ``target`` class: ``"label"`` (true label, default), ``"teacher"`` (teacher's
    prediction, for both models), ``"pred"`` (each model its own prediction) or an int.
    Parts: a regular ``grid`` or, with ``superpixel=S``, ~S SLIC superpixels per image
    (needs scikit-image; computed on the un-normalised image when ``mean``/``std`` are given).

    Returns ``{metric: (mean, ci_half_width, n)}`` with the metrics of :data:`METRICS` that apply
    (accuracies need labels, completeness needs ``method="ig"``); with ``return_per_image=True``
    also a dict of per-image numpy arrays.
    """
    from kdlab.evaluate import explain as ex

    dev = torch.device(device)
    student, teacher = student.to(dev), teacher.to(dev)
    mean_t = None if mean is None else torch.as_tensor(mean, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
    std_t = None if std is None else torch.as_tensor(std, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
    if (mean_t is None) != (std_t is None):
        raise ValueError("pass both mean and std (or neither)")
    per: dict[str, list] = {}

    def add(name, v):
        per.setdefault(name, []).append(torch.as_tensor(v).detach().double().cpu().reshape(-1))

    with ex.eval_mode(student), ex.eval_mode(teacher):
        for x, y in _batches(data, batch_size):
            x = x.to(dev).float()
            y = None if y is None else y.to(dev).long()
            raw = x
            if mean_t is not None:
                x = (x - mean_t) / std_t
            with torch.no_grad():
                s_logits, t_logits = student(x), teacher(x)
            if s_logits.shape != t_logits.shape:
                raise ValueError(f"student and teacher outputs differ: {tuple(s_logits.shape)} vs "
                                 f"{tuple(t_logits.shape)} (same dataset / num_classes needed)")
            tgt_s, tgt_t = _targets(target, y, s_logits, t_logits)
            maps = {}
            for who, model, tgt, layer in (("student", student, tgt_s, layer_student),
                                           ("teacher", teacher, tgt_t, layer_teacher)):
                if method == "ig":
                    a, err = ex.ig_attribute(model, x, tgt, baseline, steps,
                                             internal_batch_size=internal_batch_size)
                    maps[who] = a.abs().sum(dim=1)
                    add(f"ig_completeness_{who}", err)
                else:
                    maps[who] = ex.attribute(model, x, tgt, method, layer=layer)
            if superpixel:
                img = raw if mean_t is not None else _minmax(raw)
                seg = ex.superpixels(img, int(superpixel)).to(dev)
                imp_s = ex.region_importance(maps["student"], segments=seg)
                imp_t = ex.region_importance(maps["teacher"], segments=seg)
            else:
                imp_s = ex.region_importance(maps["student"], grid)
                imp_t = ex.region_importance(maps["teacher"], grid)
            add("rank_alignment", rank_alignment(imp_s, imp_t))
            add("topk_focus", topk_focus(imp_s, imp_t, k))
            add("topk_fraction", topk_fraction(imp_s, imp_t, k))
            add("logit_alignment", logit_alignment(s_logits, t_logits))
            add("top1_agreement", top1_agreement(s_logits, t_logits))
            add("kl_to_teacher", kl_to_teacher(s_logits, t_logits, T))
            if y is not None:
                add("student_acc", (s_logits.argmax(1) == y).double())
                add("teacher_acc", (t_logits.argmax(1) == y).double())
    if not per:
        raise ValueError("compare_models got no data; pass at least one image")
    arrays = {name: torch.cat(parts).numpy() for name, parts in per.items()}
    summary = {name: summarize(arrays[name], conf) for name in METRICS if name in arrays}
    return (summary, arrays) if return_per_image else summary


def _minmax(x: Tensor) -> Tensor:
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-12)
