"""Paradigms (DML, Born-Again, Teacher Assistant, self-distillation, DeepInversion), the shipped
method recipes and the `kdlab methods` / `kdlab compare` commands, on tiny digits runs."""

import json
import math

import pytest
import torch
from torch import nn

from kdlab.cli.main import main
from kdlab.core.config import list_recipes
from kdlab.experiments.paradigms import PARADIGMS, ban, deepinv, dml, selfdistill, ta
from kdlab.train.objective import mutual_loss
from kdlab.train.recipe import load_recipe, recipe_from_dict

TINY_TRAIN = {"epochs": 1, "batch_size": 64, "lr": 0.05, "patience": None, "seed": 0, "device": "cpu"}


def _recipe(teacher_ckpt=None, loss=None, **over):
    d = {"name": "tiny", "data": {"name": "digits", "label_fraction": 0.2},
         "student": {"model": "cnn_tiny"}, "train": dict(TINY_TRAIN),
         "loss": loss or [{"term": "ce"}]}
    if teacher_ckpt:
        d["teacher"] = {"model": "cnn_small", "checkpoint": str(teacher_ckpt)}
    d.update(over)
    return recipe_from_dict(d)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    from kdlab.train.build import train

    out = tmp_path_factory.mktemp("teacher")
    r = recipe_from_dict({"name": "t", "data": {"name": "digits"}, "student": {"model": "cnn_small"},
                          "train": dict(TINY_TRAIN, epochs=2), "loss": [{"term": "ce"}]})
    train(r, out, progress=False)
    return out / "best.pt"


def test_dml_peer_loss_by_hand():
    # two peers, T = 1: z_0 = [0, 0] (uniform), z_1 = [ln 3, 0] -> p_1 = [3/4, 1/4]; y = 0
    # peer 0: CE = ln 2; KL(p_1 ‖ p_0) = 3/4 ln(3/2) + 1/4 ln(1/2)
    z0, z1 = torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]])
    y = torch.tensor([0])
    expected = math.log(2) + 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert mutual_loss([z0, z1], y, 0).item() == pytest.approx(expected, rel=1e-5)
    # peer 1: CE = −ln(3/4); KL(uniform ‖ p_1) = ½ ln(0.5/0.75) + ½ ln(0.5/0.25)
    expected1 = -math.log(0.75) + 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2.0)
    assert mutual_loss([z0, z1], y, 1).item() == pytest.approx(expected1, rel=1e-5)


def test_dml_runs_peers_through_the_trainer(tmp_path):
    from kdlab.models.adapters import load_model

    res = dml.run_dml(_recipe(), dml.DmlParams(n_peers=2), tmp_path, log=lambda *a: None)
    assert [p["model"] for p in res["peers"]] == ["cnn_tiny", "cnn_tiny"]
    run = tmp_path / "peers"
    r = json.loads((run / "result.json").read_text())  # the Trainer's result: both peers evaluated
    assert set(r["models"]) == {"peer0", "peer1"} and 0.0 <= r["models"]["peer1"]["test_acc"] <= 1.0
    assert (run / "metrics.csv").read_text().splitlines()[0].count("peer1_val_acc") == 1
    for ck in (run / "best.pt", run / "peer1" / "best.pt"):
        load_model(ck)
    with pytest.raises(ValueError, match="two peers"):
        dml.run_dml(_recipe(), dml.DmlParams(peers=["cnn_tiny"]), tmp_path / "x")


def test_dml_width_peer_checkpoints_load(tmp_path):
    # a resnet18 width 0.25 peer: its checkpoint records the kwargs, so it rebuilds and loads
    from kdlab.models.adapters import load_model
    from kdlab.experiments.paradigms.spec import check_params

    r = _recipe(student={"model": "resnet18", "kwargs": {"width": 0.25}})
    params = check_params("dml", {"peers": ["resnet18", "cnn_tiny"]})
    dml.run_dml(r, params, tmp_path, log=lambda *a: None)
    model, ck = load_model(tmp_path / "peers" / "best.pt")
    assert ck["model_name"] == "resnet18" and ck["model_kwargs"] == {"width": 0.25}
    assert load_model(tmp_path / "peers" / "peer1" / "best.pt")[1]["model_name"] == "cnn_tiny"


