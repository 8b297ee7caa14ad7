"""Top-1 accuracy and cross-entropy of a classifier over a loader: the one implementation that
training's validation and every command use (:mod:`kdlab.evaluate.accuracy` re-exports it).

A *loader* is anything with ``epoch(e)`` yielding ``(x, y, idx)`` (:class:`kdlab.data.BatchLoader`).
A *model* is an ``nn.Module`` or any callable returning logits (an ONNX Runtime session wrapper).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def predict(model, loader, device=None, amp: str = "none", max_batches: Optional[int] = None):
    """Logits (fp32) and labels of a whole split, in loader order, with the model in eval mode."""
    is_module = isinstance(model, nn.Module)
    if is_module:
        was = model.training
        model.eval()
        dev = torch.device(device) if device is not None else next(model.parameters()).device
    else:
        dev = torch.device("cpu")
    outs, ys = [], []
    try:
        for i, (x, y, _) in enumerate(loader.epoch(0)):
            if max_batches is not None and i >= max_batches:
                break
            # no autograd graph: evaluation needs no gradients (the values are the same)
            with torch.no_grad(), _autocast(dev, amp if is_module else "none"):
                out = model(x.to(dev) if is_module else x)
            outs.append(torch.as_tensor(out).float().to(dev))
            ys.append(y.to(dev))
    finally:
        if is_module:
            model.train(was)
    if not outs:
        raise ValueError("the evaluation split is empty; check the data set and its split fractions")
    return torch.cat(outs), torch.cat(ys)


def evaluate(model, loader, device=None, amp: str = "none", max_batches: Optional[int] = None) -> dict:
    """``{"acc": top-1, "loss": mean cross-entropy, "n": samples}`` of ``model`` on ``loader``."""
    logits, y = predict(model, loader, device, amp, max_batches)
    return {
        "acc": (logits.argmax(1) == y).float().mean().item(),
        "loss": F.cross_entropy(logits, y).item(),
        "n": int(y.numel()),
    }
