"""Pruning: unstructured (masks on weights) and structured (channels physically removed).

Unstructured pruning zeroes individual weights of the Conv/Linear layers (biases and
normalisation layers are never pruned):

* **importance**: ``magnitude`` (``|w|``) or ``gradient`` (``sum over batches of |w * dL/dw|``,
  the first-order Taylor estimate of the loss change, accumulated one batch at a time);
* **scope**: ``local`` (each layer loses the same fraction of its weights) or ``global``
  (one threshold over all prunable weights, so layers lose different fractions);
* the requested sparsity is reached **exactly**: ``round(sparsity * n)`` weights with the lowest
  scores are zeroed (ties broken by position, so the count never overshoots).

The pruned weights are kept at zero during fine-tuning by re-applying the masks after every
optimiser step (:func:`kdlab.compress.finetune.finetune` takes ``masks``). Unstructured sparsity
does not shrink a dense file or speed up dense kernels; it is a measure of redundancy.

Structured pruning removes whole output channels of convolutions (and the matching input
channels of the layers that consume them, BN entries, residual partners ...) with the
dependency graph of Torch-Pruning (``torch_pruning``), so parameters, FLOPs and latency really
drop. ``ratio`` is the fraction of channels removed from every prunable layer (``local``) or
chosen by one global ranking (``global``); the classifier's outputs are never pruned.
Importance is the group L2 magnitude or the group Taylor score (``gradient``).

A structurally pruned model no longer matches its registry name's shapes. kdlab stores it as a
normal ``model_checkpoint`` (state dict + model name) plus ``pruned["arch"]``: the constructor
sizes of every Conv/Linear/norm layer (:func:`layer_specs`). :func:`kdlab.compress.load_compressed`
rebuilds the named model, resizes those layers (:func:`apply_layer_specs`) and loads the state
dict; no pickled code is involved.

Iterative pruning (:func:`prune_iterative`) prunes in ``steps`` stages to the target, calling a
fine-tune function after each stage (optionally distilled from the unpruned model).
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# --------------------------------------------------------------------------- unstructured
def prunable_layers(model: nn.Module, *, include_classifier: bool = True,
                    exclude: Sequence[str] = ()) -> dict[str, nn.Module]:
    """``{name: module}`` of the Conv/Linear layers whose weights may be pruned."""
    skip = set(exclude)
    if not include_classifier:
        skip.add(getattr(model, "classifier_name", "fc"))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE) and n not in skip}
    if not layers:
        raise ValueError("the model has no Conv/Linear layer to prune")
    return layers


def magnitude_scores(model: nn.Module, layers: Iterable[str] | None = None) -> dict:
    """``{name: |weight|}``."""
    names = list(layers) if layers is not None else list(prunable_layers(model))
    return {n: model.get_submodule(n).weight.detach().abs().clone() for n in names}


def _xy(batch):
    if isinstance(batch, (tuple, list)):
        return batch[0], batch[1]
    raise ValueError("gradient importance needs labelled batches (x, y, ...)")


def gradient_scores(model: nn.Module, batches: Iterable, *, layers: Iterable[str] | None = None,
                    loss_fn: Callable | None = None, max_batches: int | None = None) -> dict:
    """``{name: sum_b |w * g_b|}``: ``g_b`` the gradient of the loss on batch ``b``.

    ``batches`` yields ``(x, y, ...)``; ``loss_fn(logits, y)`` defaults to cross-entropy. The
    model's mode is kept (use eval mode for BN statistics that do not move); its ``.grad`` fields
    are cleared afterwards.
    """
    names = list(layers) if layers is not None else list(prunable_layers(model))
    loss_fn = loss_fn or F.cross_entropy
    scores = {n: torch.zeros_like(model.get_submodule(n).weight) for n in names}
    n_b = 0
    for i, b in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x, y = _xy(b)
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        with torch.no_grad():
            for n in names:
                w = model.get_submodule(n).weight
                if w.grad is not None:
                    scores[n] += (w * w.grad).abs()
        n_b += 1
    model.zero_grad(set_to_none=True)
    if n_b == 0:
        raise ValueError("no batches given for gradient importance; pass training batches")
    return {n: s.detach() for n, s in scores.items()}


def _k_smallest_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean keep-mask with exactly ``k`` False entries at the lowest scores (stable ties)."""
    flat = score.flatten()
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(flat, stable=True).indices[:k]
        keep[idx] = False
    return keep.view_as(score)


