"""Files kdlab writes atomically get the mode open() gives a new file (0o666 less the umask),
not mkstemp's 0600: a report page or result.json is as readable as train.log."""

import os
import stat

import pytest
import torch

from kdlab.core.checkpoint import atomic_save
from kdlab.core.io import atomic_savefig, atomic_write_text, current_umask, write_csv, write_json


@pytest.fixture
def umask():
    old = os.umask(0o022)
    try:
        yield lambda m: os.umask(m)
    finally:
        os.umask(old)


def mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def writers(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    yield "json", write_json(tmp_path / "result.json", {"a": 1})
    yield "text", atomic_write_text(tmp_path / "index.html", "<p>x</p>\n")
    yield "csv", write_csv(tmp_path / "metrics.csv", [{"epoch": 0}])
    yield "checkpoint", atomic_save({"w": torch.zeros(2)}, tmp_path / "best.pt")
    yield "figure", atomic_savefig(fig, tmp_path / "fig.png")
    plt.close(fig)


@pytest.mark.parametrize("mask,want", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_get_the_mode_open_gives(tmp_path, umask, mask, want):
    umask(mask)
    with open(tmp_path / "train.log", "w"):
        pass
    assert mode(tmp_path / "train.log") == want  # what open() gives, the reference
    for what, p in writers(tmp_path):
        assert mode(p) == want, what
    assert not list(tmp_path.glob("*.tmp"))


def test_replacing_a_file_gives_the_new_file_mode(tmp_path, umask):
    p = tmp_path / "result.json"
    p.write_text("{}")
    os.chmod(p, 0o600)
    write_json(p, {"a": 2})
    assert mode(p) == 0o644


def test_current_umask_reads_without_changing(umask):
    umask(0o027)
    assert current_umask() == 0o027
    assert current_umask() == 0o027
