"""One page per study: ``<report>/index.html`` (self-contained: inline CSS, no script, no network;
figures linked by relative paths that exist) and ``<report>/table.tex`` (booktabs) for papers.

Both are derived only from files the report already holds (``table.md``, the figures' PNGs,
``findings.md``, ``study.json``), so :func:`kdlab.report.tables.rebuild_report` writes them byte
for byte the same as the study did. Works for any task: the table is the task's own ``table.md``
(its declared metrics and columns)."""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Optional

from kdlab.core.io import atomic_write_text, read_json

__all__ = ["write_study_page", "markdown_to_html", "markdown_table_to_latex", "PAGE_FIGURES"]

#: figures a study page shows, in order: (file stem, heading, caption)
PAGE_FIGURES = (
    ("forest", "Paired difference to the baseline",
     "Each method's paired difference to the baseline with its 95% t-interval; dots are seeds."),
    ("val_curves", "Validation curves", "Mean over seeds with a ±1 sd band, per method."),
    ("robustness_heatmap_seeds", "Robustness (seed spread)",
     "Accuracy under corruption, mean ± sd over seeds (colour scale: the data's range, printed on the bar)."),
    ("robustness_heatmap", "Robustness", "Accuracy (detection: mAP@[.5:.95]) under corruption per method."),
    ("explain_study", "Where the students look: alignment with the teacher",
     "Explanation-alignment metrics per method, mean and 95% CI over seeds."),
    ("explain_overlays", "Where the students look: attribution overlays",
     "Teacher and student attributions on the same test images."),
)