def test_dml_resumes_and_stops_early(tmp_path):
    from kdlab.train.build import load_splits, make_loaders  # noqa: F401  (same loaders as run_dml)

    r = _recipe(train=dict(TINY_TRAIN, epochs=3))
    p = dml.DmlParams(n_peers=2)
    dml.run_dml(r, p, tmp_path / "a", log=lambda *a: None)
    full = torch.load(tmp_path / "a" / "peers" / "last.pt", weights_only=False)["models"]
    # interrupted after epoch 1, then resumed: the same weights as the uninterrupted run
    from kdlab.experiments.paradigms import dml as dml_mod
    from kdlab.train import trainer as trainer_mod

    real_fit = trainer_mod.Trainer.fit
    trainer_mod.Trainer.fit = lambda self, **kw: real_fit(self, stop_after=1)
    try:
        dml_mod.run_dml(r, p, tmp_path / "b", log=lambda *a: None)
    except KeyError:  # the interrupted fit returns no test results
        pass
    finally:
        trainer_mod.Trainer.fit = real_fit
    assert not (tmp_path / "b" / "peers" / "result.json").exists()
    dml.run_dml(r, p, tmp_path / "b", log=lambda *a: None)
    resumed = torch.load(tmp_path / "b" / "peers" / "last.pt", weights_only=False)["models"]
    for name in full:
        assert all(torch.equal(full[name][k], resumed[name][k]) for k in full[name])


def test_born_again_generations_and_ensemble(tmp_path):
    res = ban.run_ban(_recipe(), ban.BanParams(generations=2), tmp_path, log=lambda *a: None)
    assert [g["generation"] for g in res["generations"]] == [0, 1, 2]
    gen2 = json.loads((tmp_path / "gen2" / "run.json").read_text())
    assert gen2["recipe"]["teacher"]["checkpoint"] == str(tmp_path / "gen1" / "best.pt")
    assert gen2["recipe"]["teacher"]["model"] == "cnn_tiny"  # the same architecture
    assert 0.0 <= res["ensemble_test_acc"] <= 1.0
    with pytest.raises(ValueError):
        ban.BanParams(generations=0)


def test_teacher_assistant_chain(tmp_path, teacher_ckpt):
    r = _recipe(teacher_ckpt, loss=[{"term": "ce", "weight": 0.1}, {"term": "kd", "weight": 0.9}])
    big = _recipe(teacher={"model": "resnet18"})
    # sized strictly between cnn_tiny (6k params) and resnet18 (11M): one of the middle models
    assert ta.choose_assistant(big, ["cnn_tiny", "cnn_small", "cnn_medium", "resnet18"]) in ("cnn_small", "cnn_medium")
    with pytest.raises(ValueError, match="paradigm.assistant"):
        ta.choose_assistant(r, ["cnn_tiny", "resnet18"])
    res = ta.run_ta(r, ta.TaParams(assistant="cnn_tiny"), tmp_path, log=lambda *a: None)
    st = json.loads((tmp_path / "student" / "run.json").read_text())
    assert st["recipe"]["teacher"]["checkpoint"] == str(tmp_path / "assistant" / "best.pt")
    assert res["assistant"] == "cnn_tiny"


def test_self_distillation(tmp_path, teacher_ckpt):
    selfdistill.run_self(_recipe(), selfdistill.SelfParams(), tmp_path, log=lambda *a: None)
    st = json.loads((tmp_path / "student" / "run.json").read_text())
    assert st["recipe"]["teacher"]["model"] == "cnn_tiny"
    assert st["recipe"]["loss"][1]["term"] == "kd"
    with pytest.raises(ValueError, match="own architecture"):
        selfdistill.run_self(_recipe(), selfdistill.SelfParams(checkpoint=str(teacher_ckpt)), tmp_path / "z")


