"""The study's loss terms against values worked out by hand."""

import math

import pytest
import torch

from kdlab.distill.losses import BatchRecord, LOSSES
from kdlab.distill.losses.attention import (attention_pair, masked_alignment_infonce, masked_alignment_mse,
                                    masked_attention_mse, resize_map, spatial_attention)
from kdlab.distill.losses.response import kd_loss


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_kd_loss_T1_by_hand():
    # teacher logits [ln 3, 0] -> p_t = [3/4, 1/4]; student [0, 0] -> uniform
    t = torch.tensor([[math.log(3.0), 0.0]])
    s = torch.zeros(1, 2)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # = 0.1308...
    assert kd_loss(s, t, T=1.0).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.130812, abs=1e-6)


def test_kd_loss_T2_includes_T_squared():
    # at T = 2 the teacher is softmax([ln3/2, 0]) = [sqrt3, 1] / (sqrt3 + 1)
    r3 = math.sqrt(3.0)
    p_t = [r3 / (r3 + 1), 1 / (r3 + 1)]
    expected = 4.0 * _kl(p_t, [0.5, 0.5])
    t = torch.tensor([[math.log(3.0), 0.0]])
    got = kd_loss(torch.zeros(1, 2), t, T=2.0).item()
    assert got == pytest.approx(expected, rel=1e-6)
    assert got == pytest.approx(0.14539, abs=1e-4)


def test_kd_loss_zero_when_equal_and_batch_mean():
    t = torch.tensor([[1.0, 2.0, 3.0], [math.log(3.0), 0.0, 0.0]])
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    # row 0 contributes 0; row 1: p_t = [3/5, 1/5, 1/5] vs uniform
    row1 = _kl([0.6, 0.2, 0.2], [1 / 3] * 3)
    assert kd_loss(s, t, T=1.0).item() == pytest.approx(row1 / 2, rel=1e-5)  # float32


def test_spatial_attention_and_normalisation():
    f = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[1.0, 0.0], [0.0, 0.0]]]])  # 2 channels
    a = spatial_attention(f, p=2)
    assert a.tolist() == [[[2.0, 4.0], [9.0, 16.0]]]
    a_s, a_t, m = attention_pair(f, f, p=2)
    norm = math.sqrt(4 + 16 + 81 + 256)
    assert a_s[0].tolist() == pytest.approx([2 / norm, 4 / norm, 9 / norm, 16 / norm])
    assert m is None


def test_resize_to_smaller_by_area():
    big = torch.arange(16.0).view(1, 4, 4)
    small = resize_map(big, (2, 2))
    # top-left 2x2 block: 0,1,4,5 -> mean 2.5 ; top-right: 2,3,6,7 -> 4.5; etc.
    assert small[0].tolist() == [[2.5, 4.5], [10.5, 12.5]]
    # a student 4x4 map vs a teacher 2x2 map: both vectors have length 4
    fs = torch.ones(1, 1, 4, 4)
    ft = torch.ones(1, 3, 2, 2)
    a_s, a_t, m = attention_pair(fs, ft, mask=torch.ones(1, 2, 2))
    assert a_s.shape == a_t.shape == m.shape == (1, 4)
    assert a_s[0].tolist() == pytest.approx([0.5] * 4)


def test_masked_transfer_binary_mask_by_hand():
    a_s = torch.tensor([[0.6, 0.8, 0.0, 0.0]])
    a_t = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    # only positions 0 and 2 count: (0.6)^2 + 0 over 4 positions
    assert masked_attention_mse(a_s, a_t, m).item() == pytest.approx(0.36 / 4)
    # binary mask: the literal alignment MSE form is the same number
    assert masked_alignment_mse(a_s, a_t, m).item() == pytest.approx(0.36 / 4)


def test_soft_mask_forms_differ_as_specified():
    a_s = torch.tensor([[1.0, 0.0]])
    a_t = torch.tensor([[0.0, 1.0]])
    m = torch.tensor([[0.5, 0.5]])
    # transfer: mean((M d)^2) = (0.25 + 0.25)/2 ; alignment mse: mean(M d^2) = (0.5 + 0.5)/2
    assert masked_attention_mse(a_s, a_t, m).item() == pytest.approx(0.25)
    assert masked_alignment_mse(a_s, a_t, m).item() == pytest.approx(0.5)


