"""An inference-only copy of a frozen model: BatchNorm folded into the preceding convolution.

:func:`fold_batchnorm` returns a *copy* (the user's model is never edited) in which every
``Conv → BatchNorm`` pair whose convolution feeds only that BatchNorm is replaced by one
convolution with the BatchNorm's affine map folded into its weights and bias
(``torch.nn.utils.fusion.fuse_conv_bn_eval``: ``w' = w·γ/√(σ²+ε)``, ``b' = (b−μ)·γ/√(σ²+ε)+β``),
and the BatchNorm by ``nn.Identity``. In eval mode this is exact up to float rounding.

The pairs are found from the model's graph (``torch.fx.symbolic_trace``), not guessed from the
order of its children; the module tree and its names are kept (only the two leaf modules change),
so forward hooks on any other module (``Taps``, causal masks) see the same values. A pair is left
alone when its convolution is a layer the caller taps (its output would change), when either
module is called more than once, or when the model cannot be traced (dynamic control flow): then
nothing is folded and ``reason`` says why. A model ``copy.deepcopy`` cannot copy is returned as it
is (with its ``reason``).
"""

from __future__ import annotations

import copy
from typing import Iterable, NamedTuple, Optional

import torch
from torch import nn


class Folded(NamedTuple):
    model: nn.Module          # the folded copy (eval mode, gradients off); the model itself if uncopyable
    pairs: list               # [(conv name, bn name)] that were folded
    reason: Optional[str]     # why nothing was folded (None when traced)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def conv_bn_pairs(model: nn.Module, keep: Iterable[str] = ()) -> tuple[list, Optional[str]]:
    """``[(conv name, bn name)]`` that may be folded exactly, and why none when tracing fails."""
    from torch import fx

    keep = set(keep)
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as e:  # noqa: BLE001 - any tracing failure means "do not fold"
        return [], f"{type(model).__name__} cannot be traced ({type(e).__name__})"
    mods = dict(model.named_modules())
    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    pairs = []
    for n in graph.nodes:
        if n.op != "call_module" or not isinstance(mods.get(n.target), _BNS) or len(n.args) != 1:
            continue
        src = n.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and isinstance(mods.get(src.target), _CONVS)):
            continue
        conv, bn = mods[src.target], mods[n.target]
        if (len(src.users) != 1 or calls[src.target] != 1 or calls[n.target] != 1 or src.target in keep
                or not bn.track_running_stats or bn.running_mean is None
                or conv.out_channels != bn.num_features or conv.padding_mode != "zeros"):
            continue
        pairs.append((src.target, n.target))
    return pairs, None


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def fold_batchnorm(model: nn.Module, keep: Iterable[str] = ()) -> Folded:
    """A folded eval-mode copy of ``model`` (see module doc); ``keep``: layer names whose own
    outputs must stay as they are (tapped layers)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    was_training = model.training
    model.eval()
    try:
        pairs, reason = conv_bn_pairs(model, keep)
    finally:
        model.train(was_training)
    try:
        out = copy.deepcopy(model).eval()
    except Exception as e:  # noqa: BLE001 - a model that cannot be copied runs as it is
        return Folded(model, [], f"{type(model).__name__} cannot be copied ({type(e).__name__})")
    for conv_name, bn_name in pairs:
        conv, bn = out.get_submodule(conv_name), out.get_submodule(bn_name)
        _set(out, conv_name, fuse_conv_bn_eval(conv, bn))
        _set(out, bn_name, nn.Identity())
    for p in out.parameters():
        p.requires_grad_(False)
    return Folded(out, pairs, reason)


@torch.no_grad()
def max_abs_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """Largest absolute difference of two models' outputs on ``x`` (a check, used by tests)."""
    return float((a(x) - b(x)).abs().max())
