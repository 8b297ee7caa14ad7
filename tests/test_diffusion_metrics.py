"""The generative scores against closed forms and hand-worked cases: the Fréchet distance between
Gaussians, k-NN precision / recall (Kynkäänniemi et al. 2019) and the class-coverage entropy."""

import math

import numpy as np
import pytest

from kdlab.evaluate.generative import (fd_of_features, frechet_distance, knn_precision_recall, label_entropy)


def _psd_sqrt(m):
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_fd_one_dimension_closed_form():
    # N(1, 2²) vs N(4, 3²): (1 − 4)² + (2 − 3)² = 10
    assert frechet_distance([1.0], [[4.0]], [4.0], [[9.0]]) == pytest.approx(10.0, abs=1e-9)


def test_fd_general_gaussians_closed_form():
    # ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁^{½} Σ₂ Σ₁^{½})^{½}), the root taken here by eigendecomposition
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    s1, s2 = a @ a.T + 0.1 * np.eye(4), b @ b.T + 0.1 * np.eye(4)  # non-commuting covariances
    m1, m2 = rng.normal(size=4), rng.normal(size=4)
    r1 = _psd_sqrt(s1)
    expected = float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * _psd_sqrt(r1 @ s2 @ r1)))
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-8)


def test_fd_of_samples_approaches_the_closed_form():
    rng = np.random.default_rng(1)
    x = rng.normal([0.0, 1.0], [1.0, 2.0], size=(200_000, 2))
    y = rng.normal([1.0, 1.0], [1.0, 1.0], size=(200_000, 2))
    # diagonal covariances: ‖μ₁ − μ₂‖² + Σ (s₁ − s₂)² = 1 + 1 = 2
    assert fd_of_features(x, y) == pytest.approx(2.0, abs=0.03)


def test_fd_refuses_different_dimensions():
    with pytest.raises(ValueError, match="differ in dimension"):
        frechet_distance([0.0, 0.0], np.eye(2), [0.0], [[1.0]])


def test_knn_precision_recall_by_hand():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0]])
    # k = 1: every real point's radius is 1; 0.5 lies within 1 of 0 (inside), 10 is not -> precision ½.
    # the fakes' radii are 9.5 (each other's distance); every real point is within 9.5 of 0.5 -> recall 1
    p, r = knn_precision_recall(real, fake, k=1)
    assert (p, r) == (0.5, 1.0)
    # fakes tightly clustered far away: none inside the real manifold; real points outside their small balls
    far = np.array([[20.0], [20.1], [20.2]])
    assert knn_precision_recall(real, far, k=1) == (0.0, 0.0)


def test_class_coverage_entropy():
    assert label_entropy([0, 0, 1, 1], 10) == pytest.approx(1.0)
    assert label_entropy(list(range(10)) * 3, 10) == pytest.approx(math.log2(10))
    assert label_entropy([7] * 5, 10) == pytest.approx(0.0)
