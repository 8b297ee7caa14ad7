"""The method library's loss terms against values worked out by hand from the papers' formulas,
their gradient flow, and their failures on bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdlab.core.checkpoint import atomic_save, model_checkpoint
from kdlab.distill.losses import LOSSES, BatchRecord
from kdlab.distill.losses.contrastive import CRD, crd_critic, crd_nce_loss
from kdlab.distill.losses.dkd import dkd_loss, label_smoothing_loss, multi_teacher_kd_loss
from kdlab.distill.losses.feature import at_distance, at_loss, mmd2, channel_distributions, nst_loss
from kdlab.distill.losses.relation import fsp_loss, fsp_matrix, rkd_angle_loss, rkd_distance_loss
from kdlab.models import create_model

from loss_fixtures import distill_step

L = math.log


def _kl(p, q):
    return sum(pi * L(pi / qi) for pi, qi in zip(p, q) if pi > 0)


# ------------------------------------------------------------------------------------------- DKD

def test_dkd_by_hand_tckd_zero():
    # y = 0, T = 1. student [0,0,0] -> p_s = [1/3,1/3,1/3]: b_s = [1/3, 2/3], non-target p̂_s = [1/2, 1/2]
    # teacher [ln2, ln3, 0] -> exp [2,3,1]/6 = [1/3, 1/2, 1/6]: b_t = [1/3, 2/3] -> TCKD = 0
    # non-target p̂_t = [3/6, 1/6] / (4/6) = [3/4, 1/4]
    # NCKD = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.304099 - 0.173287 = 0.130812; loss = 8 * NCKD
    s = torch.zeros(1, 3)
    t = torch.tensor([[L(2), L(3), 0.0]])
    y = torch.tensor([0])
    assert dkd_loss(s, t, y, 1.0, 8.0, 1.0).item() == pytest.approx(8 * 0.130812, abs=1e-5)


def test_dkd_by_hand_both_parts_and_T():
    # teacher [ln4, ln3, 0] -> [4,3,1]/8: b_t = [1/2, 1/2], p̂_t = [3/4, 1/4]
    # TCKD = 1/2 ln(3/2) + 1/2 ln(3/4) = 0.058892; NCKD = 0.130812 (as above)
    s = torch.zeros(1, 3)
    t = torch.tensor([[L(4), L(3), 0.0]])
    y = torch.tensor([0])
    tckd, nckd = 0.5 * L(1.5) + 0.5 * L(0.75), 0.75 * L(1.5) + 0.25 * L(0.5)
    assert tckd == pytest.approx(0.058892, abs=1e-6)
    assert dkd_loss(s, t, y, 1.0, 8.0, 1.0).item() == pytest.approx(tckd + 8 * nckd, abs=1e-5)
    assert dkd_loss(s, t, y, 2.0, 0.0, 1.0).item() == pytest.approx(2 * tckd, abs=1e-6)
    # T = 2: teacher logits halved -> p_t ∝ [2, √3, 1]; the loss carries T² = 4
    r3 = math.sqrt(3)
    z = 2 + r3 + 1
    b_t, b_s = [2 / z, (r3 + 1) / z], [1 / 3, 2 / 3]
    q_t = [r3 / (r3 + 1), 1 / (r3 + 1)]
    expected = 4 * (_kl(b_t, b_s) + 8 * _kl(q_t, [0.5, 0.5]))
    assert dkd_loss(s, t, y, 1.0, 8.0, 2.0).item() == pytest.approx(expected, rel=1e-5)


def test_dkd_zero_for_equal_logits_and_warmup():
    torch.manual_seed(0)
    z = torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    assert dkd_loss(z, z, y).item() == pytest.approx(0.0, abs=1e-5)
    term = LOSSES.get("dkd")(warmup=4)
    t = torch.randn(4, 5)
    full = dkd_loss(z, t, y).item()
    rec = BatchRecord(x=torch.zeros(4, 1), y=y, s_logits=z, t_logits=t, epoch=1)
    assert term(rec).item() == pytest.approx(full * 2 / 4, rel=1e-5)  # ramp (epoch+1)/warmup
    with pytest.raises(ValueError):
        LOSSES.get("dkd")(T=0)


# --------------------------------------------------------------------------- label smoothing, MTKD

def test_label_smoothing_by_hand():
    # p = [3/4, 1/4], y = 0, ε = 0.2: 0.8·(−ln 3/4) + 0.2·½(−ln 3/4 − ln 1/4) = 0.230146 + 0.167398
    s = torch.tensor([[L(3), 0.0]])
    y = torch.tensor([0])
    assert label_smoothing_loss(s, y, 0.2).item() == pytest.approx(0.397543, abs=1e-5)
    torch.manual_seed(1)
    z, yy = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    assert label_smoothing_loss(z, yy, 0.1).item() == pytest.approx(
        F.cross_entropy(z, yy, label_smoothing=0.1).item(), rel=1e-5)
    with pytest.raises(ValueError):
        LOSSES.get("ls")(epsilon=1.0)


def test_multi_teacher_average_by_hand(tmp_path):
    # teachers [3/4, 1/4] and [1/4, 3/4] average to uniform; student p = [3/4, 1/4]
    # KL(u ‖ p_s) = ½ ln(0.5/0.75) + ½ ln(0.5/0.25) = 0.143841
    t1, t2 = torch.tensor([[L(3), 0.0]]), torch.tensor([[0.0, L(3)]])
    s = torch.tensor([[L(3), 0.0]])
    assert multi_teacher_kd_loss(s, [t1, t2], T=1.0).item() == pytest.approx(0.143841, abs=1e-5)
    assert multi_teacher_kd_loss(torch.zeros(1, 2), [t1, t2], T=1.0).item() == pytest.approx(0.0, abs=1e-6)
    # the term loads an extra teacher from a checkpoint and averages it with rec.t_logits
    torch.manual_seed(0)
    extra = create_model("cnn_tiny", num_classes=10, in_channels=1).eval()
    path = tmp_path / "t2.pt"
    atomic_save(model_checkpoint(extra, model_name="cnn_tiny", model_kwargs={}, num_classes=10,
                                 in_channels=1, dataset="digits"), path)
    x = torch.randn(3, 1, 8, 8)
    main_t = torch.randn(3, 10)
    s = torch.randn(3, 10, requires_grad=True)
    with torch.no_grad():
        t2_logits = extra(x)
    rec = BatchRecord(x=x, y=torch.tensor([0, 1, 2]), s_logits=s, t_logits=main_t,
                      extra_teachers={str(path): t2_logits})
    term = LOSSES.get("mtkd")(checkpoints=[str(path)], T=2.0)
    assert term.extra_teacher_checkpoints() == [str(path)]
    assert list(term.parameters()) == []  # extra teachers are frozen, not trained
    assert term(rec).item() == pytest.approx(multi_teacher_kd_loss(s, [main_t, t2_logits], 2.0).item(), rel=1e-5)
    # the run builder loads the extra teacher and serves its logits like the main teacher's
    from kdlab.train.recipe import recipe_from_dict
    from kdlab.train.build import build_run

    d = {"name": "m", "data": {"name": "digits"}, "student": {"model": "cnn_tiny"},
         "teacher": {"model": "cnn_tiny", "checkpoint": str(path)},
         "train": {"epochs": 1, "batch_size": 16, "device": "cpu", "teacher_mode": "live"},
         "loss": [{"term": "ce", "weight": 0.1}, {"term": "mtkd", "weight": 0.9, "checkpoints": [str(path)]}]}
    run = build_run(recipe_from_dict(d))
    rec = run.objective.record(next(iter(run.train_loader.epoch(0))), 0, 0)
    with torch.no_grad():
        assert torch.allclose(rec.extra_teachers[str(path)], extra(rec.x), atol=1e-6)
    d["loss"][1]["checkpoints"] = [str(tmp_path / "missing.pt")]
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_run(recipe_from_dict(d))
    with pytest.raises(ValueError):
        LOSSES.get("mtkd")(checkpoints=[], include_main=False)


# ----------------------------------------------------------------------------------- FitNets, AT, NST

def test_at_one_channel_2x2_by_hand():
    # F_s = [[1,1],[1,1]] -> Q_s = [1,1,1,1], normalised [.5,.5,.5,.5]
    # F_t = [[2,0],[0,0]] -> Q_t = [4,0,0,0], normalised [1,0,0,0]
    # ‖[-.5,.5,.5,.5]‖₂ = 1
    fs = torch.ones(1, 1, 2, 2)
    ft = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])
    assert at_distance(fs, ft).item() == pytest.approx(1.0, abs=1e-6)
    assert at_loss([(fs, ft)], beta=2.0, per_position=False).item() == pytest.approx(1.0, abs=1e-6)
    # two layer pairs are summed; per_position divides by H·W = 4: 1000/2 · (1/4 + 0/4) = 125
    assert at_loss([(fs, ft), (ft, ft)], beta=1000.0).item() == pytest.approx(125.0, rel=1e-6)


def test_nst_by_hand_poly_and_linear_equals_at():
    fs = torch.ones(1, 1, 2, 2)                          # x = [.5,.5,.5,.5]
    ft = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])      # y = [1,0,0,0]
    # poly d=2: k(x,x) = 1, k(y,y) = 1, k(x,y) = (0.5)² -> MMD² = 1 + 1 − 2·0.25 = 1.5
    assert nst_loss(fs, ft, "poly").item() == pytest.approx(1.5, abs=1e-6)
    # linear: MMD² = ‖x − y‖² = 1 = (AT distance with p = 1 on these non-negative maps)²
    assert nst_loss(fs, ft, "linear").item() == pytest.approx(1.0, abs=1e-6)
    torch.manual_seed(0)
    a, b = torch.rand(2, 1, 3, 3), torch.rand(2, 1, 3, 3)
    assert nst_loss(a, b, "linear").item() == pytest.approx((at_distance(a, b, p=1.0) ** 2).mean().item(), rel=1e-5)
    # two student channels a=e1, b=e2 vs one teacher channel c=e1 (poly):
    # Kxx mean = (1+1+0+0)/4 = .5, Kyy = 1, Kxy mean = (1+0)/2 = .5 -> .5 + 1 − 1 = .5
    s2 = torch.zeros(1, 2, 2, 2)
    s2[0, 0, 0, 0] = 1.0
    s2[0, 1, 0, 1] = 1.0
    t1 = torch.zeros(1, 1, 2, 2)
    t1[0, 0, 0, 0] = 3.0
    assert nst_loss(s2, t1).item() == pytest.approx(0.5, abs=1e-6)
    x = channel_distributions(s2)
    assert mmd2(x, x).item() == pytest.approx(0.0, abs=1e-6)


def test_fitnets_regressor_and_schedule():
    with pytest.raises(ValueError, match="hint layer"):
        LOSSES.get("fitnets")()
    with pytest.raises(ValueError):
        LOSSES.get("fitnets")(layers=[["a", "b"], ["c", "d"]])
    term = LOSSES.get("fitnets")(layers=[["s", "t"]], until_epoch=2)
    fs = torch.randn(2, 3, 4, 4, requires_grad=True)
    ft = torch.randn(2, 5, 2, 2)
    rec = BatchRecord(x=fs, y=torch.tensor([0, 1]), s_logits=torch.zeros(2, 3), t_logits=torch.zeros(2, 3),
                      s_feats={"s": fs}, t_feats={"t": ft}, epoch=0)
    term.setup(rec)
    assert term.regressor.weight.shape == (5, 3, 1, 1)
    with torch.no_grad():
        term.regressor.weight.zero_()
    # zero regressor -> MSE = mean(F_t²)
    assert term(rec).item() == pytest.approx(ft.pow(2).mean().item(), rel=1e-6)
    rec.epoch = 2  # after the hint stage the term is off
    assert term(rec).item() == 0.0


# ------------------------------------------------------------------------------------- FSP, RKD

def test_fsp_one_channel_by_hand():
    # G = Σ_hw F1·F2 / (H·W): student (1·1 + 4·1)/4 = 1.25, teacher 4/4 = 1 -> (1.25 − 1)² = 0.0625
    f1 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    f2 = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    ones = torch.ones(1, 1, 2, 2)
    assert fsp_matrix(f1, f2).item() == pytest.approx(1.25)
    assert fsp_loss([fsp_matrix(f1, f2)], [fsp_matrix(ones, ones)]).item() == pytest.approx(0.0625)
    with pytest.raises(ValueError, match="two layer pairs"):
        LOSSES.get("fsp")(layers=[["a", "b"]])


def _huber(d):
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


def test_rkd_distance_three_points_by_hand():
    # student (0,0),(3,0),(0,4): distances 3, 4, 5, μ = 4 -> ψ = .75, 1, 1.25
    # teacher (0,0),(1,0),(0,1): distances 1, 1, √2, μ = (2 + √2)/3
    s = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    mu = (2 + math.sqrt(2)) / 3
    diffs = [0.75 - 1 / mu, 1.0 - 1 / mu, 1.25 - math.sqrt(2) / mu]
    expected = sum(_huber(d) for d in diffs) / 3  # each unordered pair appears twice among i≠j
    assert expected == pytest.approx(0.005222, abs=1e-5)
    assert rkd_distance_loss(s, t).item() == pytest.approx(expected, rel=1e-5)
    # scale invariance: ψ is divided by the mean distance
    assert rkd_distance_loss(10 * s, t).item() == pytest.approx(expected, rel=1e-5)


def test_rkd_angle_three_points_by_hand():
    # right triangle 3-4-5: cos at vertex (0,0) = 0, at (3,0) = 9/15 = .6, at (0,4) = 16/20 = .8
    # teacher isosceles right triangle: 0, cos 45° twice. Every vertex appears in 2 ordered triplets.
    s = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    c45 = math.sqrt(0.5)
    expected = (_huber(0.0) + _huber(0.6 - c45) + _huber(0.8 - c45)) / 3
    assert rkd_angle_loss(s, t).item() == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------- CRD

def test_crd_critic_two_samples_by_hand():
    # τ = 1, N = 1, M = 2 -> N/M = 0.5
    v = torch.tensor([[1.0, 0.0]])
    pos, neg = torch.tensor([[1.0, 0.0]]), torch.tensor([[[0.0, 1.0]]])
    e = math.e
    assert crd_critic(v, pos, 1.0, 1, 2).item() == pytest.approx(e / (e + 0.5), rel=1e-6)  # 0.844637
    assert crd_critic(v, neg[:, 0], 1.0, 1, 2).item() == pytest.approx(2 / 3, rel=1e-6)
    # NCE: −ln h(pos) − ln(1 − h(neg)) = 0.168849 + 1.098612
    assert crd_nce_loss(v, pos, neg, 1.0, 2).item() == pytest.approx(1.267461, abs=1e-5)


def _crd_rec(b=4, n=8):
    torch.manual_seed(0)
    fs = torch.randn(b, 6, 2, 2, requires_grad=True)
    ft = torch.randn(b, 10, 1, 1)
    return BatchRecord(x=fs, y=torch.zeros(b, dtype=torch.long), s_logits=torch.zeros(b, 3),
                       t_logits=torch.zeros(b, 3), s_feats={"s": fs}, t_feats={"t": ft},
                       index=torch.arange(b) % n)


def test_crd_bad_input():
    with pytest.raises(ValueError, match="layers"):
        CRD()
    with pytest.raises(ValueError, match="n_neg"):
        CRD(layers=[["s", "t"]], n_neg=8, n_data=8)
    with pytest.raises(ValueError, match="larger than the memory bank"):
        CRD(layers=[["s", "t"]], n_neg=4, n_data=8).setup(_crd_rec(b=10))
    with pytest.raises(ValueError, match="n_data"):
        CRD(layers=[["s", "t"]], n_neg=4).setup(_crd_rec())
    term = CRD(layers=[["s", "t"]], n_neg=4)
    rec = _crd_rec()
    rec.extra["n_data"] = 8  # the size can come from the record
    term.setup(rec)
    assert term.memory_s.shape == (8, 128)


def test_crd_negatives_exclude_positive_and_bank_update():
    term = CRD(layers=[["s", "t"]], n_neg=7, n_data=8, feat_dim=4)
    rec = _crd_rec()
    term.setup(rec)
    neg = term.negatives(rec.index)
    assert neg.shape == (4, 7)
    assert not (neg == rec.index.view(-1, 1)).any() and neg.max() < 8 and neg.min() >= 0
    before = term.memory_s.clone()
    term(rec).backward()
    assert not torch.equal(before[:4], term.memory_s[:4]) and torch.equal(before[4:], term.memory_s[4:])
    assert torch.allclose(term.memory_s.norm(dim=1), torch.ones(8), atol=1e-5)


# -------------------------------------------------------------------------------- gradient flow

CASES = {
    "dkd": {},
    "ls": {},
    "fitnets": {"layers": [["stage2", "stage3"]]},
    "at": {"layers": [["stage1", "stage1"], ["stage2", "stage2"]]},
    "nst": {"layers": [["stage2", "stage2"]]},
    "fsp": {"layers": [["stage1", "stage1"], ["stage2", "stage2"]]},
    "rkd": {},
    "crd": {"layers": [["stage3", "stage3"]], "n_neg": 16, "n_data": 64},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradient_flow(name):
    term, student, teacher, loss = distill_step(name, CASES[name])
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    for p in term.parameters():  # learnable heads are trained too
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert all(p.grad is None for p in teacher.parameters())
