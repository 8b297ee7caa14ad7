"""Issue 16: transfer sets (unlabelled, MUNGE, DeepInversion, folders), label masking of the loss
terms, logit regression, ensemble teachers, cross-resolution students and "gap closed".

Expected values are worked out by hand (in the comments) or from the papers' formulas."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdlab.core.config import RecipeError
from kdlab.data.munge import munge, munge_images, nearest_neighbours
from kdlab.data.splits import TensorSet
from kdlab.data.transfer import TransferContext, with_transfer_sets
from kdlab.distill.ensemble import EnsembleTeacher, average_outputs
from kdlab.distill.losses import LOSSES, BatchRecord, LossTerm
from kdlab.distill.losses.dkd import dkd_loss
from kdlab.distill.losses.response import logit_mse_loss
from kdlab.distill.teachers import TeacherStore, module_fingerprint
from kdlab.models import create_model
from kdlab.report.gap import gap_closed, gap_closed_by_seed
from kdlab.train.objective import DistillObjective, StepContext
from kdlab.train.recipe import recipe_from_dict
from kdlab.train.runtime import Runtime


def _recipe(**over):
    d = {
        "name": "transfer-test",
        "data": {"name": "digits", "label_fraction": 0.1},
        "student": {"model": "cnn_tiny"}, "teacher": {"model": "cnn_tiny"},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "device": "cpu", "patience": None},
        "loss": [{"term": "ce", "weight": 0.1}, {"term": "kd", "weight": 0.9, "T": 4.0}],
    }
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return recipe_from_dict(d)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(7)
    return create_model("cnn_tiny", num_classes=10, in_channels=1).eval()


# ------------------------------------------------------------------------ labelled / unlabelled


class Spy(LossTerm):
    """Records the labels and batch size it is given; value = its own CE-free constant 0."""

    def __init__(self, labels: bool, teacher: bool = False):
        super().__init__()
        self.needs_labels, self.needs_teacher = labels, teacher
        self.seen = []

    def forward(self, rec):
        self.seen.append(rec.y.clone())
        return rec.s_logits.sum() * 0.0


class FixedSource:
    """A teacher source returning fixed logits (rows of ``t``) for the batch's indices."""

    def __init__(self, t):
        self.t, self.teacher = t, nn.Identity()

    def __call__(self, x, y, idx=None, epoch=0, step=0):
        from kdlab.distill.teachers import TeacherOutputs

        return TeacherOutputs(self.t[idx], {}, {})


def _objective(terms, t_logits=None, partial=True):
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    src = FixedSource(t_logits) if t_logits is not None else None
    return DistillObjective(student, [(n, 1.0, t) for n, t in terms], runtime=Runtime("cpu", "none", None),
                            teacher=src, partial_labels=partial)


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 1, 2, 2, generator=g)
    y = torch.tensor([2, -1, 0, -1, 1])
    return x, y, torch.arange(5)


def test_label_terms_never_see_unlabelled_samples_teacher_terms_see_all():
    t = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    spy_l, spy_t = Spy(labels=True), Spy(labels=False, teacher=True)
    ce = LOSSES.get("ce")()
    obj = _objective([("spy_l", spy_l), ("spy_t", spy_t), ("ce", ce)], t)
    x, y, idx = _batch()
    loss, logs = obj.step((x, y, idx), StepContext(0, 0))
    assert spy_l.seen[0].tolist() == [2, 0, 1]            # the labelled rows, in batch order
    assert spy_t.seen[0].tolist() == [2, -1, 0, -1, 1]    # everything
    s = obj.student(x)
    lab = torch.tensor([0, 2, 4])
    # CE by hand over the labelled rows only: mean_b −log softmax(s_b)[y_b]
    want = -(F.log_softmax(s[lab], 1)[torch.arange(3), y[lab]]).mean()
    assert torch.allclose(logs["ce"], want, atol=1e-6)
    # train_acc over labelled rows only
    hits = (s[lab].argmax(1) == y[lab]).float().mean()
    assert torch.allclose(logs["train_acc"], hits)


