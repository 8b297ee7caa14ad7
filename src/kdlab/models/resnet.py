"""CIFAR-style ResNet-18/34/50/101 (He et al. 2016, as adapted for 32x32 inputs).

Stem: 3x3 stride-1 conv (64 ch) + BN + ReLU, no max-pool; then ``layer1..layer4`` with strides
1, 2, 2, 2 and 64/128/256/512 planes (times ``width``), adaptive average pool and a linear ``fc``.
Shortcuts are identity, or 1x1 conv + BN where the shape changes. ``cbam=True`` applies a CBAM
block (:mod:`kdlab.models.cbam`) to each residual branch before the addition (Woo et al. 2018).

The adaptive pool makes the same network work on 8x8 single-channel digits (spatial sizes
8 -> 8 -> 4 -> 2 -> 1) as well as on 32x32 RGB images.
"""

from __future__ import annotations

import torch
from torch import nn

from ._registry import add_classifier_head, check_width, register_model, scaled
from .cbam import CBAM


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3x3 convs. Params: 9*cin*p + 9*p*p + 4p (+ cin*p + 2p for a projection shortcut)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, cbam: bool = False):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.cbam = CBAM(cout) if cbam else None
        self.shortcut = _shortcut(cin, cout, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.cbam is not None:
            out = self.cbam(out)
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand (x4)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, cbam: bool = False):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.cbam = CBAM(cout) if cbam else None
        self.shortcut = _shortcut(cin, cout, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.cbam is not None:
            out = self.cbam(out)
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet. ``stage_names = ("layer1", ..., "layer4")``, classifier ``fc``."""

    classifier_name = "fc"

    def __init__(self, block: type, num_blocks: list[int], num_classes: int = 10,
                 in_channels: int = 3, width: float = 1.0, cbam: bool = False):
        super().__init__()
        width = check_width(width)
        stem = scaled(64, width)
        self.conv1 = nn.Conv2d(in_channels, stem, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        cin = stem
        channels = []
        for i, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2))):
            planes = scaled(planes, width)
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, stride if j == 0 else 1, cbam=cbam))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            channels.append(cin)
        add_classifier_head(self, cin, num_classes, ("layer1", "layer2", "layer3", "layer4"), channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _builder(name: str, block: type, num_blocks: list[int], params: str):
    desc = (f"CIFAR {name.replace('resnet', 'ResNet-')} ({block.__name__} {num_blocks}, 3x3 stem, "
            f"no max-pool; {params} params at 10 classes); kwargs width, cbam")

    @register_model(name, desc)
    def build(num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
              cbam: bool = False) -> ResNet:
        if not isinstance(cbam, bool):
            raise ValueError(f"cbam must be true or false, got {cbam!r}")
        return ResNet(block, num_blocks, num_classes, in_channels, width=width, cbam=cbam)

    build.__name__ = name
    return build


resnet18 = _builder("resnet18", BasicBlock, [2, 2, 2, 2], "11.17M")
resnet34 = _builder("resnet34", BasicBlock, [3, 4, 6, 3], "21.28M")
resnet50 = _builder("resnet50", Bottleneck, [3, 4, 6, 3], "23.52M")
resnet101 = _builder("resnet101", Bottleneck, [3, 4, 23, 3], "42.51M")