def compute_masks(scores: dict, sparsity: float, scope: str = "global") -> dict:
    """Keep-masks (True = kept) that zero exactly ``round(sparsity * n)`` weights.

    ``local``: per layer, ``n`` = the layer's weights. ``global``: ``n`` = all weights in
    ``scores``, ranked together.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1) (fraction of weights removed), got {sparsity}")
    if scope == "local":
        return {n: _k_smallest_mask(s, int(round(sparsity * s.numel()))) for n, s in scores.items()}
    if scope != "global":
        raise ValueError(f"scope must be 'local' or 'global', got {scope!r}")
    names = list(scores)
    flat = torch.cat([scores[n].flatten().float().cpu() for n in names])
    keep = _k_smallest_mask(flat, int(round(sparsity * flat.numel())))
    out, i = {}, 0
    for n in names:
        s = scores[n]
        out[n] = keep[i:i + s.numel()].view_as(s).to(s.device)
        i += s.numel()
    return out


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict) -> nn.Module:
    """Zero the pruned weights in place (``weight *= mask``)."""
    for n, m in masks.items():
        w = model.get_submodule(n).weight
        w.mul_(m.to(device=w.device, dtype=w.dtype))
    return model


def sparsity_report(model: nn.Module, layers: Iterable[str] | None = None) -> dict:
    """Zeros among the prunable weights: ``{"zeros", "total", "sparsity", "per_layer"}``."""
    names = list(layers) if layers is not None else list(prunable_layers(model))
    per, z_all, n_all = {}, 0, 0
    for n in names:
        w = model.get_submodule(n).weight
        z, t = int((w == 0).sum()), w.numel()
        per[n] = z / t
        z_all += z
        n_all += t
    return {"zeros": z_all, "total": n_all, "sparsity": z_all / max(n_all, 1), "per_layer": per}


def prune_unstructured(model: nn.Module, sparsity: float, *, scope: str = "global",
                       importance: str = "magnitude", batches: Iterable | None = None,
                       include_classifier: bool = True, max_batches: int | None = None,
                       inplace: bool = False) -> tuple[nn.Module, dict]:
    """Zero a fraction ``sparsity`` of the prunable weights; returns ``(model, masks)``."""
    model = model if inplace else copy.deepcopy(model)
    layers = list(prunable_layers(model, include_classifier=include_classifier))
    if importance == "magnitude":
        scores = magnitude_scores(model, layers)
    elif importance == "gradient":
        if batches is None:
            raise ValueError("importance 'gradient' needs batches (give a dataset)")
        scores = gradient_scores(model, batches, layers=layers, max_batches=max_batches)
    else:
        raise ValueError(f"importance must be 'magnitude' or 'gradient', got {importance!r}")
    masks = compute_masks(scores, sparsity, scope)
    apply_masks(model, masks)
    return model, masks


# --------------------------------------------------------------------------- structured
def _classifier(model: nn.Module) -> nn.Module | None:
    name = getattr(model, "classifier_name", None)
    if name:
        try:
            return model.get_submodule(name)
        except AttributeError:
            pass
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last


class StructuredPruner:
    """Torch-Pruning channel pruner over ``steps`` stages (one stage = one :meth:`step`).

    After stage ``i`` (1-based) every prunable layer has lost ``int(C * ratio * i / steps)`` of
    its ``C`` original channels (``local``), or the globally ranked equivalent (``global``).
    """

    def __init__(self, model: nn.Module, ratio: float, example_input: torch.Tensor, *,
                 importance: str = "magnitude", scope: str = "local", steps: int = 1,
                 ignored: Sequence[nn.Module] | None = None, round_to: int | None = None):
        try:
            import torch_pruning as tp
        except ImportError:
            raise ImportError("structured pruning needs torch-pruning: pip install 'kdlab[deploy]'") from None
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"ratio must be in (0, 1) (fraction of channels removed), got {ratio}")
        if scope not in ("local", "global"):
            raise ValueError(f"scope must be 'local' or 'global', got {scope!r}")
        if importance == "magnitude":
            imp = tp.importance.GroupMagnitudeImportance(p=2)
        elif importance == "gradient":
            imp = tp.importance.GroupTaylorImportance()
        else:
            raise ValueError(f"importance must be 'magnitude' or 'gradient', got {importance!r}")
        if ignored is None:
            clf = _classifier(model)
            ignored = [clf] if clf is not None else []
        self.model = model
        self.importance = importance
        self.example_input = example_input
        self.steps = int(steps)
        self.pruner = tp.pruner.MetaPruner(
            model, example_input, importance=imp, pruning_ratio=float(ratio),
            global_pruning=(scope == "global"), iterative_steps=self.steps,
            ignored_layers=list(ignored), round_to=round_to)

    def step(self, batches: Iterable | None = None, max_batches: int | None = None) -> nn.Module:
        """Prune one stage; ``gradient`` importance first accumulates gradients on ``batches``."""
        if self.importance == "gradient":
            if batches is None:
                raise ValueError("importance 'gradient' needs batches (give a dataset)")
            self.model.zero_grad(set_to_none=True)
            n = 0
            for i, b in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                x, y = _xy(b)
                F.cross_entropy(self.model(x), y).backward()
                n += 1
            if n == 0:
                raise ValueError("no batches given for gradient importance")
        self.pruner.step()
        self.model.zero_grad(set_to_none=True)
        _refresh_attrs(self.model)
        return self.model


def prune_structured(model: nn.Module, ratio: float, input_shape: Sequence[int], *,
                     importance: str = "magnitude", scope: str = "local",
                     batches: Iterable | None = None, max_batches: int | None = None,
                     inplace: bool = False) -> nn.Module:
    """One-shot channel pruning removing ``ratio`` of the channels; returns the smaller model."""
    model = model if inplace else copy.deepcopy(model)
    shape = tuple(input_shape)
    shape = (1,) + shape if len(shape) == 3 else (1,) + shape[1:]
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    StructuredPruner(model, ratio, torch.zeros(shape, device=dev), importance=importance,
                     scope=scope).step(batches, max_batches)
    model.train(was)
    return model


def _refresh_attrs(model: nn.Module) -> None:
    """Keep ``feature_dim`` equal to the classifier's input size after channel removal."""
    clf = _classifier(model)
    if isinstance(clf, nn.Linear) and hasattr(model, "feature_dim"):
        model.feature_dim = clf.in_features


