"""`kdlab distill` on a faces-folder recipe (a folder written here), its bad inputs, and the LFW
subset smoke test."""

from pathlib import Path

import numpy as np
import pytest
import torch

from kdlab.cli.main import main

N_IDS, PER_ID, HW = 10, 3, 16


def write_faces(root: Path, per_id=PER_ID, pairs: str | None = None) -> Path:
    """``N_IDS`` identities: each a random 16x16 grey pattern, its images that pattern plus noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(N_IDS):
        base = rng.uniform(0, 255, (HW, HW))
        d = root / f"id{k}"
        d.mkdir(parents=True)
        for j in range(per_id):
            img = np.clip(base + rng.normal(0, 20, (HW, HW)), 0, 255).astype(np.uint8)
            Image.fromarray(img, mode="L").save(d / f"id{k}_{j + 1:04d}.png")
    if pairs is not None:
        (root / "pairs.txt").write_text(pairs)
    return root


# LFW format: "<folds> <n>", then per fold n matched lines and n mismatched lines
PAIRS = "2\t2\nid0\t1\t2\nid1\t1\t3\nid0\t1\tid1\t2\nid2\t3\tid3\t1\nid2\t1\t2\nid3\t2\t3\nid2\t2\tid0\t3\nid3\t3\tid1\t1\n"


def recipe(tmp: Path, root: Path, extra: str = "") -> Path:
    text = f"""name: faces-folder-test
task: faces
data: {{name: faces-folder, root: "{root}", image_size: [{HW}, {HW}], val_fraction: 0.3}}
student: {{model: mobilefacenet_small, kwargs: {{width: 0.25, embedding_size: 16}}}}
train: {{epochs: 2, batch_size: 8, eval_batch_size: 64, lr: 0.05, patience: null, device: cpu}}
loss:
  - {{term: arcface, s: 16.0, m: 0.2}}
{extra}"""
    p = tmp / "recipe.yaml"
    p.write_text(text)
    return p


def test_distill_faces_folder_reports_verification(tmp_path, capsys):
    root = write_faces(tmp_path / "faces", pairs=PAIRS)
    out = tmp_path / "run"
    assert main(["distill", str(recipe(tmp_path, root)), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "task faces" in printed and '"val_acc"' in printed and '"test_acc"' in printed
    import json

    res = json.loads((out / "result.json").read_text())
    assert 0.0 <= res["test_acc"] <= 1.0 and 0.0 <= res["test_eer"] <= 1.0 and res["n_test"] == 8
    scores = json.loads((out / "test_scores.json").read_text())
    # the pairs file's protocol: 2 folds of 2 genuine + 2 impostor pairs, in file order
    assert scores["same"] == [1, 1, 0, 0] * 2 and scores["fold"] == [0] * 4 + [1] * 4


def test_faces_folder_splits_and_pairs(tmp_path):
    from kdlab.data import load_dataset

    root = write_faces(tmp_path / "faces", pairs=PAIRS)
    s = load_dataset("faces-folder", root=str(root), image_size=[HW, HW], val_fraction=0.3)
    # the pairs name id0..id3: those are the test identities; 6 left: 2 validation, 4 training
    assert len(s.test) == 4 * PER_ID and s.info.num_classes == 4 and len(s.val) == 2 * PER_ID
    p = s.test.pairs
    assert p[:, 2].tolist() == [1, 1, 0, 0] * 2
    assert bool((s.test.y[p[:, 0]] == s.test.y[p[:, 1]]).eq(p[:, 2].bool()).all())
    # "id1 1 3": images 1 and 3 of id1 are different files of one identity
    assert not torch.equal(s.test.x[p[1, 0]], s.test.x[p[1, 1]])


def test_pairs_file_naming_a_missing_image_is_one_line(tmp_path, capsys):
    root = write_faces(tmp_path / "faces", pairs=PAIRS.replace("id1\t1\t3", "id1\t1\t5"))
    out = tmp_path / "run"
    assert main(["distill", str(recipe(tmp_path, root)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("kdlab: error: ") and "pairs.txt line 3 names image 5 of 'id1', which has 3 images" in err
    assert not out.exists()


def test_identity_with_one_image_is_one_line(tmp_path, capsys):
    root = write_faces(tmp_path / "faces")
    for f in sorted((root / "id5").iterdir())[1:]:
        f.unlink()
    out = tmp_path / "run"
    assert main(["distill", str(recipe(tmp_path, root)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "identity id5 has one image" in err and "add images or remove" in err
    assert not out.exists()


def test_mismatched_embedding_sizes_is_one_line(tmp_path, capsys):
    from kdlab.core.checkpoint import atomic_save, model_checkpoint
    from kdlab.models import create_model

    root = write_faces(tmp_path / "faces", pairs=PAIRS)
    teacher = create_model("mobilefacenet_small", 4, 1, width=0.25, embedding_size=32)
    atomic_save(model_checkpoint(teacher, model_name="mobilefacenet_small",
                                 model_kwargs={"width": 0.25, "embedding_size": 32}, num_classes=4,
                                 in_channels=1, dataset="faces-folder"), tmp_path / "teacher.pt")
    extra = (f"  - {{term: embed_kd, weight: 1.0}}\nteacher: {{model: mobilefacenet_small, "
             f"checkpoint: \"{tmp_path / 'teacher.pt'}\"}}\n")
    out = tmp_path / "run"
    assert main(["distill", str(recipe(tmp_path, root, extra)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert ("student's embeddings have 16 dimensions and the teacher's 32; set student.kwargs.embedding_size: 32 "
            "or give the term proj: true") in err
    assert not out.exists()


def test_lfw_subset_transfer_set():
    pytest.importorskip("skimage")
    from kdlab.data.identities import lfw_faces_28, lfw_subset_images

    x = lfw_subset_images()
    assert x.shape == (100, 1, 25, 25) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert lfw_faces_28().shape == (100, 1, 28, 28)
    # a QUD step on the real faces (teacher and student untrained embedding nets): finite loss
    from kdlab.distill.losses import LOSSES, BatchRecord
    from kdlab.models import create_model

    torch.manual_seed(0)
    s, t = create_model("mobilefacenet_small", 2, 1, width=0.25), create_model("iresnet_small", 2, 1, width=0.25)
    xb = lfw_faces_28()[:16]
    with torch.no_grad():
        rec = BatchRecord(x=xb, y=torch.full((16,), -1), s_logits=s(xb), t_logits=t(xb))
    term = LOSSES.get("qud")(queue_size=32, tau=0.1)
    term.setup(rec)
    assert torch.isfinite(term(rec))


def test_train_teacher_then_distill_embed_kd(tmp_path, capsys):
    import json

    root = write_faces(tmp_path / "faces", pairs=PAIRS)
    teacher = tmp_path / "teacher"
    assert main(["train-teacher", str(recipe(tmp_path, root)), "--out", str(teacher), "--quiet"]) == 0
    assert json.loads((teacher / "result.json").read_text())["method"] == "teacher"
    extra = (f"  - {{term: embed_kd, weight: 5.0}}\nteacher: {{model: mobilefacenet_small, "
             f"checkpoint: \"{teacher / 'best.pt'}\"}}\n")
    out = tmp_path / "student"
    assert main(["distill", str(recipe(tmp_path, root, extra)), "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "result.json").read_text())
    logged = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "embed_kd" in logged and "arcface" in logged and 0.0 <= res["test_acc"] <= 1.0
