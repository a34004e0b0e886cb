"""`pbs viz-mask`'s outputs: the panels in the terminal (or the JSON record), and the PNG, SVG and HTML
files, drawn by ``pbs_cli.render.viz``."""

from __future__ import annotations

from pathlib import Path

from .. import console
from ..engine import reports
from . import viz

MAX_PANEL_WIDTH = 160  # wider terminals get the panels at this width (more columns add nothing)


def deliver(result, json_out: bool, plain: bool, files: dict[str, Path]) -> None:
    """Print ``result`` (``engine.mask_views.MaskViews``): JSON or the panels; then write ``files``
    (format -> path)."""
    title = f"pbs viz-mask · {result.source}"
    if json_out:
        console.out.print_json(reports.to_json(reports.envelope("viz-mask", **result.record())))
    else:
        color = viz.use_color(console.out, plain)
        for r in _renderables(result, title, color, min(console.out.width, MAX_PANEL_WIDTH)):
            console.out.print(r)
    for fmt, path in files.items():
        if fmt == "html":
            reports.atomic_write_text(path, viz.export_html(_renderables(result, title, True, 120), 120, title))
        else:
            viz.save_figure(_figure(result, title), path, fmt)
        console.err.print(f"wrote {path}", highlight=False)


def _renderables(result, title: str, color: bool, width: int) -> list:
    if len(result.views) == 1:
        return [viz.render_head(result.views[0], width, color, result.source)]
    return [viz.overview_title(title, result.meta, result.config, color),
            viz.render_overview(result.stats, width, color)]


def _figure(result, title: str):
    if len(result.views) == 1:
        return viz.head_figure(result.views[0], result.source)
    return viz.overview_figure(result.stats, viz.overview_caption(title, result.meta, result.config))