# --------------------------------------------------------------------------- architecture record
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def layer_specs(model: nn.Module) -> dict:
    """Constructor sizes of every Conv/Linear/norm layer: ``{name: {...}}`` (JSON-friendly)."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[n] = {"in_channels": m.in_channels, "out_channels": m.out_channels,
                      "groups": m.groups}
        elif isinstance(m, nn.Linear):
            out[n] = {"in_features": m.in_features, "out_features": m.out_features}
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            out[n] = {"num_features": m.num_features}
        elif isinstance(m, nn.GroupNorm):
            out[n] = {"num_groups": m.num_groups, "num_channels": m.num_channels}
        elif isinstance(m, nn.LayerNorm):
            out[n] = {"normalized_shape": list(m.normalized_shape)}
    return out


def _resized(m: nn.Module, spec: dict) -> nn.Module:
    if isinstance(m, nn.modules.conv._ConvNd):
        if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            raise ValueError("resizing transposed convolutions is not supported")
        new = type(m)(spec["in_channels"], spec["out_channels"], m.kernel_size, stride=m.stride,
                      padding=m.padding, dilation=m.dilation, groups=spec["groups"],
                      bias=m.bias is not None, padding_mode=m.padding_mode)
    elif isinstance(m, nn.Linear):
        new = type(m)(spec["in_features"], spec["out_features"], bias=m.bias is not None)
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        new = type(m)(spec["num_features"], eps=m.eps, momentum=m.momentum, affine=m.affine,
                      track_running_stats=m.track_running_stats)
    elif isinstance(m, nn.GroupNorm):
        new = nn.GroupNorm(spec["num_groups"], spec["num_channels"], eps=m.eps, affine=m.affine)
    elif isinstance(m, nn.LayerNorm):
        new = nn.LayerNorm(spec["normalized_shape"], eps=m.eps,
                           elementwise_affine=m.elementwise_affine, bias=m.bias is not None)
    else:
        raise ValueError(f"cannot resize a {type(m).__name__}")
    return new


def apply_layer_specs(model: nn.Module, specs: dict) -> nn.Module:
    """Replace (in place) every layer whose recorded sizes differ from the model's."""
    current = layer_specs(model)
    for name, spec in specs.items():
        if name not in current:
            raise ValueError(f"pruned layer {name!r} is not in the model; "
                             f"the checkpoint was made from another architecture")
        if current[name] == spec:
            continue
        old = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _resized(old, spec).to(next(old.parameters(), torch.empty(0)).device))
    _refresh_attrs(model)
    return model