#: detection terms read ground-truth boxes from a detection batch, not class labels: this classification
#: harness does not apply to them (tests/test_detection.py checks them on detection batches)
_DETECTION_TERMS = {n for n in LOSSES.names()
                    if LOSSES.get(n).__module__ in ("kdlab.distill.losses.detection", "kdlab.distill.losses.tv_detection")}


@pytest.mark.parametrize("name", sorted(n for n in LOSSES.names() if getattr(LOSSES.get(n), "needs_labels", False)
                                        and n not in _DETECTION_TERMS))
def test_every_label_term_is_masked(name, monkeypatch):
    """Every registered term flagged needs_labels (ce, ls) gets only labels >= 0."""
    term = LOSSES.get(name)()
    seen = []
    orig = type(term).forward

    def spy(self, rec):
        seen.append(rec.y.clone())
        return orig(self, rec)

    monkeypatch.setattr(type(term), "forward", spy)
    # a teacher for the terms that need one (adadistill), and the training labels for margin heads
    t = torch.randn(5, 3, generator=torch.Generator().manual_seed(2)) if term.needs_teacher else None
    obj = _objective([(name, term)], t)
    obj.train_labels = torch.tensor([0, 1, 2])
    obj.setup(_batch())
    obj.step(_batch(), StepContext(0, 0))
    assert seen and all(bool((s >= 0).all()) for s in seen)


def test_batch_without_labels_gives_label_terms_zero_with_a_graph():
    obj = _objective([("ce", LOSSES.get("ce")())])
    x, _, idx = _batch()
    loss, logs = obj.step((x, torch.full((5,), -1), idx), StepContext(0, 0))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()  # a zero gradient, no error


def test_default_path_has_no_label_mask():
    obj = _objective([("ce", LOSSES.get("ce")())], partial=False)
    rec = obj.record((_batch()[0], torch.tensor([2, 1, 0, 1, 1]), torch.arange(5)), 0, 0)
    assert rec.labelled is None and rec.only_labelled() is rec


def test_dkd_target_part_only_on_labelled_samples():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    y = torch.tensor([1, 3, 0, 2])
    # all labelled: the paper's formula unchanged
    assert torch.allclose(dkd_loss(s, t, y, labelled=torch.ones(4, dtype=torch.bool)), dkd_loss(s, t, y))
    lab = torch.tensor([True, False, True, False])
    y_u = torch.tensor([1, -1, 0, -1])
    got = dkd_loss(s, t, y_u, alpha=1.0, beta=8.0, T=4.0, labelled=lab)
    # by hand: TCKD over rows 0, 2 (their labels); NCKD over all rows, split at the label for
    # rows 0, 2 and at the teacher's top class for rows 1, 3
    T = 4.0
    split = torch.tensor([1, int(t[1].argmax()), 0, int(t[3].argmax())])

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    p_s, p_t = F.softmax(s / T, 1), F.softmax(t / T, 1)
    tckd = []
    nckd = []
    for b in range(4):
        c = int(split[b])
        bs = torch.stack([p_s[b, c], 1 - p_s[b, c]])
        bt = torch.stack([p_t[b, c], 1 - p_t[b, c]])
        tckd.append(kl(bt, bs))
        keep = [k for k in range(5) if k != c]
        qs, qt = p_s[b, keep] / p_s[b, keep].sum(), p_t[b, keep] / p_t[b, keep].sum()
        nckd.append(kl(qt, qs))
    want = T * T * (1.0 * (tckd[0] + tckd[2]) / 2 + 8.0 * sum(nckd) / 4)
    assert torch.allclose(got, want, atol=1e-5)


