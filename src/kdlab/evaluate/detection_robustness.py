"""Robustness of detectors to common corruptions: COCO mAP on corrupted test images.

The benchmark of Michaelis et al. (2019), "Benchmarking Robustness in Object Detection"
(arXiv:1907.07484): the image-corruption suite of Hendrycks & Dietterich (the 15 standard
corruptions x 5 severities, :mod:`kdlab.data.corruptions`, the same draws as for classification)
applied to the test images only; the ground-truth boxes are unchanged. With ``P`` the COCO
mAP@[.5:.95] (``map``; the same for mAP@.5, ``map50``):

- ``P_clean``: mAP on the clean test images;
- ``mPC = mean_{c, s} P_{c,s}``: mean performance under corruption, over the standard
  corruptions and the severities evaluated;
- ``rPC = mPC / P_clean``: relative performance under corruption (1 = no loss);
- ``CE_c = sum_s (1 - P_{c,s}) / sum_s (1 - P^ref_{c,s})`` and ``mCE = mean_c CE_c``: the
  classification corruption error (Hendrycks & Dietterich) with error ``1 - mAP``, relative to a
  reference detector (in a study: the baseline student of the same seed; 1 = as robust as it).

Corruptions that are not among the 15 standard ones are averaged separately (``mPC_extra``,
``rPC_extra``, ``mCE_extra``), as for classification. :func:`evaluate_detection_robustness`
corrupts each batch once (seeded per image by its position in the test set) and runs every
detector on it; :class:`DetectionRobustness` holds the numbers and writes them
(``robustness.csv`` long form, ``.json``, ``.md``, ``robustness_heatmap.png``) atomically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from kdlab.data.corruptions import SEVERITIES, corrupt, split_standard
from kdlab.data.splits import TensorSet
from kdlab.evaluate.detection import coco_metrics, postprocess, targets_to_lists
from kdlab.evaluate.robustness import check_robustness_inputs
from kdlab.models.detection import layout_of

#: the two mAPs scored under every corruption
KEYS = ("map", "map50")

Table = Mapping[str, Mapping[int, float]]  # corruption -> severity -> mAP


def _mean(values) -> float:
    v = [float(x) for x in values]
    return float(np.mean(v)) if v else float("nan")


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b != 0 and math.isfinite(a) and math.isfinite(b) else float("nan")


def mean_performance(p: Table, corruptions: Sequence[str]) -> float:
    """``mPC``: mean of ``p[c][s]`` over the corruptions given and their severities."""
    return _mean(v for c in corruptions for v in p[c].values())


def corruption_errors(p: Table, ref: Table) -> dict[str, float]:
    """``CE_c = sum_s (1 - p[c][s]) / sum_s (1 - ref[c][s])`` per corruption of ``p``."""
    return {c: _ratio(sum(1.0 - float(v) for v in per.values()), sum(1.0 - float(ref[c][s]) for s in per))
            for c, per in p.items()}


def detection_robustness_metrics(clean: Mapping[str, Mapping[str, float]],
                                 perf: Mapping[str, Mapping[str, Table]], reference: str) -> dict[str, dict]:
    """Per model: ``clean_map``, ``clean_map50``; ``mPC``, ``rPC``, ``mCE`` (mAP@[.5:.95]) and
    ``mPC50``, ``rPC50`` (mAP@.5) over the standard corruptions; their ``_extra`` forms over the
    others; ``map_by_corruption`` / ``map50_by_corruption`` (mean over severities) and ``CE`` per
    corruption. ``clean``: model -> {map, map50}; ``perf``: model -> {map, map50} -> corruption ->
    severity -> value."""
    if reference not in perf:
        raise KeyError(f"reference {reference!r} is not among the evaluated models ({', '.join(perf)})")
    out = {}
    for m, p in perf.items():
        ce = corruption_errors(p["map"], perf[reference]["map"])
        std, extra = split_standard(list(p["map"]))
        row = {"clean_map": float(clean[m]["map"]), "clean_map50": float(clean[m]["map50"]),
               "n_standard": len(std), "n_extra": len(extra)}
        for suffix, group in (("", std), ("_extra", extra)):
            mpc = mean_performance(p["map"], group)
            mpc50 = mean_performance(p["map50"], group)
            row["mPC" + suffix] = mpc
            row["rPC" + suffix] = _ratio(mpc, clean[m]["map"])
            row["mCE" + suffix] = _mean(ce[c] for c in group)
            row["mPC50" + suffix] = mpc50
            row["rPC50" + suffix] = _ratio(mpc50, clean[m]["map50"])
        row["map_by_corruption"] = {c: _mean(v.values()) for c, v in p["map"].items()}
        row["map50_by_corruption"] = {c: _mean(v.values()) for c, v in p["map50"].items()}
        row["CE"] = ce
        out[m] = row
    return out


def coco_map(gts, dets, num_classes: int, *, image_sizes=None) -> dict:
    """``{map, map50}`` by pycocotools' COCOeval as :func:`kdlab.evaluate.detection.coco_metrics`
    computes them (area "all", at most 100 detections per image, 101-point interpolated precision
    averaged over the classes with ground truth), with the evaluation restricted to that one area
    range and detection limit: the same two numbers in about a quarter of the time (the
    robustness pass scores every model under every corruption x severity)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, results = [], [], []
    for i, (boxes, labels) in enumerate(gts):
        hw = image_sizes[i] if image_sizes is not None else (1, 1)
        images.append({"id": i + 1, "height": int(hw[0]), "width": int(hw[1])})
        for b, c in zip(np.asarray(boxes, dtype=float).reshape(-1, 4), np.asarray(labels).reshape(-1)):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(c) + 1,
                         "bbox": [float(b[0]), float(b[1]), w, h], "area": w * h, "iscrowd": 0})
    for i, (boxes, scores, labels) in enumerate(dets):
        for b, sc, c in zip(np.asarray(boxes, dtype=float).reshape(-1, 4), np.asarray(scores).reshape(-1),
                            np.asarray(labels).reshape(-1)):
            results.append({"image_id": i + 1, "category_id": int(c) + 1, "score": float(sc),
                            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
    if not anns:
        return {"map": float("nan"), "map50": float("nan")}
    if not results:
        return {"map": 0.0, "map50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns,
                      "categories": [{"id": k + 1, "name": str(k)} for k in range(int(num_classes))]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.params.areaRng, ev.params.areaRngLbl, ev.params.maxDets = [[0.0, 1e10]], ["all"], [100]
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][:, :, :, 0, 0]  # [IoU, recall, class]

    def mean(p):
        v = p[p > -1]
        return float(v.mean()) if v.size else float("nan")

    return {"map": mean(prec), "map50": mean(prec[0])}


@dataclass
class DetectionRobustness:
    """mAP of several detectors on clean and corrupted test images, plus the metrics."""

    models: list[str]
    corruptions: list[str]
    severities: list[int]
    reference: str
    clean: dict[str, dict[str, float]]  # model -> {map, map50}
    perf: dict[str, dict[str, dict[str, dict[int, float]]]]  # model -> key -> corruption -> severity -> value
    n_images: int = 0
    seed: int = 0
    settings: dict = field(default_factory=dict)

    task = "detection"

    @property
    def metrics(self) -> dict[str, dict]:
        return detection_robustness_metrics(self.clean, self.perf, self.reference)

    def rows(self) -> list[dict]:
        """Long form: one row per (model, corruption, severity); clean rows have
        ``corruption="clean", severity=0``."""
        rows = []
        for m in self.models:
            rows.append({"model": m, "corruption": "clean", "severity": 0, **self.clean[m]})
            for c in self.corruptions:
                for s in self.severities:
                    rows.append({"model": m, "corruption": c, "severity": s,
                                 **{k: self.perf[m][k][c][s] for k in KEYS}})
        return rows

    def summary(self) -> dict:
        met = self.metrics
        return {"task": "detection", "reference": self.reference, "seed": self.seed, "n_images": self.n_images,
                "corruptions": list(self.corruptions), "severities": list(self.severities),
                "settings": self.settings,
                "models": {m: {**met[m], **{k: {c: {str(s): v for s, v in per.items()}
                                                for c, per in self.perf[m][k].items()} for k in KEYS}}
                           for m in self.models}}

    def markdown(self) -> str:
        from kdlab.report.detection_robustness import robustness_markdown

        return robustness_markdown(self)

    def write(self, out_dir) -> dict[str, Path]:
        """``robustness.csv``, ``.json``, ``.md`` and ``robustness_heatmap.png`` under ``out_dir``
        (each written atomically; :func:`kdlab.report.robustness.write_robustness_files`)."""
        from kdlab.report.detection_robustness import robustness_heatmap
        from kdlab.report.robustness import write_robustness_files

        return write_robustness_files(self, out_dir, KEYS, self.markdown(), by_corruption="map_by_corruption",
                                      clean="clean_map", label="mAP@[.5:.95]", heatmap=robustness_heatmap)


def raw_batches(testset, batch_size: int):
    """``(x [B, C, H, W] in [0, 1], y [B, M, 5], first index)`` batches of a detection test set in
    its order: an in-memory :class:`~kdlab.data.splits.TensorSet` (``mnist-canvas``) or a map-style
    dataset of ``(image, target)`` items (``coco``), unnormalised."""
    n = len(testset)
    for i in range(0, n, batch_size):
        j = min(n, i + batch_size)
        if isinstance(testset, TensorSet):
            yield testset.x[i:j], testset.y[i:j], i
        else:
            items = [testset[k] for k in range(i, j)]
            yield torch.stack([a for a, _ in items]), torch.stack([b for _, b in items]), i


def is_detection_checkpoint(ck: dict) -> bool:
    """Whether a loaded checkpoint dict holds a detector trained by the detection task."""
    rec = ck.get("recipe")
    return isinstance(rec, dict) and rec.get("task") == "detection"


def checkpoint_split(ck: dict, data_dir=None, limit: int | None = None, split: str = "test"):
    """``(split set, info)`` of the recipe a detection checkpoint was trained with (its data, kwargs
    and seed): for ``mnist-canvas`` the same scenes as in training, for ``coco`` the annotation
    files' split; ``limit`` keeps the first N images."""
    from kdlab.train.recipe import recipe_from_dict
    from kdlab.train.build import load_splits

    recipe = recipe_from_dict(ck["recipe"], "the checkpoint's recipe")
    if data_dir is not None:
        recipe = recipe.derive(data={**recipe.data.model_dump(), "data_dir": data_dir})
    splits = load_splits(recipe)
    part = getattr(splits, split)
    if limit is not None:
        if isinstance(part, TensorSet):
            part = type(part)(part.x[:limit], part.y[:limit])
        else:
            part = torch.utils.data.Subset(part, range(min(limit, len(part))))
    return part, splits.info


@torch.no_grad()
def evaluate_detection_checkpoint(model, ck: dict, *, split: str = "test", data_dir=None, device="cpu",
                                  batch_size: int = 100) -> dict:
    """COCO metrics of a detection checkpoint on its recipe's ``split`` (``kdlab evaluate``):
    ``map``, ``map50``, ``map_s``, ``map_m``, ``map_l`` (NaN where the split has no object of that
    size: COCOeval's −1), ``n`` images, ``split``, ``dataset``."""
    part, info = checkpoint_split(ck, data_dir, split=split)
    mean = torch.tensor(info.mean, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
    model = model.to(device).eval()
    gts, dets = [], []
    for x, y, _ in raw_batches(part, batch_size):
        x = (x.float().to(device) - mean) / std
        gts += targets_to_lists(y)
        for b, sc, l in postprocess(model(x).float(), layout_of(model, x)):
            dets.append((b.cpu().numpy(), sc.cpu().numpy(), l.cpu().numpy()))
    res = coco_metrics(gts, dets, info.num_classes, image_sizes=[tuple(info.hw)] * len(gts))
    return {"split": split, "dataset": info.name, **res}


def evaluate_detection_file(path, *, split: str = "test", dataset=None, data_dir=None, device="cpu") -> dict:
    """``kdlab evaluate`` of a detection checkpoint: :func:`evaluate_detection_checkpoint` as a
    printable dict; an AP size the split has no object of is ``"n/a"`` (NaN in the metrics,
    COCOeval's −1 in ``result.json``), explained in ``note``."""
    from kdlab.models.adapters import load_model

    model, ck = load_model(path, device)
    rec_name = ck["recipe"]["data"].get("name")
    if dataset and str(dataset) != str(rec_name):
        raise ValueError(f"{path} is a detector trained on {rec_name}; it is evaluated on its recipe's own "
                         f"{split} split: drop --dataset")
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    res = evaluate_detection_checkpoint(model, ck, split=split, data_dir=data_dir, device=device)
    undefined = [k for k in ("map_s", "map_m", "map_l") if not math.isfinite(res[k])]
    res = {"checkpoint": str(path), **{k: ("n/a" if k in undefined else v) for k, v in res.items()}}
    if undefined:
        res["note"] = (f"n/a: the {split} split has no object of that size ({', '.join(undefined)}; COCO: "
                       f"small below 32x32 px, medium below 96x96 px, large above); result.json stores COCOeval's -1")
    return res


@torch.no_grad()
def evaluate_detection_robustness(models: Mapping[str, torch.nn.Module], testset, info,
                                  corruptions: str | Sequence[str] | None = "standard",
                                  severities: Iterable[int] = SEVERITIES, seed: int = 0, batch_size: int = 100,
                                  device="cpu", *, reference: str | None = None, out_dir=None,
                                  progress: bool = False, known: Mapping[str, "DetectionRobustness"] | None = None,
                                  **post) -> DetectionRobustness:
    """COCO mAP of every detector on ``testset`` clean and under each corruption x severity (module
    doc); images are corrupted in ``[0, 1]``, then normalised with ``info.mean`` / ``info.std``.
    ``reference`` (default: the first model) is what mCE is relative to. ``known``: model name ->
    an earlier result on the same images, corruptions, severities and seed (its numbers are reused,
    the model is not run again; e.g. a study's teacher). ``post``: :func:`~kdlab.evaluate.detection.
    postprocess` options. Writes the result to ``out_dir`` when given."""
    from kdlab.core.progress import progress_bar

    names, reference, corrs, sevs, n = check_robustness_inputs(
        "evaluate_detection_robustness", models, testset, corruptions, severities, batch_size, reference)
    known = dict(known or {})
    run = [m for m in names if m not in known]
    for m in run:
        models[m].to(device).eval()
    mean = torch.tensor(info.mean, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
    hw = tuple(info.hw)
    sources = [("clean", 0)] + [(c, s) for c in corrs for s in sevs]
    bar = progress_bar(len(sources) * math.ceil(n / batch_size), "robustness", "batch", enabled=progress and bool(run))
    clean: dict[str, dict[str, float]] = {}
    perf = {m: {k: {c: {} for c in corrs} for k in KEYS} for m in names}
    for m, r in known.items():
        if m in models:
            clean[m] = dict(r.clean[m])
            for k in KEYS:
                for c in corrs:
                    for s in sevs:
                        perf[m][k][c][s] = r.perf[m][k][c][s]
    for c, s in sources:
        if not run:
            break
        bar.set_postfix_str(c if s == 0 else f"{c} s{s}")
        gts, dets = [], {m: [] for m in run}
        for x, y, i in raw_batches(testset, batch_size):
            x = x.float()
            if s:
                x = corrupt(x, c, s, seed, index=np.arange(i, i + x.shape[0]))
            x = (x.to(device) - mean) / std
            gts += targets_to_lists(y)
            for m in run:
                out = models[m](x).float()
                for b, sc, l in postprocess(out, layout_of(models[m], x), **post):
                    dets[m].append((b.cpu().numpy(), sc.cpu().numpy(), l.cpu().numpy()))
            bar.update(1)
        for m in run:
            res = coco_map(gts, dets[m], info.num_classes, image_sizes=[hw] * len(gts))
            if s == 0:
                clean[m] = {k: float(res[k]) for k in KEYS}
            else:
                for k in KEYS:
                    perf[m][k][c][s] = float(res[k])
    bar.close()
    out = DetectionRobustness(models=names, corruptions=corrs, severities=sevs, reference=reference, clean=clean,
                              perf=perf, n_images=n, seed=int(seed),
                              settings={"batch_size": batch_size, "dataset": getattr(info, "name", None),
                                        "boxes": "unchanged (corruptions act on the image only)", **post})
    if out_dir is not None:
        out.write(out_dir)
    return out


__all__ = ["DetectionRobustness", "KEYS", "checkpoint_split", "coco_map", "evaluate_detection_checkpoint", "evaluate_detection_file",
           "is_detection_checkpoint", "corruption_errors", "detection_robustness_metrics",
           "evaluate_detection_robustness", "mean_performance", "raw_batches"]