# --------------------------------------------------------------------------- iterative
def sparsity_schedule(target: float, steps: int, kind: str = "linear") -> list[float]:
    """Sparsities after each of ``steps`` stages, ending exactly at ``target``.

    ``linear``: ``target * i / steps``; ``cubic`` (Zhu & Gupta 2017):
    ``target * (1 - (1 - i/steps)^3)``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if kind == "linear":
        return [target * i / steps for i in range(1, steps + 1)]
    if kind == "cubic":
        return [target * (1 - (1 - i / steps) ** 3) for i in range(1, steps + 1)]
    raise ValueError(f"schedule must be 'linear' or 'cubic', got {kind!r}")


def prune_iterative(model: nn.Module, target: float, *, steps: int = 3, method: str = "unstructured",
                    scope: str = "global", importance: str = "magnitude",
                    input_shape: Sequence[int] | None = None, batches_fn: Callable | None = None,
                    finetune_fn: Callable | None = None, schedule: str = "linear",
                    include_classifier: bool = True, max_batches: int | None = 8,
                    progress: bool = True) -> tuple[nn.Module, dict | None, list[dict]]:
    """Prune → fine-tune → repeat until ``target``; returns ``(model, masks, history)``.

    ``method``: ``unstructured`` (``target`` = weight sparsity, reached exactly at the last
    stage) or ``structured`` (``target`` = channel ratio). ``batches_fn()`` returns fresh
    ``(x, y, ...)`` batches (for gradient importance). ``finetune_fn(model, masks)`` fine-tunes
    in place after each stage (``masks`` is None for structured) and may return a dict that is
    added to the history. The input model is not modified.
    """
    from kdlab.core.progress import progress_bar

    model = copy.deepcopy(model)
    history, masks = [], None
    levels = sparsity_schedule(target, steps, schedule)
    bar = progress_bar(steps, f"prune {method}", "stage", enabled=progress, end_line=False)
    if method == "structured":
        if input_shape is None:
            raise ValueError("structured pruning needs input_shape (C, H, W)")
        shape = tuple(input_shape)
        shape = (1,) + shape if len(shape) == 3 else (1,) + shape[1:]
        dev = next(model.parameters()).device
        was = model.training
        model.eval()
        pruner = StructuredPruner(model, target, torch.zeros(shape, device=dev),
                                  importance=importance, scope=scope, steps=steps)
        model.train(was)
    elif method != "unstructured":
        raise ValueError(f"method must be 'unstructured' or 'structured', got {method!r}")
    for i in range(steps):
        if method == "structured":
            was = model.training
            model.eval()
            pruner.step(batches_fn() if batches_fn else None, max_batches)
            model.train(was)
            rec = {"stage": i + 1, "ratio": levels[i]}
        else:
            model, masks = prune_unstructured(
                model, levels[i], scope=scope, importance=importance,
                batches=batches_fn() if (batches_fn and importance == "gradient") else None,
                include_classifier=include_classifier, max_batches=max_batches, inplace=True)
            rec = {"stage": i + 1, "sparsity": levels[i]}
        if finetune_fn is not None:
            extra = finetune_fn(model, masks)
            if isinstance(extra, dict):
                rec.update(extra)
        history.append(rec)
        bar.update(1)
    bar.close()
    return model, masks, history


__all__ = [
    "prunable_layers", "magnitude_scores", "gradient_scores", "compute_masks", "apply_masks",
    "sparsity_report", "prune_unstructured", "StructuredPruner", "prune_structured",
    "layer_specs", "apply_layer_specs", "sparsity_schedule", "prune_iterative",
]
