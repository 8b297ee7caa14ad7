"""Data-parallel training: 2 processes on gloo (CPU) against 1 process on the same data."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from kdlab.train import runtime as kd_dist
from kdlab.train.recipe import recipe_from_dict

RECIPE = {
    "name": "ddp-test",
    "data": {"name": "digits", "label_fraction": 1.0},
    "student": {"model": "cnn_tiny"},
    "train": {"epochs": 6, "batch_size": 32, "lr": 0.05, "device": "cpu", "patience": None, "seed": 0},
    "loss": [{"term": "ce"}],
}


NO_BN = {**RECIPE, "train": {**RECIPE["train"], "epochs": 2}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from kdlab.train.build import make_trainer as Trainer

    res = {}
    # 1) gradient all-reduce: uneven shards (5 and 3 samples) give the full batch's gradient
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    kd_dist.init()
    kd_dist.broadcast_modules(lin)
    part = slice(0, 5) if rank == 0 else slice(5, 8)
    nn.functional.cross_entropy(lin(x[part]), y[part]).backward()
    kd_dist.all_reduce_grads(lin, weight=y[part].numel())
    res["grad"] = lin.weight.grad.tolist()
    # 2) a whole run through the Trainer, which joins the group from the environment
    tr = Trainer(recipe_from_dict(RECIPE), os.path.join(out, "run"), progress=False)
    res["dist"] = list(tr.runtime.dist)
    res["batch"] = [tr.train_loader.batch_size, tr.train_loader.global_batch_size]
    r = tr.fit(resume=False)
    res.update(val_acc=r["val_acc"], test_acc=r["test_acc"], history=tr.state.history)
    # 3) without BatchNorm (the one thing that sees only the local batch) the 2-process run
    #    follows the 1-process trajectory up to float summation order
    nn.BatchNorm2d = lambda c: nn.Identity()  # noqa: E731 (this worker process only)
    tr = Trainer(recipe_from_dict(NO_BN), os.path.join(out, "nobn"), progress=False)
    tr.fit(resume=False)
    res["nobn_history"] = tr.state.history
    res["nobn_fc"] = tr.objective.student.fc.weight.tolist()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    kd_dist.cleanup()


def test_not_distributed_without_torchrun_env(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert kd_dist.from_env() is None
    assert kd_dist.rank() == 0 and kd_dist.world_size() == 1 and kd_dist.is_main()
    lin = nn.Linear(2, 2)
    lin(torch.ones(1, 2)).sum().backward()
    g = lin.weight.grad.clone()
    kd_dist.all_reduce_grads(lin, weight=3)  # no process group: unchanged
    assert torch.equal(lin.weight.grad, g)


def test_two_gloo_processes_match_one(tmp_path):
    out = str(tmp_path)
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())

    # the all-reduced gradient is the one-process gradient of the mean loss over all 8 samples
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    nn.functional.cross_entropy(lin(x), y).backward()
    for r in (r0, r1):
        assert torch.allclose(torch.tensor(r["grad"]), lin.weight.grad, atol=1e-6)

    assert r0["dist"] == [0, 2] and r1["dist"] == [1, 2]
    assert r0["batch"] == [16, 32]  # the same total batch as one process
    # ranks agree on everything (metrics reduced, BN statistics averaged, one best.pt)
    assert r0["val_acc"] == r1["val_acc"] and r0["test_acc"] == r1["test_acc"]
    for a, b in zip(r0["history"], r1["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["val_acc"] == b["val_acc"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "best.pt", "last.pt", "metrics.csv", "result.json", "run.json", "train.log"]

    from kdlab.train.build import make_trainer as Trainer

    with pytest.MonkeyPatch.context() as mpatch:
        mpatch.setattr(nn, "BatchNorm2d", lambda c: nn.Identity())
        tr = Trainer(recipe_from_dict(NO_BN), tmp_path / "nobn1", progress=False)
        tr.fit(resume=False)
    for a, b in zip(tr.state.history, r0["nobn_history"]):
        print("no BN: 1 process", a["loss"], a["val_acc"], "2 processes", b["loss"], b["val_acc"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["train_acc"] == pytest.approx(b["train_acc"], abs=2 / 1213)
    assert torch.allclose(tr.objective.student.fc.weight, torch.tensor(r0["nobn_fc"]), atol=1e-4)

    # one process, same recipe and data: the same accuracy within noise (BatchNorm sees 16 vs 32
    # samples per batch, so trajectories differ slightly)
    from kdlab.train.build import train

    one = train(recipe_from_dict(RECIPE), tmp_path / "one", progress=False, resume=False)
    print("1 process", one["test_acc"], one["val_acc"], "2 processes", r0["test_acc"], r0["val_acc"])
    assert one["test_acc"] > 0.9 and r0["test_acc"] > 0.9
    assert abs(one["test_acc"] - r0["test_acc"]) <= 0.03
    assert abs(one["val_acc"] - r0["val_acc"]) <= 0.04
