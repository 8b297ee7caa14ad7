"""build_run / ensure_teachers: the one place recipes become objects."""

import json

from kdlab.cli.main import main
from kdlab.train.recipe import recipe_from_dict

TINY = {"epochs": 1, "batch_size": 64, "lr": 0.05, "patience": None, "device": "cpu"}


def _teacher_yaml(path, name):
    path.write_text(json.dumps({"name": name, "data": {"name": "digits"}, "student": {"model": "cnn_tiny"},
                                "train": TINY, "loss": [{"term": "ce"}]}))
    return path


def test_distill_trains_mtkd_extra_teachers_first(tmp_path, capsys):
    ta = _teacher_yaml(tmp_path / "ta.yaml", "ta")
    tb = _teacher_yaml(tmp_path / "tb.yaml", "tb")
    rec = {"name": "m", "data": {"name": "digits", "label_fraction": 0.2}, "student": {"model": "cnn_tiny"},
           "teacher": {"model": "cnn_tiny", "checkpoint": str(tmp_path / "A" / "best.pt"), "recipe": str(ta)},
           "train": TINY,
           "loss": [{"term": "ce", "weight": 0.1},
                    {"term": "mtkd", "weight": 0.9, "checkpoints": [str(tmp_path / "B" / "best.pt")],
                     "recipes": [str(tb)]}]}
    (tmp_path / "m.yaml").write_text(json.dumps(rec))
    assert main(["distill", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    out = capsys.readouterr().out + capsys.readouterr().err
    for d in ("A", "B", "run"):
        assert (tmp_path / d / "result.json").is_file()
    r = json.loads((tmp_path / "run" / "result.json").read_text())
    assert r["epochs_run"] == 1


def test_baseline_recipe_trains_no_teacher(tmp_path):
    from kdlab.train.build import ensure_teachers

    r = recipe_from_dict({"name": "b", "data": {"name": "digits"}, "student": {"model": "cnn_tiny"},
                          "teacher": {"model": "cnn_tiny", "checkpoint": str(tmp_path / "T" / "best.pt"),
                                      "recipe": str(_teacher_yaml(tmp_path / "t.yaml", "t"))},
                          "train": TINY, "loss": [{"term": "ce"}]})
    logs = []
    assert ensure_teachers(r, log=logs.append) is None and not (tmp_path / "T").exists() and not logs


def test_unfinished_teacher_is_resumed_not_used(tmp_path):
    from kdlab.train.build import ensure_teachers, train

    t = _teacher_yaml(tmp_path / "t.yaml", "t")
    teacher = recipe_from_dict(json.loads(t.read_text())).derive(train={**TINY, "epochs": 2})
    t.write_text(json.dumps(teacher.to_dict()))
    assert train(teacher, tmp_path / "T", progress=False, stop_after=1) == {"interrupted": True, "epoch": 1}
    assert (tmp_path / "T" / "best.pt").is_file() and not (tmp_path / "T" / "result.json").exists()
    r = recipe_from_dict({"name": "s", "data": {"name": "digits"}, "student": {"model": "cnn_tiny"},
                          "teacher": {"model": "cnn_tiny", "checkpoint": str(tmp_path / "T" / "best.pt"),
                                      "recipe": str(t)},
                          "train": TINY, "loss": [{"term": "ce", "weight": 0.1}, {"term": "kd", "weight": 0.9}]})
    logs = []
    ensure_teachers(r, progress=False, log=logs.append)
    assert any("unfinished" in line for line in logs)
    assert json.loads((tmp_path / "T" / "result.json").read_text())["epochs_run"] == 2


def test_accumulation_windows_normalise_over_the_window():
    import kdlab.train.trainer as T
    from kdlab.train.objective import Objective

    class Obj(Objective):
        window_normalised = True

        def batch_weight(self, b):
            return b

    class PerBatch(Obj):
        window_normalised = False

    out = list(T.accumulation_windows(iter([2, 3, 4, 1, 6]), 2, Obj()))
    # windows (2, 3), (4, 1), (6): each batch carries its window's total
    assert out == [(0, 2, 5.0), (1, 3, 5.0), (2, 4, 5.0), (3, 1, 5.0), (4, 6, 6.0)]
    assert list(T.accumulation_windows(iter([2, 3]), 1, Obj())) == [(0, 2, None), (1, 3, None)]
    assert list(T.accumulation_windows(iter([2, 3]), 2, PerBatch())) == [(0, 2, None), (1, 3, None)]
