"""A self-contained HTML page for a `pbs profile` document: summary, environment, result table and two
plots (time vs length per backend; speedup vs density), matplotlib PNGs embedded as base64 data URIs.
No scripts, no external resources: the file opens offline in any browser.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

from .cells import COLUMNS, describe, has_layers, row_cells, skipped_lines, summary_lines
from ..engine.sizes import format_size


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plot_time_vs_length(doc: dict[str, Any]) -> str | None:
    """Base64 PNG: median time (ms, log) against N (log) per backend; None when nothing ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[int, list[float]]] = {}
    for r in doc.get("results", []):
        if r.get("status") == "ok" and r.get("median_ms"):
            series.setdefault(r["backend"], {}).setdefault(r["seq_len"], []).append(r["median_ms"])
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, pts in sorted(series.items()):
        xs = sorted(pts)
        ys = [sum(pts[x]) / len(pts[x]) for x in xs]
        ax.plot(xs, ys, marker="o", linewidth=2.4 if name == "pbs" else 1.4, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N (tokens)")
    ax.set_ylabel("time per attention call (ms)")
    ax.set_title("time vs length")
    ax.set_xticks(sorted({x for pts in series.values() for x in pts}))
    ax.set_xticklabels([format_size(x) for x in ax.get_xticks()])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    data = _png(fig)
    plt.close(fig)
    return data


def plot_speedup_vs_density(doc: dict[str, Any]) -> str | None:
    """Base64 PNG: speedup over the best dense backend against plan density, sparse backends only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in doc.get("results", []) if r.get("status") == "ok" and r.get("speedup") is not None
           and r.get("density") is not None and r.get("density") < 1.0]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name in sorted({r["backend"] for r in pts}):
        mine = [r for r in pts if r["backend"] == name]
        ax.scatter([r["density"] for r in mine], [r["speedup"] for r in mine], label=name, s=36)
        for r in mine:
            ax.annotate(format_size(r["seq_len"]), (r["density"], r["speedup"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("density (kept causal blocks / all causal blocks)")
    ax.set_ylabel("speedup vs best dense (x)")
    ax.set_title("speedup vs density")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    data = _png(fig)
    plt.close(fig)
    return data


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td.l{text-align:left}tr.skipped td{color:#888}tr.pbs td{font-weight:600}
pre{background:#f7f7f7;padding:8px;font-size:12px;overflow:auto}figure{display:inline-block;margin:0 1em 1em 0}
"""


def to_html(doc: dict[str, Any]) -> str:
    esc = html.escape
    layers = has_layers(doc)
    cols = [c for c in COLUMNS if layers or c != "layer"]
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = []
    for rec in doc.get("results", []):
        cells = row_cells(rec)
        if not layers:
            cells.pop(1)
        klass = "skipped" if rec.get("status") != "ok" else ("pbs" if rec["backend"] == "pbs" else "")
        tds = "".join(f'<td class="l">{esc(c)}</td>' if i < (3 if layers else 2) else f"<td>{esc(c)}</td>"
                      for i, c in enumerate(cells))
        body.append(f'<tr class="{klass}" data-backend="{esc(rec["backend"])}" '
                    f'data-seq-len="{rec["seq_len"]}">{tds}</tr>')
    figures = []
    for title, data in (("time vs length", plot_time_vs_length(doc)),
                        ("speedup vs density", plot_speedup_vs_density(doc))):
        if data:
            figures.append(f'<figure><img alt="{esc(title)}" src="data:image/png;base64,{data}">'
                           f"<figcaption>{esc(title)}</figcaption></figure>")
    env = json.dumps(doc.get("env", {}), indent=2, default=str)
    summary = "".join(f"<li>{esc(s)}</li>" for s in summary_lines(doc) + skipped_lines(doc))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>pbs profile</title><style>{_CSS}</style></head>
<body>
<h1>pbs profile</h1>
<p id="describe">{esc(describe(doc))}</p>
<p>{esc(doc.get("timestamp", ""))} &middot; <code>pbs {esc(" ".join(map(str, doc.get("argv", []))))}</code></p>
<ul id="summary">{summary}</ul>
{''.join(figures)}
<table id="results"><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>
<p>TFLOP/s dense-eq = causal FLOPs / time, with causal FLOPs = 2 &middot; N&sup2; &middot; D &middot; \
H<sub>q</sub> &middot; B;
TFLOP/s computed = density &middot; causal FLOPs / attend time; speedup = best dense SDPA time / time;
rel. L2 err = ||out &minus; dense|| / ||dense||; recall = share of the full attention mass the kept blocks \
cover (sampled rows).</p>
<h2>Environment</h2><pre id="env">{esc(env)}</pre>
</body></html>
"""
