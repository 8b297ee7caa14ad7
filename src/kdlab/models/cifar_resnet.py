"""The CIFAR models of the KD benchmarks (CRD, Tian et al. 2020; mdistiller).

* ``resnet{8,14,20,32,44,56,110}``: depth ``6n+2``, three stages of ``n`` BasicBlocks with
  16/32/64 channels (stem 16); 1x1 conv + BN shortcuts where the shape changes.
* ``resnet8x4`` / ``resnet32x4``: the same with stem 32 and stages 64/128/256.
* ``wrn_D_K``: pre-activation wide ResNet (Zagoruyko & Komodakis 2016), depth ``D = 6n+4``,
  stages 16K/32K/64K, stem 16, final BN-ReLU before pooling. Any ``wrn_D_K`` name is accepted by
  :func:`kdlab.models.create_model`; common ones are registered.

Pooling is adaptive (the originals use ``AvgPool2d(8)``), so 8x8 inputs also work; parameter
counts are unchanged.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ._registry import add_classifier_head, register_model


class BasicBlock(nn.Module):
    """Post-activation basic block: conv-BN-ReLU-conv-BN, add shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """``stage_names = ("layer1", "layer2", "layer3")``, classifier ``fc``."""

    classifier_name = "fc"

    def __init__(self, depth: int, filters: tuple[int, int, int, int], num_classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        self.relu = nn.ReLU()
        cin = filters[0]
        for i, (cout, stride) in enumerate(zip(filters[1:], (1, 2, 2))):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, stride if j == 0 else 1))
                cin = cout
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        add_classifier_head(self, cin, num_classes, ("layer1", "layer2", "layer3"), filters[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet(name: str, depth: int, filters: tuple[int, int, int, int], note: str):
    @register_model(name, f"CIFAR {name} (KD benchmark; depth {depth}, channels "
                          f"{filters[0]}/{'/'.join(map(str, filters[1:]))}; {note} params at 10 classes)")
    def build(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
        return CifarResNet(depth, filters, num_classes, in_channels)

    build.__name__ = name
    return build


_SMALL = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)
resnet8 = _resnet("resnet8", 8, _SMALL, "0.08M")
resnet14 = _resnet("resnet14", 14, _SMALL, "0.18M")
resnet20 = _resnet("resnet20", 20, _SMALL, "0.27M")
resnet32 = _resnet("resnet32", 32, _SMALL, "0.47M")
resnet44 = _resnet("resnet44", 44, _SMALL, "0.66M")
resnet56 = _resnet("resnet56", 56, _SMALL, "0.86M")
resnet110 = _resnet("resnet110", 110, _SMALL, "1.73M")
resnet8x4 = _resnet("resnet8x4", 8, _X4, "1.21M")
resnet32x4 = _resnet("resnet32x4", 32, _X4, "7.41M")


# --------------------------------------------------------------------------- wide ResNets
class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus shortcut.

    The shortcut is the identity when shapes match, else a bias-free 1x1 conv applied to the
    pre-activated input (as in the original WRN code).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.equal = cin == cout and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu(self.bn1(x))
        out = self.conv1(a)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + (x if self.equal else self.shortcut(a))


class WideResNet(nn.Module):
    """``stage_names = ("block1", "block2", "block3")`` (pre-activation stage outputs, as used by
    attention transfer); ``bn_final`` + ReLU follow ``block3``; classifier ``fc``."""

    classifier_name = "fc"

    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_channels: int = 3,
                 drop_rate: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        if widen < 1:
            raise ValueError(f"WRN widen factor must be an integer >= 1, got {widen}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        n = (depth - 4) // 6
        ch = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, padding=1, bias=False)
        cin = ch[0]
        for i, (cout, stride) in enumerate(zip(ch[1:], (1, 2, 2))):
            blocks = []
            for j in range(n):
                blocks.append(WideBlock(cin, cout, stride if j == 0 else 1, drop_rate))
                cin = cout
            setattr(self, f"block{i + 1}", nn.Sequential(*blocks))
        self.bn_final = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        add_classifier_head(self, cin, num_classes, ("block1", "block2", "block3"), ch[1:])
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn_final(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


WRN_PATTERN = re.compile(r"wrn_(\d+)_(\d+)")


def wrn_builder(depth: int, widen: int):
    """A builder for ``wrn_{depth}_{widen}`` (also used for unregistered ``wrn_D_K`` names)."""

    def build(num_classes: int = 10, in_channels: int = 3, drop_rate: float = 0.0) -> WideResNet:
        return WideResNet(depth, widen, num_classes, in_channels, drop_rate=drop_rate)

    build.__name__ = f"wrn_{depth}_{widen}"
    return build


for _d, _k, _p in [(16, 1, "0.18M"), (16, 2, "0.69M"), (16, 4, "2.75M"), (16, 8, "10.96M"),
                   (28, 10, "36.5M"), (40, 1, "0.56M"), (40, 2, "2.24M"), (40, 4, "8.95M")]:
    register_model(f"wrn_{_d}_{_k}",
                   f"Wide ResNet WRN-{_d}-{_k} (pre-activation, stages {16 * _k}/{32 * _k}/{64 * _k}; "
                   f"{_p} params at 10 classes); kwarg drop_rate")(wrn_builder(_d, _k))