def test_masks_explain_the_teacher_top_class_for_unlabelled(teacher):
    from kdlab.core.config import MaskCfg
    from kdlab.distill.teachers import LiveTeacher

    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    live = LiveTeacher(teacher, [], ["stage2"], MaskCfg(method="grad", q=0.5, kind="soft"))
    top = teacher(x).argmax(1)
    got = live.masks(x, torch.tensor([-1, -1, -1]), ["stage2"])["stage2"]
    want = live.masks(x, top, ["stage2"])["stage2"]
    assert torch.equal(got, want)


# -------------------------------------------------------------------------------- data splits


def test_transfer_labels_exactly_the_samples_drop_keeps():
    from kdlab.train.recipe import load_recipe
    from kdlab.train.build import load_splits

    for seed in (0, 1):
        drop = load_splits(load_recipe("digits/kd"), seed=seed)
        tr = load_splits(load_recipe("digits/kd", ["data.unlabelled=transfer"]), seed=seed)
        lab = tr.train.y >= 0
        assert torch.equal(tr.train.x[lab], drop.train.x) and torch.equal(tr.train.y[lab], drop.train.y)
        assert torch.equal(tr.val.x, drop.val.x) and torch.equal(tr.test.x, drop.test.x)
        # digits: 1,797 images, 449 test, 135 val -> a pool of 1,213, 120 of them labelled
        assert len(tr.train) == 1213 and int(lab.sum()) == 120


def test_factory_with_transfer_is_refused():
    from kdlab.train.build import load_splits

    r = _recipe(data={"factory": "mypkg:data", "unlabelled": "transfer"})
    with pytest.raises(ValueError, match="data.transfer"):
        load_splits(r)


def test_transfer_run_trains_end_to_end(tmp_path, teacher):
    from kdlab.train.build import build_run, train

    r = _recipe(data={"unlabelled": "transfer"}, loss=[{"term": "ce", "weight": 0.1},
                                                       {"term": "kd", "weight": 0.9, "T": 4.0},
                                                       {"term": "dkd", "weight": 0.1}])
    run = build_run(r, teacher=teacher)
    assert run.objective.partial_labels and len(run.splits.train) == 1213
    res = train(r, tmp_path / "run", teacher=teacher, progress=False, teacher_cache=TeacherStore())
    assert 0.0 <= res["test_acc"] <= 1.0 and math.isfinite(res["val_acc"])


# ---------------------------------------------------------------------------------------- MUNGE


def test_munge_hand_table_nominal_swaps():
    # rows A=(0,0), B=(1,0), C=(10,10); neighbours: A->B, B->A, C->B (|C-B|²=181 < |C-A|²=200).
    # p = 1 swaps every attribute. Row 0 with row 1: [B, A, C]; row 1 with row 0: [A, B, C];
    # row 2 with row 1: [A, C, B].
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 10.0]])
    assert nearest_neighbours(x).tolist() == [1, 0, 1]
    got = munge(x, k=1, p=1.0, s=1.0, nominal=torch.tensor([True, True]), generator=torch.Generator().manual_seed(0))
    assert got.tolist() == [[0.0, 0.0], [10.0, 10.0], [1.0, 0.0]]


def test_munge_continuous_swap_with_tiny_spread_and_no_swap():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 10.0]])
    # s huge: sd = |e_a - e'_a| / s ~ 0, so a continuous swap is (almost) the nominal swap
    got = munge(x, k=2, p=1.0, s=1e12, generator=torch.Generator().manual_seed(0))
    want = torch.tensor([[0.0, 0.0], [10.0, 10.0], [1.0, 0.0]] * 2, dtype=torch.float64)
    assert got.shape == (6, 2) and torch.allclose(got, want, atol=1e-9)
    assert torch.equal(munge(x, p=0.0), x.double())