def test_infonce_positive_and_negatives_by_hand():
    tau = 0.1
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    m = torch.ones(2, 2)
    # matched: logits [[10, 0], [0, 10]] -> loss = log(1 + e^-10)
    assert masked_alignment_infonce(z, z, m, tau).item() == pytest.approx(math.log(1 + math.exp(-10)), abs=1e-6)
    # swapped teacher maps: the positive now has similarity 0, the negative 1/tau
    swapped = z.flip(0)
    assert masked_alignment_infonce(z, swapped, m, tau).item() == pytest.approx(math.log(1 + math.exp(10)), rel=1e-5)
    # three images, student 0 equally similar to teachers 0 and 1 (cos 1/sqrt2), orthogonal to 2
    zs = torch.tensor([[1.0, 1.0, 0.0]]) / math.sqrt(2)
    zt = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    s = 1 / math.sqrt(2) / tau
    expected = -math.log(math.exp(s) / (2 * math.exp(s) + 1))
    logits_row = masked_alignment_infonce(torch.cat([zs, zt[1:]]), zt, torch.ones(3, 3), tau)
    # rows 1, 2 are perfectly matched with one cos-0 negative pair each... compute them too
    r1 = -math.log(math.exp(10) / (math.exp(10) + math.exp(0) + math.exp(0)))
    assert logits_row.item() == pytest.approx((expected + 2 * r1) / 3, rel=1e-5)


def test_infonce_masks_each_side_with_its_own_image_mask():
    # student 0's map lies entirely outside its mask except position 0
    a_s = torch.tensor([[1.0, 5.0], [0.0, 1.0]])
    a_t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    m = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # masked and normalised: z_s0 = [1,0], z_s1 = [0,1]; z_t0 = [1,0], z_t1 = [0,1] -> perfect match
    assert masked_alignment_infonce(a_s, a_t, m, 0.1).item() == pytest.approx(math.log(1 + math.exp(-10)), abs=1e-6)


def _rec(fs, ft, mask, y=None):
    b = fs.shape[0]
    return BatchRecord(x=torch.zeros(b, 1), y=y if y is not None else torch.zeros(b, dtype=torch.long),
                       s_logits=torch.zeros(b, 2), t_logits=torch.zeros(b, 2),
                       s_feats={"s": fs}, t_feats={"t": ft}, masks={"t": mask})


def test_attn_term_reads_record_and_resizes_mask():
    fs = torch.zeros(1, 1, 4, 4)
    fs[0, 0, 0, 0] = 2.0  # attention energy only in the top-left 2x2 block after resizing
    ft = torch.ones(1, 1, 2, 2)
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    term = LOSSES.get("attn")(layers=[["s", "t"]])
    # student 4x4 map: 4 at (0,0) -> area-resized 2x2: [1,0,0,0] -> normalised [1,0,0,0]
    # teacher: [1,1,1,1]/2 ; masked difference only at position 0: (1 - 0.5)^2 / 4
    assert term(_rec(fs, ft, mask)).item() == pytest.approx(0.25 / 4)


def test_align_term_mse_form_and_validation():
    fs = torch.ones(2, 1, 2, 2)
    ft = torch.ones(2, 1, 2, 2)
    term = LOSSES.get("align")(layers="x", form="mse")
    assert term.student_layers() == ["x"] and term.teacher_layers() == ["x"]
    with pytest.raises(ValueError, match="form"):
        LOSSES.get("align")(layers="x", form="cosine")
    with pytest.raises(ValueError, match="layers"):
        LOSSES.get("attn")()
    with pytest.raises(ValueError, match="temperature"):
        LOSSES.get("kd")(T=0)
    t2 = LOSSES.get("align")(layers=[["s", "t"]], form="mse")
    assert t2(_rec(fs, ft, torch.ones(2, 2, 2))).item() == pytest.approx(0.0)
