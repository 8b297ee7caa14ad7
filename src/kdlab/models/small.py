"""Small CNNs that train in seconds on CPU (8x8 digits, 32x32 images): a size ladder for
teacher/student experiments.

Each model is three named stages ``stage1..stage3`` of conv3x3-BN-ReLU units; the first unit of
``stage2`` and ``stage3`` has stride 2 (8x8 -> 8, 4, 2; 32x32 -> 32, 16, 8), then global average
pooling, optional dropout and a linear ``fc``. Channel counts are multiplied by ``width``.

=============  ================  ===============  ==================================
name           channels          convs per stage  params (10 classes, 3 in / 1 in)
=============  ================  ===============  ==================================
cnn_tiny       8 / 16 / 32       1                6,418 / 6,274
cnn_small      16 / 32 / 64      1                24,346 / 24,058
cnn_medium     32 / 64 / 128     2                288,746 / 288,170
cnn_large      64 / 128 / 256    2                1,148,874 / 1,147,722
=============  ================  ===============  ==================================
"""

from __future__ import annotations

import torch
from torch import nn

from ._registry import add_classifier_head, check_width, register_model, scaled


class ConvBNReLU(nn.Sequential):
    """conv3x3 (no bias) + BN + ReLU: ``9 * cin * cout + 2 * cout`` parameters."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()


class SmallCNN(nn.Module):
    """``stage_names = ("stage1", "stage2", "stage3")``, classifier ``fc``."""

    classifier_name = "fc"

    def __init__(self, channels: tuple[int, ...], convs_per_stage: int, num_classes: int = 10,
                 in_channels: int = 3, width: float = 1.0, dropout: float = 0.0):
        super().__init__()
        width = check_width(width)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        cin = in_channels
        names, chans = [], []
        for i, c in enumerate(channels):
            cout = scaled(c, width)
            units = []
            for j in range(convs_per_stage):
                units.append(ConvBNReLU(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
            setattr(self, f"stage{i + 1}", nn.Sequential(*units))
            names.append(f"stage{i + 1}")
            chans.append(cout)
        add_classifier_head(self, cin, num_classes, names, chans,
                            dropout=nn.Dropout(dropout) if dropout > 0 else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


def _cnn(name: str, channels: tuple[int, int, int], convs: int, note: str):
    @register_model(name, f"small CNN, stages {'/'.join(map(str, channels))} x{convs} conv-BN-ReLU "
                          f"({note} params at 10 classes, RGB); kwargs width, dropout")
    def build(num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
              dropout: float = 0.0) -> SmallCNN:
        return SmallCNN(channels, convs, num_classes, in_channels, width=width, dropout=dropout)

    build.__name__ = name
    return build


cnn_tiny = _cnn("cnn_tiny", (8, 16, 32), 1, "6.4k")
cnn_small = _cnn("cnn_small", (16, 32, 64), 1, "24k")
cnn_medium = _cnn("cnn_medium", (32, 64, 128), 2, "289k")
cnn_large = _cnn("cnn_large", (64, 128, 256), 2, "1.15M")
