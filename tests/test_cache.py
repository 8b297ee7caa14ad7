"""Teacher cache: exact reuse, keys that never serve stale entries, fp16 bound, regimes."""

import json

import pytest
import torch

from kdlab.distill.teachers import CachedTeacher, LiveTeacher, TeacherStore
from kdlab.data import load_dataset
from kdlab.train.build import make_trainer, train
from kdlab.models import create_model
from kdlab.train.recipe import recipe_from_dict

KD = [{"term": "ce", "weight": 0.1}, {"term": "kd", "weight": 0.9, "T": 4.0}]
MASKED = KD + [{"term": "attn", "weight": 10.0, "layers": [["stage2", "stage2"]]}]


def _recipe(loss, mode="cache-fp16", seed=0, epochs=2, mask_kind="binary"):
    masked = any(t["term"] == "attn" for t in loss)
    return recipe_from_dict({
        "name": "cache-test",
        "data": {"name": "digits", "label_fraction": 0.1, "augment": {"crop_pad": 1}},
        "student": {"model": "cnn_tiny"}, "teacher": {"model": "cnn_tiny"},
        "train": {"epochs": epochs, "batch_size": 32, "lr": 0.05, "device": "cpu",
                  "teacher_mode": mode, "seed": seed, "patience": None},
        "loss": loss,
        "mask": {"method": "ig", "steps": 2, "q": 0.5, "kind": mask_kind} if masked else None,
    })


@pytest.fixture(scope="module")
def splits():
    return load_dataset("digits", val_fraction=0.1, label_fraction=0.1, seed=0)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(123)
    return create_model("cnn_tiny", num_classes=10, in_channels=1).eval()


def _history(res_dir):
    rows = [l.split(",") for l in (res_dir / "metrics.csv").read_text().splitlines()]
    head = rows[0]
    keep = [i for i, k in enumerate(head) if k not in ("train_time_s", "images_per_s", "teacher_time_s")]
    return [[r[i] for i in keep] for r in rows]


def test_cached_study_runs_match_live_runs_exactly(tmp_path, splits, teacher):
    store = TeacherStore()
    # KD fills the logits; the masked method adds feature/mask entries and reuses the logits
    a1 = train(_recipe(KD), tmp_path / "c-kd", teacher=teacher, splits=splits, progress=False,
               teacher_cache=store)
    misses_after_kd = store.misses
    assert misses_after_kd == 2 * 4  # 2 epochs x ceil(~130 / 32) batches, each computed once
    a2 = train(_recipe(MASKED), tmp_path / "c-full", teacher=teacher, splits=splits, progress=False,
               teacher_cache=store)
    hits = store.hits
    a3 = train(_recipe(MASKED), tmp_path / "c-full2", teacher=teacher, splits=splits, progress=False,
               teacher_cache=store)
    assert store.hits - hits == 2 * 4 + 1  # every step (and the setup probe) served from the store
    assert store.misses == misses_after_kd + 2 * 4  # masked run computed only what was missing
    b1 = train(_recipe(KD), tmp_path / "l-kd", teacher=teacher, splits=splits, progress=False)
    b2 = train(_recipe(MASKED), tmp_path / "l-full", teacher=teacher, splits=splits, progress=False)
    for cached, live in ((a1, b1), (a2, b2), (a3, b2)):
        for k in ("val_acc", "test_acc", "test_loss", "best_epoch"):
            assert cached[k] == live[k]
    assert _history(tmp_path / "c-kd") == _history(tmp_path / "l-kd")
    assert _history(tmp_path / "c-full") == _history(tmp_path / "l-full")
    w_c = torch.load(tmp_path / "c-full" / "best.pt", weights_only=False)["model"]
    w_l = torch.load(tmp_path / "l-full" / "best.pt", weights_only=False)["model"]
    assert all(torch.equal(w_c[k], w_l[k]) for k in w_c)


def _trainer(tmp_path, name, loss, splits, teacher, store=None, mode="cache-fp16", seed=0, mask_kind="binary"):
    return make_trainer(_recipe(loss, mode, seed, mask_kind=mask_kind), tmp_path / name, teacher=teacher,
                        splits=splits, progress=False, store=store)


def test_cache_values_equal_rounded_live_and_bound_fp32(tmp_path, splits, teacher):
    store = TeacherStore()
    tr = _trainer(tmp_path, "a", MASKED, splits, teacher, store, mask_kind="soft")
    assert isinstance(tr.objective.teacher, CachedTeacher)
    batches = list(tr.train_loader.epoch(3))
    for s, (x, y, idx) in enumerate(batches):  # fill
        tr.objective.teacher(x, y, idx, 3, s)
    run_teacher = tr.objective.teacher.teacher  # the copy the run's source runs (BatchNorm folded)
    live16 = LiveTeacher(run_teacher, ["stage2"], ["stage2"], _recipe(MASKED, 'cache-fp16', 0, mask_kind='soft').mask, round_to=torch.float16)
    live32 = LiveTeacher(run_teacher, ["stage2"], ["stage2"], _recipe(MASKED, 'cache-fp16', 0, mask_kind='soft').mask)
    hits = store.hits
    for s, (x, y, idx) in enumerate(batches):
        c = tr.objective.teacher(x, y, idx, 3, s)
        r = live16(x, y)
        f = live32(x, y)
        assert torch.equal(c[0], r[0])
        assert torch.equal(c[1]["stage2"], r[1]["stage2"]) and torch.equal(c[2]["stage2"], r[2]["stage2"])
        # fp16 storage: one rounding to 11 significant bits (relative error <= 2^-11, normal range)
        for a, b in ((c[0], f[0]), (c[1]["stage2"], f[1]["stage2"]), (c[2]["stage2"], f[2]["stage2"])):
            assert a.dtype == torch.float32
            assert ((a - b).abs() <= b.abs() * 2.0**-11 + 2.0**-24).all()
    assert store.hits - hits == len(batches)


