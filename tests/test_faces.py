"""Face verification: the terms' formulas on hand-made values, the metrics on hand-built scores,
the identity data set's protocol. Expected values are worked out by hand in the comments."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdlab.distill.losses import BatchRecord, LOSSES
from kdlab.distill.losses.faces import (adadistill_alpha, adadistill_update, margin_logits, cosine_matrix,
                                        qud_loss)
from kdlab.evaluate.verification import eer, kfold_accuracy, tar_at_far, verification_metrics


# --------------------------------------------------------------------------- AdaDistill
def test_adadistill_alpha_one_and_centre_unchanged_when_all_equal():
    v = F.normalize(torch.tensor([[0.3, -1.2, 0.5, 2.0]]), dim=1)
    w = v.clone()
    alpha = adadistill_update(w, v.clone(), v.clone(), torch.tensor([0]))
    assert alpha.item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(w, v, atol=1e-6)


def test_adadistill_update_by_hand():
    # e_s = [1, 0], e_t = [1, 1], w_y = [2, 0]: cos(e_s, e_t) = cos(w_y, e_t) = 1/sqrt2, alpha' = 1/2;
    # w_y <- 1/2 * [2, 0] + 1/2 * [1, 1]/sqrt2 = [1 + 0.35355, 0.35355]; the other centre stays
    w = torch.tensor([[5.0, 5.0], [2.0, 0.0]])
    alpha = adadistill_update(w, torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([1]))
    assert alpha.item() == pytest.approx(0.5, abs=1e-6)
    r = 0.5 / math.sqrt(2)
    assert torch.allclose(w[1], torch.tensor([1 + r, r]), atol=1e-6)
    assert torch.equal(w[0], torch.tensor([5.0, 5.0]))


def test_adadistill_alpha_clamped_below():
    # orthogonal centre and teacher embedding: cos = 0 -> alpha' = 1e-6 (the clamp), and a negative
    # product is clamped too
    a = adadistill_alpha(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]),
                         torch.tensor([[0.0, 1.0], [-1.0, 0.0]]))
    assert torch.allclose(a, torch.tensor([1e-6, 1e-6]))


# --------------------------------------------------------------------------- margin heads
def test_arcface_target_logit_is_s_cos_theta_plus_m():
    # e = [1, 0]; centre 0 at 60 degrees, centre 1 at 90 degrees; label 0
    theta = math.pi / 3
    e = torch.tensor([[1.0, 0.0]])
    w = torch.tensor([[math.cos(theta), math.sin(theta)], [0.0, 3.0]])
    z = margin_logits(cosine_matrix(e, w), torch.tensor([0]), s=64.0, m=0.5, kind="arc")
    assert z[0, 0].item() == pytest.approx(64 * math.cos(theta + 0.5), abs=1e-4)  # = -15.84...
    assert z[0, 1].item() == pytest.approx(0.0, abs=1e-4)  # s·cos(90°), no margin
    c = margin_logits(cosine_matrix(e, w), torch.tensor([0]), s=64.0, m=0.35, kind="cos")
    assert c[0, 0].item() == pytest.approx(64 * (0.5 - 0.35), abs=1e-4)


def test_arcface_term_loss_is_ce_of_margin_logits():
    term = LOSSES.get("arcface")(s=2.0, m=0.2)
    e = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    rec = BatchRecord(x=torch.zeros(2, 1, 2, 2), y=torch.tensor([0, 1]), s_logits=e,
                      extra={"train_labels": torch.tensor([0, 1, 1])})
    term.setup(rec)
    with torch.no_grad():
        term.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # row 0: target cos 1 -> 2·cos(0.2) = 1.9601, other 0; row 1 likewise
    t = 2 * math.cos(0.2)
    expected = -math.log(math.exp(t) / (math.exp(t) + 1.0))
    assert term(rec).item() == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- QUD
def test_qud_q_equals_k_queue_orthogonal():
    # q = k = e_1: positive logit 1/tau; K queue entries orthogonal to q: negatives 0
    # CE = -log(e^(1/tau) / (e^(1/tau) + K)) = log(1 + K e^(-1/tau))
    K, tau, d = 1024, 0.1, 8
    q = torch.zeros(1, d)
    q[0, 0] = 1.0
    queue = F.normalize(torch.randn(K, d - 1), dim=1)
    queue = torch.cat([torch.zeros(K, 1), queue], 1)
    expected = math.log(1 + K * math.exp(-1 / tau))  # 0.045444...
    assert qud_loss(q.double(), q.double(), queue.double(), tau).item() == pytest.approx(expected, rel=1e-9)
    term = LOSSES.get("qud")(queue_size=K, tau=tau)
    rec = BatchRecord(x=torch.zeros(1, 1, 2, 2), y=torch.tensor([-1]), s_logits=q * 3, t_logits=q * 0.5)
    term.setup(rec)
    term.queue.copy_(queue)
    assert term(rec).item() == pytest.approx(expected, rel=1e-4)  # float32


def test_qud_queue_is_fifo():
    term = LOSSES.get("qud")(queue_size=4, tau=0.1)
    rec = BatchRecord(x=torch.zeros(3, 1, 2, 2), y=torch.full((3,), -1), s_logits=torch.eye(3, 2),
                      t_logits=torch.eye(3, 2))
    term.setup(rec)
    term.train()
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    term.enqueue(keys)
    term.enqueue(torch.tensor([[0.0, -1.0], [0.6, 0.8]]))
    # slots 0,1,2 <- keys, slot 3 <- [0,-1], then slot 0 (the oldest) <- [0.6, 0.8]
    assert torch.allclose(term.queue, torch.tensor([[0.6, 0.8], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    assert int(term.ptr) == 1


# --------------------------------------------------------------------------- embedding KD
def test_embed_kd_values_and_size_mismatch():
    kd = LOSSES.get("embed_kd")(kind="cosine")
    s = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    t = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    rec = BatchRecord(x=torch.zeros(2, 1, 2, 2), y=torch.tensor([0, 1]), s_logits=s, t_logits=t)
    kd.setup(rec)
    # 1 - cos: row 0 1 - 1/sqrt2, row 1 0
    assert kd(rec).item() == pytest.approx((1 - 1 / math.sqrt(2)) / 2, rel=1e-6)
    mse = LOSSES.get("embed_kd")(kind="mse")
    # ||s^ - t^||^2 = 2 - 2cos: row 0 2 - sqrt2, row 1 0
    assert mse(rec).item() == pytest.approx((2 - math.sqrt(2)) / 2, rel=1e-6)
    bad = BatchRecord(x=torch.zeros(2, 1, 2, 2), y=torch.tensor([0, 1]), s_logits=torch.zeros(2, 64),
                      t_logits=torch.zeros(2, 128))
    with pytest.raises(ValueError, match=r"student's embeddings have 64 dimensions and the teacher's 128; set "
                                         r"student.kwargs.embedding_size: 128 or give the term proj: true"):
        LOSSES.get("embed_kd")().setup(bad)
    with pytest.raises(ValueError, match="embedding_size: 128"):
        LOSSES.get("adadistill")().setup(bad)
    p = LOSSES.get("embed_kd")(proj=True)
    p.setup(bad)
    assert p.projection.weight.shape == (128, 64)


# --------------------------------------------------------------------------- metrics
GEN = [0.9, 0.8, 0.7, 0.3]
IMP = [0.6, 0.4, 0.2, 0.1]


def test_eer_and_tar_on_hand_built_scores():
    s = np.array(GEN + IMP)
    y = np.array([1] * 4 + [0] * 4)
    # accept at >= 0.7: TAR 3/4, FAR 0; at >= 0.6: TAR 3/4, FAR 1/4 -> FRR = FAR = 1/4 there
    assert eer(s, y) == pytest.approx(0.25)
    assert tar_at_far(s, y, 1e-3) == pytest.approx(0.75)
    assert tar_at_far(s, y, 0.5) == pytest.approx(1.0)  # >= 0.3: TAR 1, FAR 2/4
    # an interpolated crossing: genuine [0.9, 0.5], impostor [0.7, 0.1]: ROC points (FAR, FRR):
    # (0, .5) at 0.9, (.5, .5) at 0.7, (.5, 0) at 0.5 -> FRR = FAR = 0.5
    assert eer(np.array([0.9, 0.5, 0.7, 0.1]), np.array([1, 1, 0, 0])) == pytest.approx(0.5)
    # genuine [.9, .8, .2], impostor [.5, .1]:
    s2 = np.array([0.9, 0.8, 0.2, 0.5, 0.1])
    y2 = np.array([1, 1, 1, 0, 0])
    # thresholds: .9 -> (0, 2/3); .8 -> (0, 1/3); .5 -> (1/2, 1/3); .2 -> (1/2, 0)
    # FRR - FAR: 1/3 at (0, 1/3), -1/6 at (1/2, 1/3): crossing t = (1/3)/(1/2) = 2/3 -> FAR = 1/3
    assert eer(s2, y2) == pytest.approx(1 / 3)


def test_kfold_accuracy_uses_the_other_folds_threshold():
    # two folds. fold 0: genuine .9, impostor .5; fold 1: genuine .6, impostor .55.
    # threshold from fold 1 (best accuracy there) is .6 -> on fold 0 both pairs right: 1.0
    # threshold from fold 0 is .9 -> on fold 1 genuine .6 rejected, impostor rejected: 0.5
    s = np.array([0.9, 0.5, 0.6, 0.55])
    y = np.array([1, 0, 1, 0])
    f = np.array([0, 0, 1, 1])
    mean, sd = kfold_accuracy(s, y, f)
    assert mean == pytest.approx(0.75)
    assert sd == pytest.approx(0.25)
    m = verification_metrics(s, y, f)
    assert set(m) >= {"acc", "eer", "tar@far1e-3", "tar@far1e-4"}


# --------------------------------------------------------------------------- the identity data set
def test_mnist_identities_protocol():
    from kdlab.data import load_dataset

    a = load_dataset("mnist-identities", val_fraction=0.1, seed=0)
    b = load_dataset("mnist-identities", val_fraction=0.1, seed=1)
    assert a.info.num_classes == 3600 and len(a.train) == 3600 * 4 and len(a.test) == 1000 * 4
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.test.pairs, b.test.pairs)
    p = a.test.pairs
    assert p.shape == (6000, 4) and int(p[:, 2].sum()) == 3000
    assert sorted(torch.bincount(p[:, 3]).tolist()) == [600] * 10
    y = a.test.y
    assert bool((y[p[:, 0]] == y[p[:, 1]]).eq(p[:, 2].bool()).all())  # genuine iff same identity
    # identities disjoint between folds
    ids_by_fold = [set(y[p[p[:, 3] == k][:, :2].flatten()].tolist()) for k in range(10)]
    assert all(not (ids_by_fold[i] & ids_by_fold[j]) for i in range(10) for j in range(i + 1, 10))
    # half of the impostors pair identities of the same digit (test images are mnist5k's test split)
    from kdlab.data.identities import mnist_identity_bases

    digit = mnist_identity_bases()[3].repeat_interleave(4)
    imp = p[p[:, 2] == 0]
    assert (digit[imp[:, 0]] == digit[imp[:, 1]]).float().mean().item() == pytest.approx(0.5)
    # the variants differ from each other and from the base image
    assert not torch.equal(a.test.x[0], a.test.x[1])


@pytest.mark.parametrize("name", ["iresnet_small", "mobilefacenet_small"])
def test_embedding_models_return_embeddings(name):
    from kdlab.models import create_model

    m = create_model(name, num_classes=7, in_channels=1, embedding_size=24).eval()
    m3 = create_model(name, num_classes=7, in_channels=3, width=0.5).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 1, 28, 28)).shape == (2, 24)  # num_classes does not shape the output
        assert m(torch.randn(2, 1, 16, 16)).shape == (2, 24)  # any input size (GDC on a pooled 4x4 grid)
        assert m3(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    assert len(m.stage_names) == 3 and m.feature_dim == 24


def test_evaluate_a_label_fraction_checkpoint_scores_its_test_pairs(tmp_path, capsys):
    """`kdlab evaluate` of a faces model trained on 25% of the identities: the run's recipe sets the
    class count (900, not the data set's 3,600), and the model is scored on the verification pairs
    (the embeddings' cosine, 10-fold accuracy), not by class accuracy."""
    import json

    from kdlab.cli.main import main
    from kdlab.core.checkpoint import model_checkpoint
    from kdlab.data import load_dataset
    from kdlab.data.streaming import as_loader
    from kdlab.evaluate.verification import embed
    from kdlab.models import create_model

    s = load_dataset("mnist-identities", val_fraction=0.1, label_fraction=0.25, seed=1)
    assert s.info.num_classes == 900
    torch.manual_seed(0)
    kw = {"width": 0.25, "embedding_size": 16}
    m = create_model("mobilefacenet_small", num_classes=900, in_channels=1, **kw).eval()
    ck = model_checkpoint(m, model_name="mobilefacenet_small", model_kwargs=kw, num_classes=900, in_channels=1,
                          dataset="mnist-identities", classes=list(s.info.classes), seed=1,
                          recipe={"data": {"name": "mnist-identities", "val_fraction": 0.1, "label_fraction": 0.25}})
    torch.save(ck, tmp_path / "best.pt")
    assert main(["evaluate", str(tmp_path / "best.pt")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # by hand: cosine of each test pair's normalised embeddings; accuracy at the threshold chosen on
    # the other nine folds, averaged over the folds
    emb = embed(m, as_loader(s.test, 500, shuffle=False, seed=0, mean=s.info.mean, std=s.info.std))
    p = s.test.pairs
    cos = (emb[p[:, 0]] * emb[p[:, 1]]).sum(1).numpy()
    same, fold = p[:, 2].numpy().astype(bool), p[:, 3].numpy()
    accs = []
    for k in range(10):
        tr, te = fold != k, fold == k
        cands = np.unique(cos[tr])[::-1]  # ties: the highest threshold
        best = max(cands, key=lambda t: ((cos[tr] >= t) == same[tr]).mean())
        accs.append(((cos[te] >= best) == same[te]).mean())
    assert out["n"] == 6000 and out["acc"] == pytest.approx(float(np.mean(accs)), abs=1e-9)


def test_margin_heads_defaults_and_a_text_margin_is_refused():
    """The three margin heads share one constructor: the papers' margins by default (ArcFace 0.5,
    CosFace 0.35, AdaDistill's 0.45), the recipe's ``m`` when given, one line for a text margin."""
    from kdlab.core.config import RecipeError
    from kdlab.train.recipe import load_recipe

    assert [LOSSES.get(n)().m for n in ("arcface", "cosface", "adadistill")] == [0.5, 0.35, 0.45]
    assert [LOSSES.get(n)().kind for n in ("arcface", "cosface", "adadistill")] == ["arc", "cos", "arc"]
    assert LOSSES.get("cosface")(s=30.0, m=0.2).m == 0.2 and LOSSES.get("cosface")(s=30.0).s == 30.0
    with pytest.raises(RecipeError, match=r"loss\[0\].*m needs a number"):
        load_recipe("faces/baseline", ["loss.0.m=wide"])
