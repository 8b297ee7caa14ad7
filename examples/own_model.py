"""Distil your own, unregistered models on your own data with kdlab.fit.

The teacher is a plain nn.Module whose forward returns an object with ``.logits`` (as HuggingFace
models do); the student is an ``nn.Sequential``; the data is a ``torch.utils.data.Dataset`` of
non-square (24 x 40) two-channel images. Nothing is registered anywhere.

    python examples/own_model.py --out runs/own-model
    kdlab profile runs/own-model/student/best.pt
    kdlab export runs/own-model/student/best.pt
    kdlab evaluate runs/own-model/student/best.pt --dataset own_model:make_data   # (with examples/ on PYTHONPATH)
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch
from torch import nn

import kdlab

H, W, C, K = 24, 40, 2, 4


class StripesDataset(torch.utils.data.Dataset):
    """Class k: stripes of period 2 + k, horizontal or vertical by class parity, plus noise."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, K, (n,), generator=g)
        self.phase = torch.randint(0, 8, (n,), generator=g)
        self.noise = torch.rand(n, C, H, W, generator=g) * 0.6
        self.classes = [f"stripes{k}" for k in range(K)]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        k, p = int(self.y[i]), int(self.phase[i])
        coord = torch.arange(W if k % 2 else H)
        wave = ((coord + p) // (2 + k) % 2).float()
        img = wave.view(1, 1, W).expand(C, H, W) if k % 2 else wave.view(1, H, 1).expand(C, H, W)
        return (0.4 * img + self.noise[i]).clamp(0, 1), k


def make_data():
    """(train, val, test) datasets: also usable as `kdlab evaluate --dataset own_model:make_data`."""
    return StripesDataset(512, 0), StripesDataset(128, 1), StripesDataset(256, 2)


class Teacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(C, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                      nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(64, K)

    def forward(self, x):
        return SimpleNamespace(logits=self.head(self.features(x).mean((2, 3))))


def student():
    return nn.Sequential(nn.Conv2d(C, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, K))


def main(out: str = "runs/own-model", epochs: int = 8, progress: bool = True) -> dict:
    train, val, test = make_data()
    torch.manual_seed(0)
    teacher = Teacher()
    t = kdlab.fit(teacher, train_data=train, val_data=val, test_data=test, run_dir=f"{out}/teacher",
                  train={"epochs": epochs, "batch_size": 32, "optimizer": "adamw", "lr": 3e-3,
                         "weight_decay": 1e-4, "warmup_epochs": 1, "schedule": "cosine"}, progress=progress)
    s = kdlab.fit(student(), teacher, train_data=train, val_data=val, test_data=test, run_dir=f"{out}/student",
                  loss=[{"term": "ce", "weight": 0.1}, {"term": "kd", "weight": 0.9, "T": 4.0},
                        {"term": "at", "weight": 1.0, "layers": [["4", "features.6"]]}],
                  train={"epochs": epochs, "batch_size": 32, "optimizer": "adamw", "lr": 3e-3,
                         "warmup_epochs": 1, "schedule": "cosine"},
                  augment={"flip": True}, progress=progress)
    print(f"teacher test {t['test_acc']:.3f}; student test {s['test_acc']:.3f} -> {out}/student/best.pt")
    return {"teacher": t, "student": s}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/own-model")
    ap.add_argument("--epochs", type=int, default=8)
    a = ap.parse_args()
    main(a.out, a.epochs)