def test_munge_swap_rate_matches_two_chances():
    # two rows, each the other's neighbour; an attribute ends up changed iff exactly one of the
    # two passes swapped it: probability 2p(1−p) = 0.42 at p = 0.3
    d = 4000
    x = torch.stack([torch.zeros(d), torch.ones(d)])
    got = munge(x, p=0.3, nominal=torch.ones(d, dtype=torch.bool), generator=torch.Generator().manual_seed(5))
    rate = float((got[0] != 0).double().mean())
    assert abs(rate - 0.42) < 4 * math.sqrt(0.42 * 0.58 / d)


def test_munge_continuous_spread_is_gap_over_s():
    # pairs (a, b) = (0, 4) (plus 1000·j), each the other's neighbour; p = 1, s = 2.
    # row a: sd = |0 − 4|/2 = 2, a1 = 4 + 2·z1, b1 = 0 + 2·z2;
    # row b: sd2 = |b1 − a1|/2, b2 = a1 + sd2·z3, a2 = b1 + sd2·z4.
    # So E[a2] = 0, E[b2] = 4 and Var[a2] = Var[b1] + E[sd2²] = 4 + (Var(b1 − a1) + 4²)/4 = 4 + (8 + 16)/4 = 10.
    n = 3000
    base = torch.arange(n, dtype=torch.float64) * 1000.0
    x = torch.stack([base, base + 4.0], 1).reshape(-1, 1)
    got = munge(x, p=1.0, s=2.0, generator=torch.Generator().manual_seed(6))
    a2, b2 = got[0::2, 0] - base, got[1::2, 0] - base
    assert abs(float(a2.mean())) < 4 * math.sqrt(10 / n)
    assert abs(float(b2.mean()) - 4.0) < 4 * math.sqrt(10 / n)
    assert float(a2.var()) == pytest.approx(10.0, abs=1.0)