def test_keys_never_serve_stale_entries(tmp_path, splits, teacher):
    # memory_mb=0: every finished epoch goes to disk and is read back memory-mapped
    root = tmp_path / "cache"
    store = TeacherStore(root, memory_mb=0)
    tr = _trainer(tmp_path, "a", KD, splits, teacher, store)
    batches = list(tr.train_loader.epoch(0))
    for s, (x, y, idx) in enumerate(batches):
        tr.objective.teacher(x, y, idx, 0, s)
    files = list(root.glob("logits-*/e00000.pt"))
    assert len(files) == 1
    assert json.loads((files[0].parent / "key.json").read_text())["loader_seed"] == tr.train_loader.seed
    # a new process (new store on the same folder) reuses the disk entries
    store2 = TeacherStore(root, memory_mb=0)
    tr2 = _trainer(tmp_path, "b", KD, splits, teacher, store2)
    for s, (x, y, idx) in enumerate(batches):
        out = tr2.objective.teacher(x, y, idx, 0, s)
    assert store2.hits == len(batches) + 1 and store2.misses == 0  # (+1: setup probe)
    # other teacher weights, another seed's data order, fp32 storage: new keys, no reuse
    other = create_model("cnn_tiny", num_classes=10, in_channels=1)
    for t, seed, mode in ((other, 0, "cache-fp16"), (teacher, 1, "cache-fp16"), (teacher, 0, "cache-fp32")):
        st = TeacherStore(root, memory_mb=0)
        tr3 = _trainer(tmp_path, "c", KD, splits, t, st, mode=mode, seed=seed)
        assert st.misses == 1 and st.hits == 0  # the setup probe had to be computed
        assert set(tr3.objective.teacher.keys.values()).isdisjoint(tr2.objective.teacher.keys.values())
    # an entry used for other samples is refused
    x, y, idx = batches[1]
    with pytest.raises(RuntimeError, match="other samples"):
        tr2.objective.teacher(x, y, idx.flip(0), 0, 1)
    assert out[0].dtype == torch.float32


def test_regimes(tmp_path, splits, teacher):
    # paired (default): methods share batches; consistent teaching: fresh draws per method, live
    p_kd = _trainer(tmp_path, "a", KD, splits, teacher, TeacherStore())
    p_m = _trainer(tmp_path, "b", MASKED, splits, teacher, TeacherStore())
    assert p_kd.train_loader.seed == p_m.train_loader.seed
    c_kd = _trainer(tmp_path, "c", KD, splits, teacher, TeacherStore(), mode="consistent")
    c_m = _trainer(tmp_path, "d", MASKED, splits, teacher, TeacherStore(), mode="consistent")
    assert c_kd.train_loader.seed != c_m.train_loader.seed
    assert isinstance(c_kd.objective.teacher, LiveTeacher) and c_kd.objective.teacher.round_to is None
    live = _trainer(tmp_path, "e", KD, splits, teacher, TeacherStore(), mode="live")
    assert isinstance(live.objective.teacher, LiveTeacher) and live.objective.teacher.round_to is None
    assert live.train_loader.seed == p_kd.train_loader.seed
    # a cache-* run without a store computes live, rounded as the cache would store
    alone = _trainer(tmp_path, "f", KD, splits, teacher, None)
    assert isinstance(alone.objective.teacher, LiveTeacher) and alone.objective.teacher.round_to == torch.float16


def test_bench_runs_every_variant_side_by_side():
    from kdlab.experiments.bench import bench_steps, format_table

    rows = bench_steps(teacher="cnn_tiny", student="cnn_tiny", batch_size=8, steps=2, image_size=8,
                       layers=("stage2", "stage2"), mask_steps=2, repeats=1, log=lambda *a: None)
    assert [r["variant"] for r in rows] == ["baseline", "kd-live", "kd-cached", "full-live", "full-cached"]
    assert rows[0]["cost_vs_baseline"] == 1.0
    assert all(r["images_per_s"] > 0 for r in rows)
    # cached variants were served from the store: fill pass (2) + warm-up miss, then 1 round of 2 hits
    assert [r.get("cache_hits") for r in rows if "cached" in r["variant"]] == [3, 3]
    assert "| full-cached |" in format_table(rows)
