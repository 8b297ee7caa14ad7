"""Deep Mutual Learning (Zhang et al., CVPR 2018): K peers trained together.

Each step, peer k minimises ``CE(z_k, y) + (1/(K−1)) Σ_{l≠k} KL(p_l ‖ p_k)`` with ``p = softmax(z)``
(the other peers' predictions detached, i.e. all peers updated simultaneously on the same batch).
The loop reuses kdlab's loader, evaluation and checkpoint helpers; every peer gets its own run
folder (best.pt chosen on validation accuracy, result.json with the test accuracy).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from kdlab.core.checkpoint import atomic_save, load_checkpoint, model_checkpoint
from kdlab.core.config import Recipe
from kdlab.data import BatchLoader, load_dataset
from kdlab.data.augment import AugmentSpec
from kdlab.train.trainer import _scheduler, evaluate, resolve_device
from kdlab.models import create_model
from kdlab.core.seeding import derive_seed, seed_everything


def dml_peer_loss(logits: list, y: torch.Tensor, k: int, T: float = 1.0) -> torch.Tensor:
    """Peer k's loss ``CE(z_k, y) + T²/(K−1) · Σ_{l≠k} KL(softmax(z_l/T) ‖ softmax(z_k/T))``."""
    K = len(logits)
    loss = F.cross_entropy(logits[k], y)
    if K > 1:
        log_pk = F.log_softmax(logits[k] / T, dim=1)
        kl = 0.0
        for l, z in enumerate(logits):
            if l != k:
                log_pl = F.log_softmax(z.detach() / T, dim=1)
                kl = kl + (log_pl.exp() * (log_pl - log_pk)).sum(1).mean()
        loss = loss + (T * T) * kl / (K - 1)
    return loss


def run_dml(recipe: Recipe, out_dir, *, peers: Optional[list[str]] = None, n_peers: int = 2,
            T: float = 1.0, progress: bool = False, log=print) -> dict:
    """Train ``peers`` (model names; default ``n_peers`` copies of the recipe's student) jointly."""
    out_dir = Path(out_dir)
    peers = list(peers) if peers else [recipe.student.model] * n_peers
    if len(peers) < 2:
        raise ValueError("DML needs at least two peers (e.g. --peers cnn_tiny cnn_tiny)")
    cfg, d, seed = recipe.train, recipe.data, recipe.train.seed
    dev = resolve_device(cfg.device)
    splits = load_dataset(d.name, d.data_dir, val_fraction=d.val_fraction,
                          label_fraction=d.label_fraction, seed=seed)
    info = splits.info
    models, opts, scheds = [], [], []
    for k, name in enumerate(peers):
        seed_everything(derive_seed(seed, "init", "peer", k))
        kw = dict(recipe.student.kwargs) if name == recipe.student.model else {}
        m = create_model(name, num_classes=info.num_classes, in_channels=info.in_channels, **kw).to(dev)
        models.append(m)
        o = torch.optim.SGD(m.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                            weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
        opts.append(o)
        scheds.append(_scheduler(o, cfg))
    aug = AugmentSpec(crop_pad=d.augment.crop_pad, flip=d.augment.flip)
    train_loader = BatchLoader(splits.train, cfg.batch_size, shuffle=True, seed=derive_seed(seed, "data"),
                               augment=aug, mean=info.mean, std=info.std, device=dev)
    kw = dict(shuffle=False, mean=info.mean, std=info.std, device=dev)
    val_loader = BatchLoader(splits.val, cfg.eval_batch_size, **kw)
    test_loader = BatchLoader(splits.test, cfg.eval_batch_size, **kw)
    best = [-1.0] * len(models)
    best_ep = [0] * len(models)
    dirs = [out_dir / f"peer{k}_{name}" for k, name in enumerate(peers)]
    for dd in dirs:
        dd.mkdir(parents=True, exist_ok=True)
    t_train = 0.0
    history = []
    for epoch in range(cfg.epochs):
        torch.manual_seed(derive_seed(seed, "epoch", epoch))
        for m in models:
            m.train()
        t0 = time.perf_counter()
        for x, y, _ in train_loader.epoch(epoch):
            logits = [m(x) for m in models]
            for k, o in enumerate(opts):
                loss = dml_peer_loss(logits, y, k, T)
                o.zero_grad(set_to_none=True)
                loss.backward()
                o.step()
        t_train += time.perf_counter() - t0
        row = {"epoch": epoch + 1}
        for k, m in enumerate(models):
            scheds[k].step()
            v = evaluate(m, val_loader)
            row[f"peer{k}_val_acc"] = v["acc"]
            if v["acc"] > best[k]:
                best[k], best_ep[k] = v["acc"], epoch + 1
                atomic_save(model_checkpoint(m, model_name=peers[k], model_kwargs={}, num_classes=info.num_classes,
                                             in_channels=info.in_channels, dataset=info.name, epoch=epoch + 1,
                                             recipe=recipe.to_dict(), seed=seed, method=f"dml-peer{k}"),
                            dirs[k] / "best.pt")
        history.append(row)
        if progress:
            log(json.dumps(row))
    results = []
    for k, m in enumerate(models):
        m.load_state_dict(load_checkpoint(dirs[k] / "best.pt")["model"])
        test, val = evaluate(m, test_loader), evaluate(m, val_loader)
        res = {"method": f"dml-peer{k}", "model": peers[k], "seed": seed, "val_acc": val["acc"],
               "test_acc": test["acc"], "best_epoch": best_ep[k], "epochs_run": cfg.epochs,
               "train_time_s": t_train, "dataset": info.name,
               "images_per_s": len(splits.train) * cfg.epochs / t_train if t_train else float("nan")}
        (dirs[k] / "result.json").write_text(json.dumps(res, indent=2))
        results.append(res)
        log(f"DML peer {k} ({peers[k]}): test {res['test_acc']:.4f} (best epoch {best_ep[k]})")
    summary = {"paradigm": "dml", "peers": results, "history": history, "train_time_s": t_train}
    (out_dir / "dml.json").write_text(json.dumps(summary, indent=2))
    return summary
