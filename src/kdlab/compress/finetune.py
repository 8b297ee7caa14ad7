"""A small fine-tuning loop for pruned and quantization-aware models, and accuracy evaluation.

``kdlab.train.trainer.train`` trains a model built from a recipe; a pruned or fake-quantized model is
an already built module, so compression has this loop of its own: SGD with momentum and a cosine
learning rate, cross-entropy on the labels, optionally distilled from a teacher (Hinton KD,
``(1 - alpha) * CE + alpha * kd_loss(s, t, T)``), pruning masks re-applied after every step.
Batches come from :class:`kdlab.data.BatchLoader` (``loader.epoch(e)`` yields ``(x, y, idx)``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.compress.prune import apply_masks


def _kd(s_logits, t_logits, T):
    try:
        from kdlab.distill.losses.response import kd_loss
    except ImportError:  # pragma: no cover - the losses package is always there in a release
        log_p_s = F.log_softmax(s_logits / T, dim=1)
        log_p_t = F.log_softmax(t_logits / T, dim=1)
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean() * T * T
    return kd_loss(s_logits, t_logits, T)


def finetune(model: nn.Module, loader, *, epochs: int = 1, lr: float = 0.01,
             momentum: float = 0.9, weight_decay: float = 5e-4, teacher: nn.Module | None = None,
             alpha: float = 0.9, T: float = 4.0, masks: dict | None = None,
             seed: int = 0, max_steps: int | None = None, device: str | torch.device = "cpu",
             progress: bool = True, desc: str = "fine-tune",
             on_epoch: Callable[[int, nn.Module], dict | None] | None = None) -> list[dict]:
    """Fine-tune ``model`` in place; returns one ``{"epoch", "loss", ...}`` dict per epoch.

    ``teacher``: distil from it (KD on logits) with weight ``alpha``; ``masks``: keep-masks of
    unstructured pruning, re-applied after every optimiser step so pruned weights stay zero.
    ``max_steps`` caps the steps per epoch (for tests). ``on_epoch(e, model)`` may add metrics.
    """
    from tqdm.auto import tqdm

    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    dev = torch.device(device)
    model.to(dev)
    if teacher is not None:
        teacher = teacher.to(dev).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = len(loader) if max_steps is None else min(len(loader), max_steps)
    total = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    history = []
    step = 0
    for e in range(epochs):
        torch.manual_seed(seed * 1000 + e)
        model.train()
        tot, n = 0.0, 0
        bar = tqdm(loader.epoch(e), total=steps_per_epoch, desc=f"{desc} {e + 1}/{epochs}",
                   disable=not progress, leave=False)
        for i, (x, y, _) in enumerate(bar):
            if max_steps is not None and i >= max_steps:
                break
            x, y = x.to(dev), y.to(dev)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(x)
                loss = (1 - alpha) * loss + alpha * _kd(logits, t_logits, T)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if masks:
                apply_masks(model, masks)
            tot += float(loss.detach()) * y.numel()
            n += y.numel()
        rec = {"epoch": e + 1, "loss": tot / max(n, 1)}
        if on_epoch is not None:
            extra = on_epoch(e, model)
            if isinstance(extra, dict):
                rec.update(extra)
        history.append(rec)
    model.eval()
    return history


@torch.no_grad()
def evaluate_accuracy(model, loader, device: str | torch.device = "cpu",
                      max_batches: int | None = None) -> float:
    """Top-1 accuracy over ``loader.epoch(0)``; ``model`` may be any callable (e.g. an ONNX
    Runtime wrapper) returning logits."""
    if isinstance(model, nn.Module):
        was = model.training
        model.eval()
    correct = total = 0
    for i, (x, y, _) in enumerate(loader.epoch(0)):
        if max_batches is not None and i >= max_batches:
            break
        if isinstance(model, nn.Module):
            x = x.to(device)
        logits = model(x)
        correct += int((logits.argmax(1).cpu() == y.cpu()).sum())
        total += y.numel()
    if isinstance(model, nn.Module):
        model.train(was)
    if total == 0:
        raise ValueError("the evaluation split is empty")
    return correct / total


__all__ = ["finetune", "evaluate_accuracy"]
