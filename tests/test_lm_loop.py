"""A tiny stand-in for the core Trainer, used by the LM tests only (the library has one loop:
kdlab.train.trainer.Trainer). It follows the Objective protocol and the Trainer's result keys."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from kdlab.core.checkpoint import atomic_save, model_checkpoint
from kdlab.train.objective import StepContext


def tiny_fit(objective, train, val, test, cfg, run_dir, *, method="", seed=0, accum=1, **_):
    """AdamW, constant lr, best epoch by ``objective.monitor`` on ``val``; writes best.pt."""
    run_dir = Path(run_dir)
    if (run_dir / "result.json").is_file():  # a finished run is reused, as the Trainer does
        return json.loads((run_dir / "result.json").read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(objective.parameters(), lr=cfg.lr, weight_decay=0.0)
    name, model = next(iter(objective.models().items()))
    key, mode = objective.monitor
    best, best_ep, best_state = None, -1, None
    t0 = time.time()
    for e in range(cfg.epochs):
        model.train()
        for s, b in enumerate(train.epoch(e)):
            loss, _ = objective.step(b, StepContext(epoch=e, step=s))
            opt.zero_grad()
            loss.backward()
            opt.step()
        v = objective.evaluate(name, val)[key]
        if best is None or (v < best if mode == "min" else v > best):
            best, best_ep = v, e
            best_state = {k: x.clone() for k, x in model.state_dict().items()}
    model.load_state_dict(best_state)
    atomic_save(model_checkpoint(model, **objective.checkpoint_meta(name)), run_dir / "best.pt")
    res = {"method": method, "seed": seed, "best_epoch": best_ep, "epochs_run": cfg.epochs,
           "train_time_s": time.time() - t0}
    res.update({f"val_{k}": v for k, v in objective.evaluate(name, val).items()})
    res.update({f"test_{k}": v for k, v in objective.evaluate(name, test).items()})
    (run_dir / "result.json").write_text(json.dumps(res))
    return res


def test_tiny_fit_trains_and_reuses_a_finished_run(tmp_path):
    from types import SimpleNamespace

    from kdlab.lm.corpora import EvalLoader, WindowLoader
    from kdlab.lm.models import GPT
    from kdlab.lm.objective import LMObjective

    torch.manual_seed(0)
    stream = torch.tensor([1, 2, 3, 4] * 100)  # a periodic text: next token is determined
    obj = LMObjective(GPT(6, d_model=16, n_layer=1, n_head=2, max_len=16), pad_id=5,
                      meta={"model_name": "lm:gpt", "model_kwargs": {"d_model": 16, "n_layer": 1, "n_head": 2, "max_len": 16}})
    ev = EvalLoader(stream, 8, 8, pad_id=5, max_tokens=64)
    before = obj.evaluate("student", ev)["bpb"]
    cfg = SimpleNamespace(lr=1e-2, epochs=3)
    res = tiny_fit(obj, WindowLoader(stream, 8, 8, 10, seed=0), ev, ev, cfg, tmp_path)
    assert res["test_bpb"] < before / 4  # learns the cycle
    assert tiny_fit(obj, None, None, None, cfg, tmp_path) == json.loads((tmp_path / "result.json").read_text())


def test_student_identity_ignores_the_study_list_but_not_the_method():
    """Adding a method to a study keeps the other methods' finished runs reusable; a different
    loss for the same method name is a different run."""
    from kdlab.lm.recipe import load_lm_recipe
    from kdlab.lm.study import student_identity

    r = load_lm_recipe("lm/docs")
    r2 = load_lm_recipe("lm/docs", ["study.methods.extra={loss: [{term: rkl}]}", "description=changed"])
    assert student_identity(r.method("fkl")) == student_identity(r2.method("fkl"))
    assert student_identity(r.method("fkl")) != student_identity(r.method("rkl"))
    assert student_identity(r.method("fkl"))["distill"]["loss"][1]["term"] == "fkl"