def test_munge_images_stay_in_range_and_seeded():
    x = torch.rand(6, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    a, b = munge_images(x, k=2, seed=3), munge_images(x, k=2, seed=3)
    assert a.shape == (12, 1, 3, 3) and torch.equal(a, b) and float(a.min()) >= 0 and float(a.max()) <= 1


def test_transfer_sets_join_unlabelled(tmp_path):
    from PIL import Image

    from kdlab.train.recipe import TransferSetCfg
    from kdlab.data.digits import DIGITS_INFO

    for i in range(3):
        Image.fromarray(np.full((16, 16), 60 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    train = TensorSet(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    ctx = TransferContext(train, DIGITS_INFO, seed=0)
    cfgs = [TransferSetCfg(kind="folder", path=str(tmp_path)), TransferSetCfg(kind="munge", k=2, p=0.5)]
    out = with_transfer_sets(train, cfgs, ctx)
    assert len(out) == 4 + 3 + 8
    assert out.y.tolist() == [0, 1, 2, 3] + [-1] * 11
    assert torch.allclose(out.x[5], torch.full((1, 8, 8), 60 / 255))  # the folder's image 1, resized
    with pytest.raises(ValueError, match="unknown transfer set kind"):
        TransferSetCfg(kind="mungee")


def test_deepinv_transfer_set_from_the_teacher():
    from kdlab.train.recipe import TransferSetCfg
    from kdlab.data.digits import DIGITS_INFO

    torch.manual_seed(0)
    bn_teacher = create_model("cnn_tiny", num_classes=10, in_channels=1).eval()
    train = TensorSet(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    ctx = TransferContext(train, DIGITS_INFO, seed=0, teacher=lambda: bn_teacher)
    out = with_transfer_sets(train, [TransferSetCfg(kind="deepinv", n=8, iters=2, batch_size=8)], ctx)
    assert len(out) == 12 and out.y[4:].eq(-1).all() and float(out.x.min()) >= 0


# ------------------------------------------------------------------------------ logit regression


def test_logit_mse_by_hand():
    s = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [3.0, -1.0]])
    # ½·(1+4) = 2.5 and ½·(9+1) = 5, mean 3.75
    assert float(logit_mse_loss(s, t)) == pytest.approx(3.75)
    rec = BatchRecord(x=torch.zeros(2, 1), y=torch.tensor([0, -1]), s_logits=s, t_logits=t)
    assert float(LOSSES.get("logit_mse")()(rec)) == pytest.approx(3.75)
    assert LOSSES.get("logit_mse").needs_teacher and not LOSSES.get("logit_mse").needs_labels


# ------------------------------------------------------------------------------------ ensembles


def _linear(w, b):
    m = nn.Linear(2, 2)
    with torch.no_grad():
        m.weight.copy_(torch.tensor(w))
        m.bias.copy_(torch.tensor(b))
    return m


def test_ensemble_teacher_averages_logits_or_probabilities():
    a = _linear([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0])
    b = _linear([[0.0, 0.0], [0.0, 0.0]], [2.0, 0.0])
    x = torch.tensor([[1.0, 3.0]])
    # logits: a(x) = (1, 3), b(x) = (2, 0): mean (1.5, 1.5)
    assert torch.allclose(EnsembleTeacher([a, b], "logits")(x), torch.tensor([[1.5, 1.5]]))
    # probs: softmax(1,3) = (1/(1+e²), e²/(1+e²)); softmax(2,0) = (e²/(1+e²), 1/(1+e²));
    # their mean is (½, ½), so log p̄ = (log ½, log ½)
    out = EnsembleTeacher([a, b], "probs")(x)
    assert torch.allclose(out, torch.log(torch.tensor([[0.5, 0.5]])), atol=1e-6)
    assert torch.allclose(average_outputs([torch.tensor([[0.0, 0.0]])], "probs").exp(), torch.tensor([[0.5, 0.5]]))
    # one frozen module: its fingerprint (cache key) depends on members and on the rule
    ea, eb = EnsembleTeacher([a, b], "logits"), EnsembleTeacher([a, b], "probs")
    assert module_fingerprint(ea) != module_fingerprint(eb)
    assert not any(p.requires_grad for p in ea.parameters())


def test_ensemble_teacher_from_checkpoints(tmp_path):
    from kdlab.core.checkpoint import atomic_save, model_checkpoint
    from kdlab.data.digits import DIGITS_INFO
    from kdlab.train.build import load_teacher

    paths = []
    for i in range(2):
        torch.manual_seed(i)
        m = create_model("cnn_tiny", num_classes=10, in_channels=1).eval()
        p = tmp_path / f"t{i}.pt"
        atomic_save(model_checkpoint(m, model_name="cnn_tiny", model_kwargs={}, num_classes=10, in_channels=1,
                                     dataset="digits"), p)
        paths.append((m, str(p)))
    r = _recipe(teacher={"model": "cnn_tiny", "checkpoints": [p for _, p in paths]})
    ens = load_teacher(r, DIGITS_INFO, "cpu")
    x = torch.randn(3, 1, 8, 8)
    want = (paths[0][0](x) + paths[1][0](x)) / 2
    assert torch.allclose(ens(x), want, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="ensemble teacher checkpoint"):
        load_teacher(_recipe(teacher={"model": "cnn_tiny", "checkpoints": [str(tmp_path / "no.pt")]}),
                     DIGITS_INFO, "cpu")


# --------------------------------------------------------------------------- cross-resolution


def test_student_sees_a_resized_view_teacher_the_full_image(teacher):
    from kdlab.train.build import build_run

    r = _recipe(student={"model": "cnn_tiny", "input": {"resize": [4, 4]}})
    run = build_run(r, teacher=teacher)  # no store: the teacher runs live on every batch
    shapes = []
    run.objective.student.register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape[-2:])))
    t_shapes = []
    # the module the teacher source runs (a BatchNorm-folded copy of `teacher`, train.fast_teacher)
    run.objective.teacher.teacher.register_forward_pre_hook(lambda m, a: t_shapes.append(tuple(a[0].shape[-2:])))
    batch = next(iter(run.train_loader.epoch(0)))
    run.objective.step(batch, StepContext(0, 0))
    assert shapes[-1] == (4, 4) and t_shapes[-1] == (8, 8)
    run.objective.evaluate("student", run.val_loader)
    assert shapes[-1] == (4, 4)  # evaluation in the student's view
    assert run.objective.checkpoint_meta("student")["input"] == {"resize": [4, 4]}
    # the teacher's cache keys do not depend on the student's view (the teacher's input is the same)
    cached = build_run(r, teacher=teacher, store=TeacherStore())
    plain = build_run(_recipe(), teacher=teacher, store=TeacherStore())
    assert cached.objective.teacher.keys == plain.objective.teacher.keys