def test_adding_a_paradigm_is_one_file_and_one_recipe(tmp_path):
    # a toy paradigm registered here (what one new file does), run from a paradigm recipe
    from pydantic import Field

    from kdlab.experiments.paradigms import ParadigmParams, register_paradigm
    from kdlab.experiments.paradigms.runs import run_paradigm_seeds
    from kdlab.experiments.paradigms.spec import load_paradigm
    from kdlab.train.build import train

    class TwiceParams(ParadigmParams):
        rounds: int = Field(2, ge=1)

    @register_paradigm("toy-twice", "train the student `rounds` times, keep the last", params=TwiceParams)
    def run_twice(recipe, params, out_dir, *, progress=False, log=print):
        res = [train(recipe, out_dir / f"round{i}", progress=progress) for i in range(params.rounds)]
        return {"student": res[-1], "train_time_s": sum(r["train_time_s"] for r in res)}

    try:
        f = tmp_path / "toy.yaml"
        f.write_text(json.dumps({"paradigm": {"name": "toy-twice", "rounds": 1}, "recipe": _recipe().to_dict()}))
        spec = load_paradigm(f, ["paradigm.rounds=3"])
        assert spec.params.rounds == 3
        rows = run_paradigm_seeds(spec, "toy", tmp_path / "out", seeds=[0], log=lambda *a: None)
        assert rows[0]["method"] == "toy" and (tmp_path / "out" / "toy" / "seed0" / "round2" / "best.pt").exists()
        assert rows[0]["test_acc"] == json.loads((tmp_path / "out" / "toy" / "seed0" / "round2" / "result.json").read_text())["test_acc"]
    finally:
        from kdlab.experiments.paradigms import PARADIGMS
        PARADIGMS.unregister("toy-twice")


def test_deepinversion_priors_and_run(tmp_path, teacher_ckpt):
    # TV prior by hand: x = [[0, 1], [1, 1]]: vertical |1−0|,|1−1| -> mean .5; horizontal |1−0|,|1−1| -> .5
    x = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])
    assert deepinv.tv_prior(x).item() == pytest.approx(1.0)
    # BN hook: a BN whose running stats are (0, 1) sees a batch with mean 2 and variance 0 -> 2 + 1
    bn = nn.Sequential(nn.BatchNorm2d(1)).eval()
    hook = deepinv.BNStatHook(bn)
    bn(torch.full((2, 1, 2, 2), 2.0))
    assert hook.pop().item() == pytest.approx(3.0)
    hook.close()
    with pytest.raises(ValueError, match="BatchNorm"):
        deepinv.BNStatHook(nn.Linear(2, 2))
    r = _recipe(teacher_ckpt)
    res = deepinv.run_deepinv(r, deepinv.DeepInvParams(n_images=32, iters=20), tmp_path, log=lambda *a: None)
    xs, ys = torch.load(tmp_path / "synthetic.pt")
    assert xs.shape == (32, 1, 8, 8) and ys.shape == (32,)
    assert res["teacher_agreement"] > 0.5  # the synthetic inputs are classified as their targets


def test_method_recipes_load_and_cover_every_method():
    names = [n for n in list_recipes() if n.startswith("methods/")]
    for ds in ("digits", "cifar10"):
        have = {n.split("/")[-1] for n in names if n.startswith(f"methods/{ds}/")}
        assert {"kd", "dkd", "ls", "mtkd", "fitnets", "at", "nst", "fsp", "rkd", "crd"} <= have
    for n in names:
        r = load_recipe(n)
        assert r.mask is None or n.startswith("methods/teachers")


def test_methods_lists_every_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ["kd", "dkd", "ls", "mtkd", "fitnets", "at", "nst", "fsp", "rkd", "crd"] + PARADIGMS.names():
        assert f"  {name} " in out


