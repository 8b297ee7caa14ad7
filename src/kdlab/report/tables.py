"""Study tables: per-method statistics over seeds, written as CSV, JSON and Markdown.

For each method with test accuracies a_1..a_n over seeds: mean, sample standard deviation,
the 95% confidence half-width ``t_{0.975, n−1} · sd / √n``, and the *paired* difference to the
baseline: d_k = a_k(method) − a_k(baseline) for the seeds both have, with its own mean and
95% half-width (a paired t interval).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np


def mean_sd_ci(values, conf: float = 0.95) -> tuple[float, float, float]:
    """(mean, sample sd, half-width of the t confidence interval); sd and CI are nan for n < 2."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    n = v.size
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if n < 2:
        return m, float("nan"), float("nan")
    from scipy import stats

    sd = float(v.std(ddof=1))
    return m, sd, float(stats.t.ppf(0.5 + conf / 2, n - 1) * sd / math.sqrt(n))


def paired_diff(a: dict, b: dict) -> tuple[float, float, int]:
    """Mean and 95% half-width of a[k] − b[k] over keys (seeds) in both; and how many."""
    keys = sorted(set(a) & set(b))
    m, _, ci = mean_sd_ci([a[k] - b[k] for k in keys])
    return m, ci, len(keys)


def fmt_pct(m: float, pm: Optional[float] = None, digits: int = 2) -> str:
    if m is None or not math.isfinite(m):
        return "—"
    s = f"{100 * m:.{digits}f}"
    if pm is not None and math.isfinite(pm):
        s += f" ± {100 * pm:.{digits}f}"
    return s


def _num(v, fmt: str) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def method_stats(runs: list[dict], baseline: str) -> list[dict]:
    """One row per method (in first-seen order) from per-run result dicts."""
    by_method: dict[str, dict[int, dict]] = {}
    for r in runs:
        by_method.setdefault(r["method"], {})[r["seed"]] = r
    base = {s: r["test_acc"] for s, r in by_method.get(baseline, {}).items()}
    out = []
    for method, seeds in by_method.items():
        accs = {s: r["test_acc"] for s, r in seeds.items()}
        m, sd, ci = mean_sd_ci(accs.values())
        dm, dci, dn = paired_diff(accs, base) if method != baseline and base else (float("nan"),) * 2 + (0,)
        rs = list(seeds.values())
        out.append({
            "method": method, "model": rs[0].get("model"), "n_seeds": len(accs),
            "test_acc_mean": m, "test_acc_sd": sd, "test_acc_ci95": ci,
            f"diff_vs_{baseline}": dm, f"diff_vs_{baseline}_ci95": dci, "n_paired": dn,
            "best_epoch_mean": float(np.mean([r["best_epoch"] for r in rs])),
            "train_time_s_mean": float(np.mean([r["train_time_s"] for r in rs])),
            "train_images_per_s": float(np.mean([r["images_per_s"] for r in rs])),
            "seeds": sorted(accs),
        })
    return out


def _profile(recipe, cache: dict) -> dict:
    from kdlab.data import load_dataset
    from kdlab.evaluate.efficiency import profile_model
    from kdlab.models import create_model

    key = (recipe.student.model, json.dumps(recipe.student.kwargs, sort_keys=True), recipe.data.name)
    if key not in cache:
        d = recipe.data
        info = load_dataset(d.name, d.data_dir, val_fraction=d.val_fraction).info
        model = create_model(recipe.student.model, num_classes=info.num_classes,
                             in_channels=info.in_channels, **recipe.student.kwargs).eval()
        cache[key] = profile_model(model, (1, info.in_channels, info.image_size, info.image_size),
                                   batch_sizes=(1,), repeats=30)
    return cache[key]


def render_table(stats: list[dict], baseline: str, wall_time_s: Optional[float] = None) -> tuple[str, str]:
    """The Markdown table of a study (robustness columns appear once they are computed)."""
    robust = any("mCA" in r for r in stats)
    headers = ["method", "seeds", "top-1 % (mean ± sd)", "95% CI", f"Δ vs {baseline} (pp, 95% CI)",
               "best ep.", "params", "MB", "MFLOPs", "ms/img (b=1)", "train img/s", "train s/run"]
    if robust:
        headers += ["mCA %", "mCE %", "rel. mCE %"]
    rows = []
    for r in stats:
        row = [
            r["method"], r["n_seeds"], fmt_pct(r["test_acc_mean"], r["test_acc_sd"]),
            fmt_pct(r["test_acc_ci95"]),
            "—" if r["method"] == baseline else fmt_pct(r[f"diff_vs_{baseline}"], r[f"diff_vs_{baseline}_ci95"]),
            _num(r["best_epoch_mean"], ".1f"), _num(r.get("params"), ","), _num(r.get("size_mb"), ".3f"),
            _num(r.get("mflops"), ".2f"), _num(r.get("latency_ms_b1"), ".3f"),
            _num(r["train_images_per_s"], ".0f"), _num(r["train_time_s_mean"], ".1f"),
        ]
        if robust:
            row += [fmt_pct(r.get("mCA"), r.get("mCA_sd")), fmt_pct(r.get("mCE")), fmt_pct(r.get("rel_mCE"))]
        rows.append(row)
    md = markdown_table(headers, rows)
    note = (f"\nTest top-1 over seeds; ± is the sample sd; 95% CI is the t interval half-width; "
            f"Δ is the paired difference to '{baseline}' (same seed, same data order).")
    if robust:
        note += (" mCA: mean accuracy over corruptions x severities; mCE / rel. mCE: corruption "
                 f"error relative to '{baseline}' (100 = as robust as it), mean over seeds.")
    if wall_time_s is not None:
        note += f" Study wall time {wall_time_s:.1f}s."
    return md, note


def study_report(runs: list[dict], recipes: dict, out_dir, *, baseline: str = "baseline",
                 wall_time_s: Optional[float] = None, profile: bool = True, log=print) -> dict:
    """Aggregate a study's runs, write results.csv/table.csv/table.json/table.md, print the table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "results.csv", runs)
    stats = method_stats(runs, baseline)
    cache: dict = {}
    for row in stats:
        if profile:
            p = _profile(recipes[row["method"]], cache)
            row.update({"params": p["params"]["total"], "size_mb": p["size_mb"],
                        "mflops": p["flops"] / 1e6, "latency_ms_b1": p["latency"][0]["median_ms"]})
    return write_tables(out_dir, stats, baseline, wall_time_s, log)


def write_tables(out_dir, stats: list[dict], baseline: str, wall_time_s=None, log=print) -> dict:
    """Write table.md / table.csv / table.json for per-method ``stats`` and print the table."""
    out_dir = Path(out_dir)
    md, note = render_table(stats, baseline, wall_time_s)
    (out_dir / "table.md").write_text(md + "\n" + note + "\n")
    write_csv(out_dir / "table.csv", [{k: v for k, v in r.items() if k != "seeds"} for r in stats])
    (out_dir / "table.json").write_text(json.dumps({"methods": stats, "baseline": baseline,
                                                    "wall_time_s": wall_time_s}, indent=2))
    log("")
    log(md)
    log(note.strip())
    log(f"report: {out_dir}")
    return {"methods": stats, "table_md": md, "out_dir": str(out_dir), "wall_time_s": wall_time_s}
