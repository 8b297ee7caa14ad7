"""Views of a sample: what a model sees of it (privileged information across resolutions).

``student.input: {resize: [H, W]}``: the teacher sees the full (augmented, normalised) image, the
student :func:`resize_view` of it: area averaging when shrinking (each output pixel the mean of
the input pixels it covers, as a coarser sensor would record; adaptive average pooling), bilinear
interpolation when enlarging. Both are linear with weights that sum to one, so they commute with
the per-channel normalisation ``(x − mean) / std``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F


def resize_view(x: torch.Tensor, hw) -> torch.Tensor:
    """``x`` [B, C, H, W] resized to ``hw = (H', W')``: area averaging when no side grows
    (``adaptive_avg_pool2d``; 28→14 averages 2×2 blocks), else bilinear (align_corners=False)."""
    hw = (int(hw[0]), int(hw[1]))
    if tuple(x.shape[-2:]) == hw:
        return x
    if hw[0] <= x.shape[-2] and hw[1] <= x.shape[-1]:
        return F.adaptive_avg_pool2d(x, hw)
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False)


def make_view(input_cfg) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The view function of a ``student.input`` section (None: the full image)."""
    if input_cfg is None or input_cfg.resize is None:
        return None
    hw = tuple(input_cfg.resize)
    return lambda x: resize_view(x, hw)


class ViewLoader:
    """A loader whose batches ``(x, y, idx)`` are ``(view(x), y, idx)`` (evaluation in the
    student's view); everything else is the wrapped loader's."""

    def __init__(self, loader, view: Callable[[torch.Tensor], torch.Tensor]):
        self.loader, self.view = loader, view

    def epoch(self, e: int):
        for x, y, idx in self.loader.epoch(e):
            yield self.view(x), y, idx

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)