def test_compare_two_methods_one_seed(tmp_path, teacher_ckpt, capsys):
    for m, loss in (("kd", [{"term": "ce", "weight": 0.1}, {"term": "kd", "weight": 0.9}]),
                    ("dkd", [{"term": "ce"}, {"term": "dkd"}])):
        r = _recipe(teacher_ckpt, loss=loss, name=m)
        (tmp_path / f"{m}.yaml").write_text(json.dumps(r.to_dict()))
    rc = main(["compare", str(tmp_path / "kd.yaml"), str(tmp_path / "dkd.yaml"), "--seeds", "0",
               "--out", str(tmp_path / "cmp"), "--quiet", "--no-profile"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Δ vs kd" in out and "train wall time" in out
    table = (tmp_path / "cmp" / "report" / "comparison.md").read_text()
    assert "| dkd" in table and "| kd" in table
    assert main(["compare", str(tmp_path / "dkd.yaml"), "--seeds", "0", "--out", str(tmp_path / "c2"),
                 "--quiet"]) == 2  # the baseline kd is missing


def test_paradigm_recipe_loader_validates(tmp_path):
    from kdlab.core.config import RecipeError
    from kdlab.experiments.paradigms.spec import list_paradigm_recipes, load_paradigm

    shipped = list_paradigm_recipes()
    for ds in ("digits", "cifar10"):
        assert {n.split("/")[-1] for n in shipped if n.startswith(f"paradigms/{ds}/")} == \
            set(PARADIGMS.names())
    for n in shipped:
        spec = load_paradigm(n)
        assert spec.name == n.split("/")[-1] and spec.recipe.mask is None
    base = {"paradigm": {"name": "ban", "generations": 1}, "recipe": _recipe().to_dict()}
    ok = tmp_path / "ok.yaml"
    ok.write_text(json.dumps(base))
    spec = load_paradigm(ok, ["train.epochs=3", "paradigm.generations=3"])
    assert spec.recipe.train.epochs == 3 and spec.params.generations == 3
    with pytest.raises(RecipeError, match=r"paradigm\.generatons"):
        load_paradigm(ok, ["paradigm.generatons=3"])
    for bad, where in ((dict(base, paradigm={"name": "ban", "generatons": 2}), "paradigm.generatons"),
                       (dict(base, extra=1), "extra: unknown key"),
                       (dict(base, paradigm={"name": "ban", "generations": "two"}), "paradigm.generations"),
                       (dict(base, paradigm={"name": "nope"}), "paradigm.name"),
                       (dict(base, recipe=dict(base["recipe"], trian={})), "recipe: trian")):
        p = tmp_path / "bad.yaml"
        p.write_text(json.dumps(bad))
        with pytest.raises(RecipeError, match=where.replace(".", r"\.")):
            load_paradigm(p)


def test_compare_includes_a_paradigm(tmp_path, teacher_ckpt, capsys):
    kd = _recipe(teacher_ckpt, loss=[{"term": "ce", "weight": 0.1}, {"term": "kd", "weight": 0.9}], name="kd")
    (tmp_path / "kd.yaml").write_text(json.dumps(kd.to_dict()))
    (tmp_path / "ban.yaml").write_text(json.dumps(
        {"paradigm": {"name": "ban", "generations": 1}, "recipe": _recipe(name="ban").to_dict()}))
    args = ["compare", str(tmp_path / "kd.yaml"), str(tmp_path / "ban.yaml"), "--seeds", "0",
            "--out", str(tmp_path / "cmp"), "--quiet", "--no-profile"]
    assert main(args) == 0
    table = (tmp_path / "cmp" / "report" / "comparison.md").read_text()
    for m in ("| kd ", "| ban ", "| ban-ensemble "):
        assert m in table
    res = json.loads((tmp_path / "cmp" / "ban" / "seed0" / "result.json").read_text())
    assert res["method"] == "ban" and res["model"] == "cnn_tiny" and res["generations"] == 1
    stats = {r["method"]: r for r in json.loads((tmp_path / "cmp" / "report" / "table.json").read_text())["methods"]}
    assert math.isfinite(stats["ban"]["diff_vs_kd"]) or stats["ban"]["n_paired"] == 1
    capsys.readouterr()
    assert main(args) == 0  # every run is skipped the second time
    assert "done earlier" in capsys.readouterr().out