_CSS = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:1.5em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.45em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
.sub{color:#555;margin-top:0}
.wide{overflow-x:auto}table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{border-bottom:1px solid #ddd;padding:.25em .6em;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}thead th{border-bottom:2px solid #444}
figure{margin:.8em 0}img{max-width:100%;max-height:1100px;height:auto;width:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.85em}code{background:#f4f4f4;padding:0 .2em}
.notes p{font-size:.9em}"""


def _inline(text: str) -> str:
    """Escape ``text`` for HTML, then ``**bold**``, ``*italic*`` and ```code``` markdown (a lone
    ``*`` as in ``0.040*`` stays as it is)."""
    t = html.escape(text, quote=False)
    t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
    t = re.sub(r"(?<![\w*])\*(?=\S)([^*]+?)(?<=\S)\*(?![\w*])", r"<em>\1</em>", t)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", t)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _is_rule(line: str) -> bool:
    return bool(re.fullmatch(r"\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?", line.strip()))


def markdown_to_html(md: str) -> str:
    """The small markdown subset kdlab's reports use: ``#`` headings, pipe tables, ``-`` lists,
    paragraphs (blank-line separated), ``**bold**`` and ```code```. Everything else is escaped."""
    out, para, lines, i = [], [], md.splitlines(), 0

    def flush():
        if para:
            out.append("<p>" + _inline(" ".join(para)) + "</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        s = line.strip()
        if s.startswith("|") and i + 1 < len(lines) and _is_rule(lines[i + 1]):
            flush()
            head = _cells(line)
            rows = []
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            out.append('<div class="wide"><table><thead><tr>' + "".join(f"<th>{_inline(c)}</th>" for c in head)
                       + "</tr></thead><tbody>")
            out.extend("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
            out.append("</tbody></table></div>")
            continue
        m = re.match(r"(#{1,6})\s+(.*)", s)
        if m:
            flush()
            lvl = min(6, len(m.group(1)) + 2)  # under the page's own h1/h2
            out.append(f"<h{lvl}>{_inline(m.group(2))}</h{lvl}>")
        elif s.startswith(("- ", "* ")):
            flush()
            items = []
            while i < len(lines) and lines[i].strip().startswith(("- ", "* ")):
                items.append(lines[i].strip()[2:])
                i += 1
            out.append("<ul>" + "".join(f"<li>{_inline(t)}</li>" for t in items) + "</ul>")
            continue
        elif not s:
            flush()
        else:
            para.append(s)
        i += 1
    flush()
    return "\n".join(out)


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
        "±": r"$\pm$", "–": "--", "—": "---", "≥": r"$\geq$", "≤": r"$\leq$", "α": r"$\alpha$",
        "Δ": r"$\Delta$", "×": r"$\times$", "·": r"$\cdot$", "ρ": r"$\rho$", "‖": r"$\|$"}


def _tex(text: str) -> str:
    text = text.replace("**", "").replace("`", "")
    return "".join(_TEX.get(ch, ch) for ch in text)


def markdown_table_to_latex(md: str, caption: str = "") -> str:
    """The first pipe table of ``md`` as a booktabs ``table`` (``\\toprule``/``\\midrule``/
    ``\\bottomrule``; first column left, the others right aligned), LaTeX special characters
    escaped. Needs ``\\usepackage{booktabs}``."""
    lines = md.splitlines()
    for i in range(len(lines) - 1):
        if lines[i].strip().startswith("|") and _is_rule(lines[i + 1]):
            break
    else:
        raise ValueError("no pipe table in the markdown")
    head = _cells(lines[i])
    rows = []
    for line in lines[i + 2:]:
        if not line.strip().startswith("|"):
            break
        rows.append(_cells(line))
    spec = "l" + "r" * (len(head) - 1)
    body = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
            " & ".join(_tex(c) for c in head) + r" \\", r"\midrule"]
    body += [" & ".join(_tex(c) for c in r) + r" \\" for r in rows]
    body += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        body.append(rf"\caption{{{_tex(caption)}}}")
    body.append(r"\end{table}")
    return "\n".join(body) + "\n"


def _find(name: str, out: Path, study_dir: Path) -> Optional[Path]:
    for d in (out, study_dir / "report"):
        if (d / name).is_file():
            return d / name
    return None


def write_study_page(report_dir, study_dir=None, *, log=print) -> dict[str, Path]:
    """Write ``index.html`` and ``table.tex`` into ``report_dir`` (default study: its parent) from
    its ``table.md``, the figures present (this folder first, then ``<study>/report``; see
    :data:`PAGE_FIGURES`) and the findings (``findings.md``). Atomic writes. Returns the paths."""
    out = Path(report_dir)
    study_dir = Path(study_dir) if study_dir is not None else out.parent
    md = (out / "table.md").read_text(encoding="utf-8")
    rec = None
    sj = _find("study.json", out, study_dir)
    if sj is not None:
        rec = read_json(sj, "study record").get("recipe")
    from kdlab.report.figures import study_title

    sub = study_title(rec) if rec else ""
    name = study_dir.name + ("" if out.name == "report" else f" ({out.name})")
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>kdlab study {html.escape(name)}</title>", f"<style>{_CSS}</style></head><body>",
             f"<h1>Study {html.escape(name)}</h1>"]
    if sub:
        parts.append(f'<p class="sub">{html.escape(sub)}</p>')
    parts += ["<h2>Results</h2>", '<div class="notes">', markdown_to_html(md), "</div>",
              '<p class="sub">LaTeX (booktabs): <a href="table.tex">table.tex</a>; data: '
              '<a href="table.csv">table.csv</a>, <a href="results.csv">results.csv</a>, '
              '<a href="table.json">table.json</a>.</p>']
    shown = set()
    for stem, heading, caption in PAGE_FIGURES:
        png = _find(f"{stem}.png", out, study_dir)
        if png is None or (stem == "robustness_heatmap" and "robustness_heatmap_seeds" in shown):
            continue  # one robustness heat map: the per-seed one when both exist
        shown.add(stem)
        rel = Path(os.path.relpath(png, out)).as_posix()
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        pdf = (f' (<a href="{html.escape(Path(rel).with_suffix(".pdf").as_posix())}">PDF</a>)'
               if png.with_suffix(".pdf").is_file() else "")
        parts.append(f'<figure><img src="{html.escape(rel)}" alt="{html.escape(heading)}">'
                     f"<figcaption>{html.escape(caption)}{pdf}</figcaption></figure>")
    for fname in ("explain_study.md", "findings.md"):
        f = _find(fname, out, study_dir)
        if f is not None:
            parts.append("<h2>" + ("Findings" if fname == "findings.md" else "Where the students look: table")
                         + "</h2>")
            parts.append('<div class="notes">' + markdown_to_html(f.read_text(encoding="utf-8")) + "</div>")
    parts.append('<p class="sub">Written by kdlab (<code>kdlab report</code> rebuilds this page).</p>')
    parts.append("</body></html>")
    page = atomic_write_text(out / "index.html", "\n".join(parts) + "\n")
    tex = atomic_write_text(out / "table.tex", markdown_table_to_latex(
        md, caption=f"{name}" + (f": {sub}" if sub else "")))
    log(f"page: {page} (+ table.tex)")
    return {"index": page, "table_tex": tex}
