"""`kdlab bench --study detection/fgd_ld` at a tiny size: the teacher is trained first (not timed, with
--teacher-set), the study runs, and the printed breakdown adds up to the wall time and ends with
`study/students: <ratio>`."""

from __future__ import annotations

import json
import re

import pytest
import torch

from kdlab.cli.main import main

torch.set_num_threads(1)


def test_detection_study_bench_line_and_parts_add_up(tmp_path, capsys):
    out = tmp_path / "bench"
    tiny = ["data.kwargs.scenes=[16,8,8]", "train.epochs=1"]
    rc = main(["bench", "--study", "detection/fgd_ld", "--out", str(out), "--seeds", "0",
               *sum((["--set", s] for s in tiny + [f"teacher.checkpoint={out / 'teacher' / 'best.pt'}"]), []),
               *sum((["--teacher-set", s] for s in tiny + ["student.weights=null", "student.kwargs.width=4",
                                                            "student.kwargs.fpn_channels=8"]), [])])
    assert rc == 0
    text = capsys.readouterr().out
    assert "training teacher gfl_det" in text and "(not timed)" in text
    last = text.strip().splitlines()[-1]
    m = re.fullmatch(r"study/students: (\d+\.\d\d)", last)
    assert m, last
    block = json.loads((out / "bench-study.json").read_text())["studies"][0]
    t = block["total"]
    # the student seconds are the runs' own student_time_s, summed here from their result files
    runs = [json.loads(p.read_text()) for p in sorted((out / "study").glob("*/seed0/result.json"))]
    assert len(runs) == 5 and block["task"] == "detection" and block["metric"] == "map"
    assert t["student_s"] == pytest.approx(sum(r["student_time_s"] for r in runs))
    assert t["eval_s"] == pytest.approx(sum(r.get("eval_time_s", 0.0) for r in runs))
    assert t["teacher_forward_s"] == pytest.approx(sum(r.get("teacher_time_s", 0.0) - r.get("mask_time_s", 0.0)
                                                       + r.get("setup_teacher_time_s", 0.0)
                                                       - r.get("setup_mask_time_s", 0.0) for r in runs))
    assert t["other_s"] >= 0
    parts_s = ("student_s", "teacher_forward_s", "mask_s", "eval_s", "setup_s", "checkpoint_s", "report_s")
    assert sum(t[k] for k in parts_s) + t["other_s"] == pytest.approx(t["wall_s"])
    assert float(m.group(1)) == pytest.approx(t["wall_s"] / t["student_s"], abs=0.006)
    # the printed parts add up to the printed wall time (one decimal each)
    w = re.search(r"wall ([\d.]+) s = students ([\d.]+) \+ teacher forward ([\d.]+) \+ masks ([\d.]+) \+ "
                  r"students' evaluation ([\d.]+) \+ runs' set-up ([\d.]+) \+ checkpoints ([\d.]+) \+ "
                  r"report ([\d.]+) \+ other ([\d.]+)", text)
    assert w, text
    parts = [float(v) for v in w.groups()]
    assert sum(parts[1:]) == pytest.approx(parts[0], abs=0.5)
    assert {r["method"] for r in block["results"]} == {"baseline", "kd", "fgd", "ld", "fgd+ld"}
    assert all("test_map" in r for r in block["results"])
    # the teacher was trained with the --teacher-set values (not timed, outside the study folder)
    tres = json.loads((out / "teacher" / "result.json").read_text())
    assert tres["epochs_run"] == 1
