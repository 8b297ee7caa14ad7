"""Masks reused across augmentations (kdlab.distill.mask_reuse) and the MaskStore."""

import pytest
import torch
from torch import nn

from kdlab.data.augment import AugmentParams, AugmentSpec, apply_params
from kdlab.data.loader import BatchLoader
from kdlab.data.splits import TensorSet
from kdlab.distill.mask_reuse import (EpochViews, PerImageMasks, map_masks, mask_agreement,
                                      shift_axis, view_params)
from kdlab.distill.mask_store import MaskStore, image_keys, weight_hash
from kdlab.distill.masks import causal_masks, importance_maps, to_mask
from kdlab.core.config import MaskCfg


class PointNet(nn.Module):
    """1x1 convs and a global sum: every position's attribution depends on that position's pixel
    only, so the mask of a flipped image is the flipped mask."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.feat = nn.Conv2d(1, 4, 1)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return torch.tanh(self.head(torch.relu(self.feat(x)))).sum(dim=(2, 3))


def _tset(n=10, size=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorSet(torch.rand(n, 1, size, size, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_view_params_recover_the_loaders_draws():
    ts = _tset()
    spec = AugmentSpec(crop_pad=2, flip=True)
    loader = BatchLoader(ts, 4, seed=5, augment=spec, mean=[0.5], std=[0.25])
    views = EpochViews(loader)
    for e in (0, 3):
        perm, params = loader.epoch_plan(e)
        for x, _, idx in loader.epoch(e):
            ref = (apply_params(ts.x[idx], spec, views(e, idx)) - 0.5) / 0.25
            assert torch.allclose(x, ref)
            p = view_params(perm, params, idx)
            assert torch.equal(p.dy, views(e, idx).dy) and torch.equal(p.flip, views(e, idx).flip)


def test_reused_mask_of_a_view_is_the_cropped_flipped_mask():
    g = torch.Generator().manual_seed(0)
    m = (torch.rand(5, 4, 4, generator=g) > 0.5).float()  # masks at a stride-2 layer of 8x8 images
    spec = AugmentSpec(crop_pad=2, flip=True)
    dy, dx = torch.tensor([0, 2, 4, 4, 2]), torch.tensor([4, 2, 0, 2, 0])
    flip = torch.tensor([True, False, True, False, True])
    got = map_masks(m, spec, AugmentParams(dy, dx, flip), (8, 8))
    # the same crop and flip at the layer's resolution: pad 2/2 = 1 cell, offsets halved
    ref = apply_params(m[:, None], AugmentSpec(crop_pad=1, flip=True), AugmentParams(dy // 2, dx // 2, flip))[:, 0]
    assert torch.equal(got, ref)
    assert set(got.unique().tolist()) <= {0.0, 1.0}
    # at the input resolution the map is the augmentation itself
    m8 = torch.rand(5, 8, 8, generator=g)
    assert torch.equal(map_masks(m8, spec, AugmentParams(dy, dx, flip), (8, 8)),
                       apply_params(m8[:, None], spec, AugmentParams(dy, dx, flip))[:, 0])


def test_half_cell_shift_by_hand():
    m = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    # view[i, j] = x[i, j + 1] at the input (dx - p = 1) = half a cell at a stride-2 layer
    out = map_masks(m, AugmentSpec(crop_pad=1), AugmentParams(torch.tensor([1]), torch.tensor([2])), (6, 6))
    assert out[0].tolist() == [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert shift_axis(m, torch.tensor([-1.0]), 2)[0, 0].tolist() == [0.0, 0.0, 1.0]


def test_mask_agreement_by_hand():
    a = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    b = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    assert mask_agreement(a, b)["iou"] == pytest.approx(1 / 3)
    s = torch.tensor([[[0.1, 0.2], [0.3, 0.4]]])
    assert mask_agreement(s, s.flip(-1).flip(-2))["spearman"] == pytest.approx(-1.0)
    assert mask_agreement(s, s ** 2)["spearman"] == pytest.approx(1.0)


def test_store_computes_once_and_refuses_another_teacher(tmp_path):
    t = PointNet(0).eval()
    cfg = MaskCfg(method="ig", steps=4, q=0.5)
    ts = _tset(6)
    keys = image_keys(ts.x)
    assert len(set(keys)) == 6 and image_keys(ts.x[:2]) == keys[:2]
    store = MaskStore(t, cfg, root=tmp_path)
    m1 = store.maps(t, ts.x[:4], ts.y[:4], keys[:4], ["feat"])["feat"]
    ref = importance_maps(t, ts.x, ts.y, ["feat"], cfg)["feat"]
    close = lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-7)  # noqa: E731  (batch-size float sums)
    assert close(m1, ref[:4])
    assert torch.equal(to_mask(m1, 0.5), causal_masks(t, ts.x[:4], ts.y[:4], ["feat"], cfg)["feat"])
    m2 = store.maps(t, ts.x[[5, 2, 0]], ts.y[[5, 2, 0]], [keys[i] for i in (5, 2, 0)], ["feat"])["feat"]
    assert close(m2, ref[[5, 2, 0]])
    assert store.computed == 5 and store.served == 2
    store.save()
    again = MaskStore(t, cfg, root=tmp_path)  # loads the file: nothing to compute
    assert close(again.maps(t, ts.x[:3], ts.y[:3], keys[:3], ["feat"])["feat"], ref[:3])
    assert again.computed == 0
    # q and kind are applied after the store: one store serves them all; other steps: another store
    assert MaskStore(t, MaskCfg(method="ig", steps=4, q=0.1, kind="soft")).key == store.key
    assert MaskStore(t, MaskCfg(method="ig", steps=8, q=0.5)).key != store.key
    other = PointNet(1).eval()
    assert weight_hash(other) != weight_hash(t)
    with pytest.raises(ValueError, match=r"holds maps of teacher \w+, not of teacher \w+"):
        store.maps(other, ts.x[:2], ts.y[:2], keys[:2], ["feat"])


@pytest.mark.parametrize("kind", ["binary", "soft"])
def test_per_image_masks_equal_per_view_masks_for_a_flip_equivariant_teacher(kind):
    t = PointNet(0).eval()
    cfg = MaskCfg(method="ig", steps=4, q=0.25, kind=kind)
    ts = _tset(9)
    spec = AugmentSpec(flip=True)
    loader = BatchLoader(ts, 4, seed=1, augment=spec, mean=[0.5], std=[0.25])
    store = MaskStore(t, cfg)
    per_image = PerImageMasks(t, ["feat"], loader, store, cfg)
    flipped = 0
    for e in (0, 1):
        for x, y, idx in loader.epoch(e):
            exact = causal_masks(t, x, y, ["feat"], cfg)["feat"]
            assert torch.allclose(per_image(x, y, idx, e)["feat"], exact, atol=1e-6)
            flipped += int(EpochViews(loader)(e, idx).flip.sum())
    assert flipped > 0 and store.computed == 9  # each image once, over two epochs


def test_per_image_binary_mask_of_a_cropped_view_keeps_q():
    t = PointNet(0).eval()
    cfg = MaskCfg(method="grad", q=0.25)
    ts = _tset(8)
    loader = BatchLoader(ts, 8, seed=2, augment=AugmentSpec(crop_pad=2), mean=None, std=None)
    per_image = PerImageMasks(t, ["feat"], loader, MaskStore(t, cfg), cfg)
    x, y, idx = next(iter(loader.epoch(0)))
    m = per_image(x, y, idx, 0)["feat"]
    assert m.sum(dim=(1, 2)).tolist() == [9.0] * 8  # round(0.25 * 36) cells of each view
    # the kept cells are the top-q cells of the cropped map of the un-augmented image
    imp = importance_maps(t, ts.x[idx], y, ["feat"], cfg)["feat"]
    views = EpochViews(loader)(0, idx)
    cropped = apply_params(imp[:, None], AugmentSpec(crop_pad=2), views)[:, 0]
    assert torch.equal(m, to_mask(cropped, 0.25))


def test_per_image_source_in_a_built_run(tmp_path):
    """build_run honours mask.reuse (build_teacher_source is the one teacher constructor): a run
    with mask.reuse: per-image serves the mapped masks of the store, with the cache's logits."""
    import kdlab.train.build as build
    from kdlab.train.recipe import recipe_from_dict
    from kdlab.distill.mask_reuse import PerImageSource
    from kdlab.distill.teachers import TeacherStore
    from kdlab.models import create_model

    teacher = create_model("cnn_small", num_classes=10, in_channels=1).eval()
    mask = {"method": "ig", "steps": 2, "q": 0.5, "reuse": "per-image"}
    r = recipe_from_dict({
        "name": "t", "data": {"name": "digits", "label_fraction": 0.05, "augment": {"crop_pad": 1, "flip": True}},
        "student": {"model": "cnn_tiny"}, "teacher": {"model": "cnn_small"},
        "train": {"epochs": 1, "batch_size": 16, "seed": 0},
        "loss": [{"term": "kd"}, {"term": "attn", "layers": "stage2"}], "mask": mask})
    run = build.build_run(r, teacher=teacher, store=TeacherStore(tmp_path / "cache"))
    src = run.objective.teacher
    assert isinstance(src, PerImageSource)
    x, y, idx = next(iter(run.train_loader.epoch(0)))
    out = src(x, y, idx, 0, 0)
    with torch.no_grad():
        assert torch.allclose(out.logits, teacher(x), atol=1e-2)  # fp16-rounded cache values
    loader = run.train_loader
    plain = (loader.x[idx] - loader.mean) / loader.std
    imp = importance_maps(teacher, plain, y, ["stage2"], MaskCfg(**mask))["stage2"]
    want = to_mask(map_masks(imp, loader.augment, EpochViews(loader)(0, idx), (8, 8)), 0.5)
    assert torch.allclose(out.masks["stage2"], want, atol=1e-6)
    store = src.per_image.store
    assert store.computed >= len(idx) and store.path.parent == tmp_path / "cache"
    assert store.save().is_file()


def test_flip_of_a_grid_centred_on_even_pixels_by_hand():
    # stride 2 (8 px -> 4 cells); with c = 0 cell 1 is centred on pixel 2, which a flip sends to
    # pixel 7 - 2 = 5, i.e. cell 2.5: half in cell 2, half in cell 3
    m = torch.tensor([[[0.0, 1.0, 0.0, 0.0]]])
    spec, p = AugmentSpec(flip=True), AugmentParams(flip=torch.tensor([True]))
    assert map_masks(m, spec, p, (2, 8), center=0.0)[0, 0].tolist() == [0.0, 0.0, 0.5, 0.5]
    # the flip-symmetric grid (default, c = 1/2): cell 1 <-> cell 2
    assert map_masks(m, spec, p, (2, 8))[0, 0].tolist() == [0.0, 0.0, 1.0, 0.0]
