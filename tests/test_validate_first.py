"""A bad input found while a study or an LM command checks its inputs (data present, corpus
readable, teacher there or trainable) is refused before anything is printed or written: exit 2,
one ``kdlab: error:`` line, no progress line on stdout, and no run folder left behind."""

from __future__ import annotations

import os

import pytest

CASES = {
    "ablate: CIFAR-10 data missing": (["ablate", "cifar10/full", "--data-dir", "{t}/nodata"], "CIFAR-10 not found"),
    "ablate: teacher missing, no recipe to train it":
        (["ablate", "digits/full", "--set", "teacher.recipe=null", "--set", "teacher.checkpoint={t}/x/best.pt"],
         "names no teacher.recipe"),
    "ablate: teacher recipe's data missing":
        (["ablate", "digits/full", "--set", "teacher.recipe=cifar10/teacher", "--set",
          "teacher.checkpoint={t}/tt/best.pt", "--data-dir", "{t}/nodata"], "CIFAR-10 not found"),
    "ablate: LM corpus folder missing": (["ablate", "lm/docs", "--set", "corpus.name={t}/nocorpus"], "nocorpus"),
    "ablate: LM teacher.checkpoint missing": (["ablate", "lm/docs", "--set", "teacher.checkpoint={t}/none.pt"],
                                              "none.pt"),
    "lm ablate: corpus folder missing": (["lm", "ablate", "lm/docs", "--set", "corpus.name={t}/nocorpus"], "nocorpus"),
    "lm train-teacher: corpus folder missing":
        (["lm", "train-teacher", "lm/docs", "--set", "corpus.name={t}/nocorpus"], "nocorpus"),
    "lm distill: corpus folder missing": (["lm", "distill", "lm/docs", "--set", "corpus.name={t}/nocorpus"],
                                          "nocorpus"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_refused_before_printing_or_writing(name, tmp_path, capsys, monkeypatch):
    from kdlab.cli.main import main

    argv, expect = CASES[name]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDLAB_DATA_DIR", str(tmp_path / "nodata"))
    argv = [a.format(t=tmp_path) for a in argv] + ["--out", str(tmp_path / "o"), "--quiet"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdlab: error:") and expect in lines[0], err
    assert out.strip() == "", f"printed before the refusal: {out!r}"
    assert sorted(os.listdir(tmp_path)) == [], f"left behind: {sorted(os.listdir(tmp_path))}"
