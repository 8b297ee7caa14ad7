"""Paradigms (DML, Born-Again, Teacher Assistant, self-distillation, DeepInversion), the shipped
method recipes and the `kdlab methods` / `kdlab compare` commands, on tiny digits runs."""

import json
import math

import pytest
import torch
from torch import nn

from kdlab.cli.main import main
from kdlab.core.config import list_recipes, load_recipe, recipe_from_dict
from kdlab.experiments.paradigms import PARADIGMS, chains, deepinv, dml

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
    from kdlab.train.trainer import train

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
    assert dml.dml_peer_loss([z0, z1], y, 0).item() == pytest.approx(expected, rel=1e-5)
    # peer 1: CE = −ln(3/4); KL(uniform ‖ p_1) = ½ ln(0.5/0.75) + ½ ln(0.5/0.25)
    expected1 = -math.log(0.75) + 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2.0)
    assert dml.dml_peer_loss([z0, z1], y, 1).item() == pytest.approx(expected1, rel=1e-5)


def test_dml_runs_peers(tmp_path):
    res = dml.run_dml(_recipe(), tmp_path, n_peers=2, log=lambda *a: None)
    assert len(res["peers"]) == 2
    for k in range(2):
        r = json.loads((tmp_path / f"peer{k}_cnn_tiny" / "result.json").read_text())
        assert 0.0 <= r["test_acc"] <= 1.0 and (tmp_path / f"peer{k}_cnn_tiny" / "best.pt").exists()
    with pytest.raises(ValueError, match="two peers"):
        dml.run_dml(_recipe(), tmp_path / "x", peers=["cnn_tiny"])


def test_born_again_generations_and_ensemble(tmp_path):
    res = chains.run_ban(_recipe(), tmp_path, generations=2, log=lambda *a: None)
    assert [g["generation"] for g in res["generations"]] == [0, 1, 2]
    gen2 = json.loads((tmp_path / "gen2" / "run.json").read_text())
    assert gen2["recipe"]["teacher"]["checkpoint"] == str(tmp_path / "gen1" / "best.pt")
    assert gen2["recipe"]["teacher"]["model"] == "cnn_tiny"  # the same architecture
    assert 0.0 <= res["ensemble_test_acc"] <= 1.0
    with pytest.raises(ValueError):
        chains.run_ban(_recipe(), tmp_path / "y", generations=0)


def test_teacher_assistant_chain(tmp_path, teacher_ckpt):
    r = _recipe(teacher_ckpt, loss=[{"term": "ce", "weight": 0.1}, {"term": "kd", "weight": 0.9}])
    big = _recipe(teacher={"model": "resnet18"})
    # sized strictly between cnn_tiny (6k params) and resnet18 (11M): one of the middle models
    assert chains.choose_assistant(big, ["cnn_tiny", "cnn_small", "cnn_medium", "resnet18"]) in ("cnn_small", "cnn_medium")
    with pytest.raises(ValueError, match="--assistant"):
        chains.choose_assistant(r, ["cnn_tiny", "resnet18"])
    res = chains.run_ta(r, tmp_path, assistant="cnn_tiny", log=lambda *a: None)
    st = json.loads((tmp_path / "student" / "run.json").read_text())
    assert st["recipe"]["teacher"]["checkpoint"] == str(tmp_path / "assistant" / "best.pt")
    assert res["assistant"] == "cnn_tiny"


def test_self_distillation(tmp_path, teacher_ckpt):
    res = chains.run_self(_recipe(), tmp_path, log=lambda *a: None)
    st = json.loads((tmp_path / "student" / "run.json").read_text())
    assert st["recipe"]["teacher"]["model"] == "cnn_tiny"
    assert st["recipe"]["loss"][1]["term"] == "kd"
    with pytest.raises(ValueError, match="own architecture"):
        chains.run_self(_recipe(), tmp_path / "z", checkpoint=str(teacher_ckpt))


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
    res = deepinv.run_deepinv(r, tmp_path, n_images=32, iters=20, log=lambda *a: None)
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
    for name in ["kd", "dkd", "ls", "mtkd", "fitnets", "at", "nst", "fsp", "rkd", "crd"] + [p[0] for p in PARADIGMS]:
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
            {p[0] for p in PARADIGMS}
    for n in shipped:
        spec = load_paradigm(n)
        assert spec.name == n.split("/")[-1] and spec.recipe.mask is None
    base = {"paradigm": {"name": "ban", "generations": 1}, "recipe": _recipe().to_dict()}
    ok = tmp_path / "ok.yaml"
    ok.write_text(json.dumps(base))
    spec = load_paradigm(ok, ["train.epochs=3", "paradigm.generations=3"])
    assert spec.recipe.train.epochs == 3 and spec.params["generations"] == 3
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
