"""The study page: index.html (tables, figures, findings) and table.tex, rebuilt byte for byte by
`kdlab report`, and rendered in headless Chromium: every image loads, no console error."""

import json
import re
import shutil
import subprocess

import pytest

from kdlab.report.page import markdown_table_to_latex, markdown_to_html
from kdlab.report.tables import rebuild_reports, study_report

ACC = {"baseline": [0.60, 0.58, 0.63], "kd": [0.65, 0.64, 0.67], "kd+attn": [0.61, 0.57, 0.65]}


def _study(tmp_path):
    """A finished 3-method, 3-seed study: result.json + metrics.csv per run, robustness per seed."""
    study = tmp_path / "study"
    runs = []
    for m, accs in ACC.items():
        for s, a in enumerate(accs):
            run = study / m / f"seed{s}"
            run.mkdir(parents=True)
            r = {"method": m, "seed": s, "test_acc": a, "best_epoch": 3, "train_time_s": 1.0,
                 "images_per_s": 100.0, "model": "cnn_tiny"}
            (run / "result.json").write_text(json.dumps(r))
            (run / "metrics.csv").write_text("epoch,val_acc\n" + "".join(
                f"{e},{a * e / 3:.4f}\n" for e in (1, 2, 3)))
            runs.append(r)
    for s in range(3):
        d = study / "report" / "robustness" / f"seed{s}"
        d.mkdir(parents=True)
        d.joinpath("robustness.json").write_text(json.dumps({"severities": [1, 3], "models": {
            m: {"acc_by_corruption": {"noise": 0.11 + 0.05 * i, "blur": 0.22 - 0.01 * s}, "clean_acc": ACC[m][s]}
            for i, m in enumerate(ACC)}}))
    study_report(runs, {m: None for m in ACC}, study / "report", profile=False, teacher_value=0.70,
                 log=lambda *a: None)
    return study


def test_markdown_and_latex_by_hand():
    md = ("| method | acc % | p |\n|---|---:|---|\n| kd_x | 65.3 ± 1.2 | 0.040* |\n\nA **bold** `c` <b>.\n\n"
          "- *kd over CE* (kd vs baseline): p 0.040*, 0.1*\n")
    h = markdown_to_html(md)
    assert "<th>acc %</th>" in h and "<td>65.3 ± 1.2</td>" in h
    assert "<strong>bold</strong> <code>c</code> &lt;b&gt;." in h  # raw HTML is escaped
    assert "<li><em>kd over CE</em> (kd vs baseline): p 0.040*, 0.1*</li>" in h
    tex = markdown_table_to_latex(md, caption="s")
    assert r"\begin{tabular}{lrr}" in tex and r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"method & acc \% & p \\" in tex and r"kd\_x & 65.3 $\pm$ 1.2 & 0.040* \\" in tex
    with pytest.raises(ValueError):
        markdown_table_to_latex("no table")


def test_page_lists_everything_and_rebuilds_byte_identical(tmp_path):
    pytest.importorskip("matplotlib")
    from kdlab.experiments.findings import write_findings

    study = _study(tmp_path)
    rep = study / "report"
    write_findings([study], log=lambda *a: None)  # the findings sentences join the page
    page = (rep / "index.html").read_text()
    for m in ACC:
        assert f"<td>{m}</td>" in page
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert srcs == ["forest.png", "val_curves.png", "robustness_heatmap_seeds.png"]
    assert all((rep / s).is_file() for s in srcs)
    assert "<h2>Findings</h2>" in page and "http" not in page  # nothing from the network
    tex = (rep / "table.tex").read_text()
    assert tex.count(r"\\") == 1 + len(ACC)  # header + one row per method
    files = ("index.html", "table.tex", "table.md", "table.json", "results.csv")
    before = {f: (rep / f).read_bytes() for f in files}
    rebuild_reports(study, log=lambda *a: None)
    assert {f: (rep / f).read_bytes() for f in files} == before


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


CHECK = """<script>
window.__errors = [];
const _err = console.error.bind(console);
console.error = (...a) => { window.__errors.push(a.join(' ')); _err(...a); };
window.addEventListener('error', e => window.__errors.push('error: ' + (e.message || (e.target && e.target.src))), true);
window.addEventListener('load', () => {
  const imgs = Array.from(document.images).map(i => ({src: i.getAttribute('src'), w: i.naturalWidth}));
  const d = document.createElement('pre'); d.id = 'kdlab-check';
  d.textContent = JSON.stringify({imgs: imgs, errors: window.__errors});
  document.body.appendChild(d);
});
</script>"""


def test_page_renders_in_headless_chromium(tmp_path):
    pytest.importorskip("matplotlib")
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium binary found (CI installs Debian's `chromium` in .ci/run)")
    study = _study(tmp_path)
    rep = study / "report"
    # the page itself has no script; a copy with a checking script next to it (same relative links)
    (rep / "check.html").write_text((rep / "index.html").read_text().replace("<body>", "<body>" + CHECK, 1))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000"]
    res = subprocess.run([exe, *flags, "--dump-dom", (rep / "check.html").as_uri()], capture_output=True,
                         text=True, timeout=120)
    m = re.search(r'<pre id="kdlab-check">(.*?)</pre>', res.stdout, re.S)
    assert m, f"chromium gave no result (rc {res.returncode}): {res.stderr[-2000:]}"
    out = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert [i["src"] for i in out["imgs"]] == ["forest.png", "val_curves.png", "robustness_heatmap_seeds.png"]
    assert all(i["w"] > 0 for i in out["imgs"]), out["imgs"]
    assert out["errors"] == []
    console = [ln for ln in res.stderr.splitlines() if "CONSOLE" in ln and "check.html" in ln]
    assert console == [], console
    # a broken link is caught: the same check on a page with a missing image fails
    (rep / "broken.html").write_text((rep / "check.html").read_text().replace("forest.png", "missing.png"))
    res = subprocess.run([exe, *flags, "--dump-dom", (rep / "broken.html").as_uri()], capture_output=True,
                         text=True, timeout=120)
    out = json.loads(re.search(r'<pre id="kdlab-check">(.*?)</pre>', res.stdout, re.S).group(1)
                     .replace("&quot;", '"').replace("&amp;", "&"))
    assert out["imgs"][0]["w"] == 0 and out["errors"]
