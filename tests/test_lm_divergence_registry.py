"""LM divergences are registered like loss terms: a new one is one decorated function, the LM
objective accepts it as a term, and ``kdlab losses`` lists it (issue 22)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlab.lm.losses import DIVERGENCE_REGISTRY, loss_catalogue, register_divergence
from kdlab.lm.models import GPT
from kdlab.lm.objective import LMObjective, LMTerm
from kdlab.train.objective import StepContext


@pytest.fixture
def hellinger():
    @register_divergence("toy_hellinger", "squared Hellinger distance 1 − Σ √(p q)·s", params={"s": (1.0, 0.0, 2.0)})
    def _h(logp_s, logp_t, s=1.0):
        return s * (1.0 - (0.5 * (logp_s + logp_t)).exp().sum(-1))

    yield _h
    DIVERGENCE_REGISTRY.unregister("toy_hellinger")


def test_a_registered_divergence_is_a_term_and_is_listed(hellinger):
    torch.manual_seed(0)
    teacher, student = GPT(12, d_model=16, n_layer=1, n_head=2, max_len=20), GPT(12, d_model=8, n_layer=1, n_head=2, max_len=20)
    ids = torch.randint(0, 12, (2, 7))
    mask = torch.ones(2, 6, dtype=torch.bool)
    obj = LMObjective(student, terms=[{"term": "toy_hellinger", "s": 2.0}], teacher=teacher)
    _, logs = obj.step({"ids": ids, "mask": mask, "epoch": 0, "step": 0}, StepContext(0, 0))
    with torch.no_grad():  # by hand, float64: 2·mean_t (1 − Σ_v √(p_v q_v))
        p = torch.softmax(teacher(ids[:, :-1])[0].double(), -1)
        q = torch.softmax(student(ids[:, :-1])[0].double(), -1)
    want = float((2.0 * (1 - (p * q).sqrt().sum(-1))).mean())
    assert abs(float(logs["toy_hellinger"]) - want) < 1e-5
    with pytest.raises(ValueError, match=r"s must be in \[0.0, 2.0\]"):
        LMTerm("toy_hellinger", 1.0, {"s": 3.0})
    with pytest.raises(ValueError, match="no parameter"):
        LMTerm("toy_hellinger", 1.0, {"beta": 0.5})
    assert "toy_hellinger" in loss_catalogue()


def test_kdlab_losses_lists_the_lm_divergences_and_names_rkl_truthfully():
    out = subprocess.run([sys.executable, "-m", "kdlab", "losses"], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}).stdout
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ")}
    assert {"fkl", "rkl", "skl", "srkl", "jsd", "tvd", "kd", "ce", "cos", "mse"} <= set(rows)
    assert "token-level reverse KL" in rows["rkl"] and "(MiniLLM)" not in out