def test_resize_view_by_hand():
    from kdlab.data.views import resize_view

    x = torch.arange(16.0).view(1, 1, 4, 4)
    # 4x4 -> 2x2 by area: the mean of each 2x2 block, e.g. (0 + 1 + 4 + 5)/4 = 2.5
    want = torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]])
    assert torch.allclose(resize_view(x, (2, 2)), want)
    # 2x2 -> 4x4 bilinear (align_corners=False): corners keep their value, x[0, 1] = ¾·0 + ¼·1
    up = resize_view(torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]]), (4, 4))
    assert float(up[0, 0, 0, 0]) == 0.0 and float(up[0, 0, 0, 1]) == pytest.approx(0.25)
    with pytest.raises(RecipeError, match="student.input"):
        _recipe(teacher={"model": "cnn_tiny", "input": {"resize": [4, 4]}})


# ----------------------------------------------------------------------------------- gap closed


def test_gap_closed_by_hand():
    assert gap_closed(0.8, 0.6, 0.9) == pytest.approx(2 / 3)
    assert gap_closed(0.9, 0.6, 0.9) == pytest.approx(1.0)
    assert gap_closed(0.5, 0.6, 0.9) == pytest.approx(-1 / 3)
    assert math.isnan(gap_closed(0.8, 0.9, 0.9)) and math.isnan(gap_closed(0.8, 0.6, None))
    got = gap_closed_by_seed({0: 0.7, 1: 0.8, 2: 0.9}, {0: 0.5, 1: 0.6}, 1.0)
    assert got == {0: pytest.approx(0.4), 1: pytest.approx(0.5)}


def test_crd_label_positives_only_for_labelled_anchors():
    crd = LOSSES.get("crd")(layers=[["a", "b"]], n_neg=2, positives="label")
    # labels by training index: class 0 = {0, 2}, class 1 = {1, 4}, index 3 unlabelled
    crd.set_labels(torch.tensor([0, 1, 0, -1, 1]))
    torch.manual_seed(0)
    draws = torch.stack([crd.label_positives(torch.tensor([3, 0, 1]), torch.tensor([-1, 0, 1])) for _ in range(400)])
    assert draws[:, 0].eq(3).all()                       # unlabelled anchor: its own entry
    assert set(draws[:, 1].tolist()) == {0, 2}           # class 0 members, both drawn
    assert set(draws[:, 2].tolist()) == {1, 4}
    assert abs(float(draws[:, 1].eq(0).double().mean()) - 0.5) < 0.1  # uniform within the class
    with pytest.raises(RecipeError, match="positives"):
        _recipe(loss=[{"term": "crd", "layers": [["stage3", "stage3"]], "positives": "class"}])


def test_crd_label_positives_train_in_a_transfer_run(teacher, tmp_path):
    from kdlab.train.build import train

    r = _recipe(data={"unlabelled": "transfer"},
                loss=[{"term": "ce"}, {"term": "crd", "weight": 0.5, "layers": [["stage3", "stage3"]],
                                         "n_neg": 64, "positives": "label"}])
    res = train(r, tmp_path / "crd", teacher=teacher, progress=False)
    assert math.isfinite(res["val_acc"])
