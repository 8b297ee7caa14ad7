"""Adding a corruption is one function in one file: a toy corruption registered here is used by
`corrupt`, `parse_corruptions`, `CorruptedSet` and the robustness metrics (as an extra)."""

from __future__ import annotations

import pytest
import torch

from kdlab.data.corruptions import (
    CORRUPTION_REGISTRY,
    CORRUPTIONS,
    PARAMS,
    STANDARD_CORRUPTIONS,
    CorruptedSet,
    corrupt,
    corruption_names,
    parse_corruptions,
    register_corruption,
)
from kdlab.data.splits import TensorSet


@pytest.fixture
def invert():
    @register_corruption("toy_invert", severities=(0.1, 0.2, 0.3, 0.4, 0.5),
                         description="blend with the negative: (1 - c) x + c (1 - x)")
    def toy_invert(x, c, rngs, k):
        return (1 - c) * x + c * (1 - x)

    yield toy_invert
    CORRUPTION_REGISTRY.remove("toy_invert")


def test_registered_corruption_is_usable(invert):
    x = torch.full((2, 1, 4, 4), 0.2)
    # severity 3: c = 0.3 -> 0.7 * 0.2 + 0.3 * 0.8 = 0.38
    assert torch.allclose(corrupt(x, "toy_invert", 3), torch.full_like(x, 0.38))
    assert corrupt(x, "Toy-Invert", 5).dtype == x.dtype  # names are case / dash insensitive
    assert PARAMS["toy_invert"] == (0.1, 0.2, 0.3, 0.4, 0.5)
    assert parse_corruptions("extra")[-1] == "toy_invert"
    assert parse_corruptions("all") == list(CORRUPTIONS) + ["toy_invert"]
    assert parse_corruptions("standard") == list(STANDARD_CORRUPTIONS)
    assert corruption_names("extra")[-1] == "toy_invert"
    cs = CorruptedSet(TensorSet(x, torch.zeros(2, dtype=torch.long)), "toy_invert", 1)
    assert torch.allclose(cs.materialize().x, torch.full_like(x, 0.9 * 0.2 + 0.1 * 0.8))


def test_registered_corruption_counts_as_extra(invert):
    from kdlab.evaluate.robustness import robustness_metrics

    acc = {"A": {"fog": {1: 0.6}, "toy_invert": {1: 0.5}},
           "B": {"fog": {1: 0.8}, "toy_invert": {1: 0.1}}}
    b = robustness_metrics({"A": 0.9, "B": 0.9}, acc, "A")["B"]
    assert b["mCE"] == pytest.approx(0.2 / 0.4) and b["mCE_extra"] == pytest.approx(0.9 / 0.5)


def test_registration_errors_and_removal(invert):
    with pytest.raises(ValueError, match="registered twice"):
        register_corruption("fog", severities=(1, 2, 3, 4, 5))(lambda x, c, r, k: x)
    with pytest.raises(ValueError, match="5 severity"):
        register_corruption("toy_short", severities=(1, 2))
    with pytest.raises(ValueError, match="group"):
        register_corruption("toy_group", severities=(1, 2, 3, 4, 5), group="mine")
    with pytest.raises(ValueError, match="unknown corruption 'toy_nope'"):
        corrupt(torch.zeros(1, 1, 4, 4), "toy_nope", 1)


def test_builtin_suite_unchanged_after_removal():
    assert "toy_invert" not in CORRUPTION_REGISTRY
    assert corruption_names() == list(CORRUPTIONS) and len(CORRUPTIONS) == 19
