"""Figures: files (PNG + PDF), fixed colour scale, labels and titles, read off the figures."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

import kdlab.report.figures as figs  # noqa: E402


@pytest.fixture
def captured(monkeypatch):
    """Record every figure handed to save_figure (then save it as usual)."""
    seen = []
    real = figs.save_figure

    def spy(fig, path, dpi=150):
        seen.append({"fig": fig, "axes": list(fig.axes),
                     "suptitle": fig._suptitle.get_text() if fig._suptitle else "",
                     "titles": [a.get_title() for a in fig.axes],
                     "xlabels": [a.get_xlabel() for a in fig.axes],
                     "ylabels": [a.get_ylabel() for a in fig.axes],
                     "texts": [t.get_text() for a in fig.axes for t in a.texts],
                     "images": [(im.norm.vmin, im.norm.vmax) for a in fig.axes for im in a.images]})
        return real(fig, path, dpi)

    monkeypatch.setattr(figs, "save_figure", spy)
    return seen


def _ok(png):
    return png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.with_suffix(".pdf").read_bytes()[:4] == b"%PDF"


def test_robustness_heatmap_fixed_scale_and_spread(tmp_path, captured):
    per_seed = {0: {"a": {"noise": 0.50, "blur": 0.80}, "b": {"noise": 0.60, "blur": 0.90}},
                1: {"a": {"noise": 0.70, "blur": 0.80}, "b": {"noise": 0.60, "blur": 0.70}}}
    clean = {0: {"a": 0.9, "b": 0.95}, 1: {"a": 0.92, "b": 0.93}}
    png = figs.robustness_heatmap(per_seed, tmp_path / "heat.png", clean=clean)
    assert _ok(png)
    cap = captured[-1]
    # colours on the data's range, rounded out to whole %: cells 60.0 (a/noise) .. 94.0 (clean b)
    assert cap["images"][0] == (60.0, 94.0)
    # cell a/noise: mean 60.0, sd of (50, 70) = 14.1
    assert "60.0\n±14.1" in cap["texts"]
    # mCA row of b: seed means 75 and 65 -> mean 70.0, sd 7.1
    assert "70.0\n±7.1" in cap["texts"]
    assert "colour range 60–94" in " ".join(cap["ylabels"])


def test_study_robustness_heatmap_reads_seeds(tmp_path):
    study = tmp_path / "s"
    for s in (0, 1):
        d = study / "report" / "robustness" / f"seed{s}"
        d.mkdir(parents=True)
        d.joinpath("robustness.json").write_text(json.dumps({"severities": [1, 2], "models": {
            m: {"acc_by_corruption": {"noise": 0.5 + 0.1 * s, "blur": 0.7}, "clean_acc": 0.9}
            for m in ("baseline", "kd")}}))
    assert _ok(figs.study_robustness_heatmap(study))
    with pytest.raises(FileNotFoundError):
        figs.study_robustness_heatmap(tmp_path / "none")


def test_study_robustness_heatmap_of_a_detection_study_shows_map(tmp_path, captured):
    """A detection study's robustness results hold COCO mAP per corruption (``map_by_corruption``,
    ``clean_map``), not accuracy: the heat map reads those and says mAP in its title."""
    study = tmp_path / "s"
    for s in (0, 1):
        d = study / "report" / "robustness" / f"seed{s}"
        d.mkdir(parents=True)
        d.joinpath("robustness.json").write_text(json.dumps({"task": "detection", "severities": [1], "models": {
            m: {"map_by_corruption": {"noise": 0.10 + 0.02 * s, "blur": 0.2}, "clean_map": 0.3}
            for m in ("baseline", "fgd")}}))
    assert _ok(figs.study_robustness_heatmap(study))
    cap = captured[-1]
    # cell noise: seeds 10 % and 12 % -> mean 11.0, sd 1.4
    assert "11.0\n±1.4" in cap["texts"]
    assert "mAP@[.5:.95] under corruption" in " ".join([cap["suptitle"], *cap["titles"]])
    assert any(l.startswith("mAP@[.5:.95] (%)") for l in cap.get("ylabels", []))


def test_forest_and_curves(tmp_path, captured):
    stats = [{"method": "baseline", "test_acc_by_seed": {"0": 0.5, "1": 0.6}},
             {"method": "kd", "diff_vs_baseline": 0.05, "diff_vs_baseline_ci95": 0.02, "p_holm": 0.01,
              "holm_reject": True, "n_paired": 2, "test_acc_by_seed": {"0": 0.56, "1": 0.64}}]
    assert _ok(figs.forest_plot(stats, "baseline", tmp_path / "forest"))
    cap = captured[-1]
    assert "percentage points" in cap["xlabels"][0] and "p Holm 0.010 *" in cap["texts"]
    for m in ("baseline", "kd"):
        for s in (0, 1):
            run = tmp_path / "study" / m / f"seed{s}"
            run.mkdir(parents=True)
            run.joinpath("metrics.csv").write_text("epoch,val_acc\n1,0.5\n2,0.6\n" + ("3,0.7\n" if s else ""))
    assert _ok(figs.val_curves(tmp_path / "study", tmp_path / "curves.png"))
    cap = captured[-1]
    assert cap["xlabels"][0] == "epoch" and "%" in cap["ylabels"][0]
    line = cap["axes"][0].lines[0]
    assert list(line.get_ydata()) == pytest.approx([50.0, 60.0, 70.0])  # epoch 3: one seed
    with pytest.raises(FileNotFoundError):
        figs.val_curves(tmp_path / "nothing", tmp_path / "c.png")


def test_sweep_and_overlay_labels(tmp_path, captured):
    from kdlab.report.overlays import overlay_grid, plot_sweep

    rows = [{"student": "tiny", "alpha": a, "seed": s, "n_images": 64, "student_acc": 0.8 + 0.01 * s,
             "rank_alignment": 0.4} for a in (1.0, 0.5) for s in (0, 1, 2)]
    assert _ok(plot_sweep(rows, tmp_path / "sweep.png", teacher="resnet18", dataset="digits"))
    cap = captured[-1]
    assert "teacher resnet18" in cap["suptitle"] and "data digits" in cap["suptitle"]
    assert "64 test images" in cap["suptitle"] and "3 seeds" in cap["suptitle"]
    assert any("Spearman" in y for y in cap["ylabels"]) and any("α" in x for x in cap["xlabels"])
    maps = {"kd+attn\ncnn_tiny": torch.rand(2, 8, 8), "teacher": torch.rand(2, 8, 8)}
    png = overlay_grid(torch.rand(2, 1, 8, 8), maps, tmp_path / "ov.png", attribution="ig")
    assert _ok(png)
    cap = captured[-1]
    assert "Integrated Gradients" in cap["suptitle"]
    assert "kd+attn\ncnn_tiny" in cap["titles"]
    assert len(cap["axes"]) == 2 * 3 + 1 and "min–max" in cap["axes"][-1].get_ylabel()  # colour bar


def test_heat_range_shows_11_to_22_percent():
    # the colour range is the data's, rounded out to whole %: 11.3..21.7 -> 11..22 (not 0..100)
    assert figs.heat_range([[11.3, 21.7], [np.nan, 15.0]]) == (11.0, 22.0)
    assert figs.heat_range([[50.2, 50.4]]) == (49.0, 52.0)  # at least 2 units wide
    assert figs.heat_range([[np.nan]]) == (0.0, 100.0)


def test_val_curves_twenty_methods_distinct_and_legend_outside(tmp_path, captured):
    for k in range(20):
        run = tmp_path / "s" / f"m{k:02d}" / "seed0"
        run.mkdir(parents=True)
        run.joinpath("metrics.csv").write_text(f"epoch,val_acc\n1,{0.3 + 0.01 * k}\n2,{0.5 + 0.01 * k}\n")
    figs.val_curves(tmp_path / "s", tmp_path / "c.png")
    ax = captured[-1]["axes"][0]
    styles = {(tuple(ln.get_color()), ln.get_linestyle()) for ln in ax.lines}
    assert len(ax.lines) == 20 and len(styles) == 20  # 20 distinguishable lines
    anchor = ax.get_legend().get_bbox_to_anchor().transformed(ax.transAxes.inverted())
    assert anchor.x0 > 1.0  # the legend hangs off the right edge of the axes, outside the data


def test_overlay_perceptual_and_rows_labelled(tmp_path, captured):
    from kdlab.report.overlays import overlay_grid

    overlay_grid(torch.rand(2, 1, 8, 8), {"teacher": torch.rand(2, 8, 8)}, tmp_path / "ov.png")
    cap = captured[-1]
    assert cap["axes"][1].images[-1].get_cmap().name == "inferno"
    assert cap["ylabels"][:4:2] == ["image 1", "image 2"]


def _failing_figure(subplots=None):
    """A figure whose drawing fails part-way (after the PDF backend has opened its file)."""
    import matplotlib.pyplot as plt

    fig, ax = (subplots or plt.subplots)()
    ax.plot([0, 1], [1, 0])
    bad = ax.text(0.5, 0.5, "x")

    def boom(*a, **k):
        raise RuntimeError("drawing failed")

    bad.draw = boom
    return fig


@pytest.mark.parametrize("save", ["save_figure", "roc_figure", "atomic_savefig_svg"])
def test_a_failing_savefig_leaves_the_old_figure_and_no_partial_file(tmp_path, save, monkeypatch):
    """Figures are written atomically (a temporary file beside the target, renamed over it): a save
    that fails part-way keeps the old PNG / PDF / SVG byte for byte and leaves no other file."""
    import matplotlib.pyplot as plt

    from kdlab.core.io import atomic_savefig

    if save == "save_figure":
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1])
        figs.save_figure(fig, tmp_path / "f.png")
        names = ["f.png", "f.pdf"]
        again = lambda: figs.save_figure(_failing_figure(), tmp_path / "f.png")  # noqa: E731
    elif save == "roc_figure":
        from kdlab.evaluate import verification

        CURVE = {"a": (np.array([0.1, 0.4, 0.6, 0.9]), np.array([0, 0, 1, 1]))}

        verification.roc_figure(CURVE, tmp_path / "roc.pdf")
        names = ["roc.pdf"]
        real = plt.subplots
        monkeypatch.setattr(plt, "subplots", lambda *a, **k: (lambda f: (f, f.axes[0]))(_failing_figure(real)))
        again = lambda: verification.roc_figure(CURVE,  # noqa: E731
                                                 tmp_path / "roc.pdf")
    else:
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1])
        atomic_savefig(fig, tmp_path / "f.svg")
        plt.close(fig)
        names = ["f.svg"]
        again = lambda: atomic_savefig(_failing_figure(), tmp_path / "f.svg")  # noqa: E731
    before = {n: (tmp_path / n).read_bytes() for n in names}
    assert all(len(b) > 100 for b in before.values())
    with pytest.raises(RuntimeError, match="drawing failed"):
        again()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    assert {n: (tmp_path / n).read_bytes() for n in names} == before


def test_every_figure_is_saved_through_the_atomic_write():
    """No module draws a figure straight into its target: ``savefig`` is called only by
    ``kdlab.core.io.atomic_savefig`` (a temporary file beside the target, then ``os.replace``)."""
    import re
    from pathlib import Path

    import kdlab

    root = Path(kdlab.__file__).parent
    direct = [f"{p.relative_to(root)}:{i}" for p in sorted(root.rglob("*.py")) if p != root / "core" / "io.py"
              for i, line in enumerate(p.read_text().splitlines(), 1)
              if re.search(r"\.savefig\(|\bimsave\(", line) and not line.lstrip().startswith("#")]
    assert not direct, f"use kdlab.core.io.atomic_savefig: {direct}"
