"""Deep Mutual Learning (Zhang et al., CVPR 2018): K peers trained together in one run.

The peers are the models of one :class:`kdlab.train.objective.PeerObjective` trained by the one
:class:`kdlab.train.trainer.Trainer` (resume, patience, checkpoints and metrics like every run):
``<out>/peers/best.pt`` is peer 0's, ``<out>/peers/peer<k>/best.pt`` the others'; each records its own model name and
keyword arguments, so every peer checkpoint loads with :func:`kdlab.models.adapters.load_model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from pydantic import Field

from kdlab.core.io import write_json
from kdlab.experiments.paradigms.base import ParadigmParams, register_paradigm
from kdlab.train.objective import mutual_loss  # noqa: F401  (the loss, documented there)
from kdlab.train.recipe import Recipe


class DmlParams(ParadigmParams):
    # peers: model names or {model, kwargs} sections; default n_peers copies of the recipe's student
    peers: Optional[list[Union[str, dict]]] = None
    n_peers: int = Field(2, ge=2)
    T: float = Field(1.0, gt=0)


def peer_sections(recipe: Recipe, params: DmlParams) -> list[dict]:
    """``{"model", "kwargs"}`` of every peer (a bare name that is the student's own model keeps the
    student's kwargs)."""
    student = {"model": recipe.student.model, "kwargs": dict(recipe.student.kwargs)}
    if not params.peers:
        return [dict(student) for _ in range(params.n_peers)]
    out = []
    for p in params.peers:
        if isinstance(p, str):
            out.append(dict(student) if p == student["model"] else {"model": p, "kwargs": {}})
        else:
            out.append({"model": p["model"], "kwargs": dict(p.get("kwargs") or {})})
    if len(out) < 2:
        raise ValueError("DML needs at least two peers (e.g. --set paradigm.peers=[cnn_tiny,cnn_tiny])")
    return out


def peer_objective(recipe: Recipe, peers: list[dict], params: DmlParams, info, runtime):
    """The :class:`kdlab.train.objective.PeerObjective` of ``peers`` (peer k initialised from
    ``derive_seed(seed, "init", "peer", k)``)."""
    from kdlab.core.seeding import derive_seed, seed_everything
    from kdlab.models import create_model
    from kdlab.train.objective import PeerObjective

    models, metas = {}, {}
    for k, sec in enumerate(peers):
        seed_everything(derive_seed(recipe.train.seed, "init", "peer", k))
        name = f"peer{k}"
        models[name] = create_model(sec["model"], num_classes=info.num_classes, in_channels=info.in_channels,
                                    **sec["kwargs"]).to(runtime.device)
        metas[name] = {"model_name": sec["model"], "model_kwargs": sec["kwargs"],
                       "num_classes": info.num_classes, "in_channels": info.in_channels, "dataset": info.name}
    return PeerObjective(models, metas, runtime=runtime, T=params.T)


@register_paradigm("dml", "Deep Mutual Learning: K peers trained jointly, each with CE + mean KL to the other peers",
                   "Zhang, Xiang, Hospedales & Lu, Deep Mutual Learning, CVPR 2018", params=DmlParams)
def run_dml(recipe: Recipe, params: DmlParams, out_dir, *, progress: bool = False, log=print) -> dict:
    """Train the peers jointly into ``out_dir`` (one run folder, built by
    :func:`kdlab.train.build.build_run` with the peers' objective)."""
    from kdlab.train.build import build_run, trainer_for

    out_dir = Path(out_dir)
    peers = peer_sections(recipe, params)
    run = build_run(recipe, make_objective=lambda r, info, runtime: peer_objective(r, peers, params, info, runtime))
    info = run.info
    ident = {"recipe": recipe.to_dict(), "paradigm": params.model_dump()}
    trainer = trainer_for(run, out_dir / "peers", progress=progress, method="dml", identity=ident,
                          info={"recipe": recipe.name, "model": peers[0]["model"], "dataset": info.name})
    res = trainer.fit()
    for k, name in enumerate(run.objective.models()):
        r = res.get("models", {}).get(name, res)
        log(f"DML peer {k} ({peers[k]['model']}): test {r['test_acc']:.4f} (best epoch {r['best_epoch']})")
    summary = {"paradigm": "dml", "peers": peers, "student": res, "train_time_s": res["train_time_s"]}
    write_json(out_dir / "dml.json", summary)
    return summary
