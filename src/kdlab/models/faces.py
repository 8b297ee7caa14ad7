"""Face-embedding networks for small grey or colour crops (``task: faces``, docs/faces.md).

Both return an **embedding** ``[N, embedding_size]`` (not logits; the ``num_classes`` argument of
the registry is accepted and ignored, since margin heads are loss terms that exist only in
training, :mod:`kdlab.distill.losses.faces`). Verification uses the L2-normalised embedding.

* ``iresnet_small``: an IResNet (Deng et al., ArcFace, CVPR 2019; Duta et al. 2020): stem
  conv3x3-BN-PReLU, stages of improved basic blocks ``BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN``
  plus a (1x1 conv-BN) shortcut when the shape changes, then the "output layer E":
  ``BN2d -> flatten -> Linear -> BN1d``.
* ``mobilefacenet_small``: a MobileFaceNet (Chen et al., CCBR 2018): conv3x3 s2, depthwise
  conv3x3, inverted-residual bottlenecks (expansion 2, PReLU), conv1x1, then the global depthwise
  convolution (GDC: a linear depthwise conv over the whole final map, here on a fixed 4x4 grid
  after adaptive average pooling so that any input size works), conv1x1 to the embedding, BN.
"""

from __future__ import annotations

import torch
from torch import nn

from ._registry import check_width, register_model, scaled


class IBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return self.body(x) + (x if self.short is None else self.short(x))


class IResNetSmall(nn.Module):
    """``stage_names = ("stage1", "stage2", "stage3")``; ``embedding`` is the output layer."""

    classifier_name = ""

    def __init__(self, in_channels: int = 1, channels=(32, 64, 128), blocks=(1, 2, 1), embedding_size: int = 128,
                 dropout: float = 0.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(channels[0]), nn.PReLU(channels[0]))
        cin = channels[0]
        names = []
        for k, (c, n) in enumerate(zip(channels, blocks)):
            layers = [IBasicBlock(cin if i == 0 else c, c, 2 if i == 0 else 1) for i in range(n)]
            setattr(self, f"stage{k + 1}", nn.Sequential(*layers))
            names.append(f"stage{k + 1}")
            cin = c
        self.stage_names = tuple(names)
        self.stage_channels = tuple(channels)
        self.pool = nn.AdaptiveAvgPool2d(4)  # 28 -> 14 -> 7 -> 4 already; other sizes pooled to 4x4
        self.bn = nn.BatchNorm2d(cin)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(cin * 16, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)
        self.feature_dim = embedding_size
        self.embedding_size = embedding_size

    def forward(self, x):
        x = self.stem(x)
        for n in self.stage_names:
            x = getattr(self, n)(x)
        x = self.drop(torch.flatten(self.bn(self.pool(x)), 1))
        return self.features(self.fc(x))


class Bottleneck(nn.Module):
    """Inverted residual: conv1x1 expand -> PReLU -> depthwise conv3x3 (stride) -> PReLU -> conv1x1."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int = 2):
        super().__init__()
        mid = cin * expansion
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.PReLU(mid),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.PReLU(mid),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileFaceNetSmall(nn.Module):
    """``stage_names = ("stage1", "stage2", "stage3")``."""

    classifier_name = ""

    def __init__(self, in_channels: int = 1, width: float = 1.0, embedding_size: int = 128):
        super().__init__()
        c1, c2, c3, c4 = (scaled(c, width) for c in (32, 48, 64, 256))
        self.stage1 = nn.Sequential(nn.Conv2d(in_channels, c1, 3, 1, 1, bias=False), nn.BatchNorm2d(c1), nn.PReLU(c1),
                                    nn.Conv2d(c1, c1, 3, 1, 1, groups=c1, bias=False), nn.BatchNorm2d(c1),
                                    nn.PReLU(c1))
        self.stage2 = nn.Sequential(Bottleneck(c1, c2, 2), Bottleneck(c2, c2, 1))  # 28 -> 14
        self.stage3 = nn.Sequential(Bottleneck(c2, c3, 2), Bottleneck(c3, c3, 1))  # 14 -> 7
        self.head = nn.Sequential(nn.Conv2d(c3, c4, 1, bias=False), nn.BatchNorm2d(c4), nn.PReLU(c4),
                                  nn.AdaptiveAvgPool2d(4))
        self.gdc = nn.Sequential(nn.Conv2d(c4, c4, 4, groups=c4, bias=False), nn.BatchNorm2d(c4))
        self.embed = nn.Conv2d(c4, embedding_size, 1, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        self.stage_names = ("stage1", "stage2", "stage3")
        self.stage_channels = (c1, c2, c3)
        self.feature_dim = embedding_size
        self.embedding_size = embedding_size

    def forward(self, x):
        x = self.stage3(self.stage2(self.stage1(x)))
        x = self.embed(self.gdc(self.head(x)))
        return self.features(torch.flatten(x, 1))


@register_model("iresnet_small", "face embedding IResNet (3 stages, 32/64/128 ch, blocks 1/2/1; "
                                 "output: embedding_size-d embedding, num_classes ignored)")
def iresnet_small(num_classes: int = 0, in_channels: int = 1, width: float = 1.0, embedding_size: int = 128,
                  blocks: tuple = (1, 2, 1), dropout: float = 0.0) -> nn.Module:
    w = check_width(width)
    return IResNetSmall(in_channels, tuple(scaled(c, w) for c in (32, 64, 128)), tuple(int(b) for b in blocks),
                        int(embedding_size), float(dropout))


@register_model("mobilefacenet_small", "face embedding MobileFaceNet (bottlenecks, GDC; output: "
                                       "embedding_size-d embedding, num_classes ignored)")
def mobilefacenet_small(num_classes: int = 0, in_channels: int = 1, width: float = 1.0,
                        embedding_size: int = 128) -> nn.Module:
    return MobileFaceNetSmall(in_channels, check_width(width), int(embedding_size))
