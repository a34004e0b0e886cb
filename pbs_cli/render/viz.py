"""Pictures of PBS plans: terminal heatmaps (Rich) and PNG/SVG figures (matplotlib, Agg).

Input is what ``mask_analysis`` computes: per head, the block attention mass in original order and
in plan layout, the kept mask and the forced blocks, all numpy ``(N_b, N_b)``; and per-head numbers
(``HeadStats``). Nothing here loads models or parses options.

Terminal encoding. Colour mode draws two block rows per text line with half blocks ("▀" foreground =
upper row, background = lower row) in true colour (Rich downgrades for 256/16-colour terminals).
Plain mode (``NO_COLOR``, not a TTY, ``--plain``) draws one block row per line with characters:
heatmaps ``░▒▓█`` by log mass, kept masks ``█`` kept / ``░`` skipped. Cells above the causal
diagonal stay blank. Matrices wider than a panel are averaged over ``f × f`` tiles (the factor is
printed).
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

# colour scale anchors: matplotlib's "viridis" at 0, 1/8, ..., 1 (interpolated linearly in RGB)
_VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#fde725"]
KEPT_SELECTED = "#f0a020"  # kept because top-p chose it
KEPT_FORCED = "#21918c"  # kept regardless of scores (diagonal segment, sink, local blocks)
SKIPPED_TERM = "#3a3a3a"
SKIPPED_FIG = "#e4e4e4"
PLAIN_RAMP = "░▒▓█"
DECADES = 3  # heatmaps show log10 mass over this many decades below the panel maximum
PANEL_GAP = 2


def _hex_to_rgb(h: str) -> tuple[int, int, int]:
    return int(h[1:3], 16), int(h[3:5], 16), int(h[5:7], 16)


def colour(x: float) -> str:
    """'#rrggbb' of value ``x`` in [0, 1] on the viridis scale (clipped)."""
    x = min(1.0, max(0.0, float(x)))
    pos = x * (len(_VIRIDIS) - 1)
    i = min(int(pos), len(_VIRIDIS) - 2)
    t = pos - i
    a, b = _hex_to_rgb(_VIRIDIS[i]), _hex_to_rgb(_VIRIDIS[i + 1])
    return "#" + "".join(f"{round(u + (v - u) * t):02x}" for u, v in zip(a, b))


def _blend(c0: str, c1: str, t: float) -> str:
    a, b = _hex_to_rgb(c0), _hex_to_rgb(c1)
    return "#" + "".join(f"{round(u + (v - u) * t):02x}" for u, v in zip(a, b))


# -- downsampling -----------------------------------------------------------------------------


def causal_mask(n_b: int) -> np.ndarray:
    """bool (N_b, N_b): key block j <= query block i."""
    return np.tri(n_b, dtype=bool)


def downsample_factor(n_b: int, columns: int) -> int:
    """Smallest f such that ceil(n_b / f) <= columns."""
    return max(1, math.ceil(n_b / max(1, columns)))


def _tile_sum(x: np.ndarray, f: int) -> np.ndarray:
    r, c = x.shape
    rp, cp = -(-r // f) * f, -(-c // f) * f
    xp = np.zeros((rp, cp), dtype=np.float64)
    xp[:r, :c] = x
    return xp.reshape(rp // f, f, cp // f, f).sum((1, 3))


def downsample_mass(mass: np.ndarray, f: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean over the causal blocks of each f x f tile. Returns (values (R, C), causal (R, C) bool)."""
    causal = causal_mask(mass.shape[0])
    counts = _tile_sum(causal.astype(np.float64), f)
    sums = _tile_sum(np.where(causal, mass, 0.0), f)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan), counts > 0


def downsample_mask(kept: np.ndarray, forced: np.ndarray, f: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kept fraction of causal blocks, forced share of kept blocks, causal) per f x f tile."""
    causal = causal_mask(kept.shape[0])
    counts = _tile_sum(causal.astype(np.float64), f)
    k = _tile_sum(kept & causal, f)
    fo = _tile_sum(forced & kept & causal, f)
    return k / np.maximum(counts, 1), fo / np.maximum(k, 1), counts > 0


def log_scale(values: np.ndarray, vmax: float, decades: int = DECADES) -> np.ndarray:
    """log10(values / vmax) mapped from [-decades, 0] to [0, 1], clipped; NaN stays NaN."""
    with np.errstate(divide="ignore", invalid="ignore"):
        v = (np.log10(np.maximum(values, 1e-30) / max(vmax, 1e-30)) + decades) / decades
    return np.where(np.isnan(values), np.nan, np.clip(v, 0.0, 1.0))


# -- cells: (plain character, colour or None) -------------------------------------------------

Cell = tuple[str, "str | None"]


def heatmap_cells(values01: np.ndarray) -> list[list[Cell]]:
    """Cells of a heatmap whose values are in [0, 1] (NaN = outside the causal triangle)."""
    rows = []
    for row in values01:
        cells = []
        for v in row:
            if np.isnan(v):
                cells.append((" ", None))
            else:
                cells.append((PLAIN_RAMP[min(len(PLAIN_RAMP) - 1, int(v * len(PLAIN_RAMP)))], colour(v)))
        rows.append(cells)
    return rows


def mask_cells(kept_frac: np.ndarray, forced_share: np.ndarray, causal: np.ndarray) -> list[list[Cell]]:
    """Cells of a kept mask: '█' where at least half the tile's causal blocks are kept, else '░'.

    Colour: forced-blocks colour when most kept blocks of the tile are forced, selected colour
    otherwise, dimmed towards the skipped colour by the kept fraction."""
    rows = []
    for i in range(kept_frac.shape[0]):
        cells = []
        for j in range(kept_frac.shape[1]):
            if not causal[i, j]:
                cells.append((" ", None))
                continue
            frac = float(kept_frac[i, j])
            if frac == 0.0:
                cells.append(("░", SKIPPED_TERM))
                continue
            hue = KEPT_FORCED if forced_share[i, j] >= 0.5 else KEPT_SELECTED
            cells.append(("█" if frac >= 0.5 else "░", _blend(SKIPPED_TERM, hue, 0.35 + 0.65 * frac)))
        rows.append(cells)
    return rows


def cells_to_lines(cells: list[list[Cell]], color: bool) -> list[Text]:
    """Plain: one line per row. Colour: two rows per line with half blocks."""
    if not color:
        return [Text("".join(ch for ch, _ in row)) for row in cells]
    lines = []
    width = max((len(r) for r in cells), default=0)
    for r in range(0, len(cells), 2):
        top = cells[r]
        bottom = cells[r + 1] if r + 1 < len(cells) else [(" ", None)] * width
        line = Text()
        for (_, ct), (_, cb) in zip(top, bottom):
            if ct is None and cb is None:
                line.append(" ")
            elif ct is None:
                line.append("▄", style=cb)
            elif cb is None:
                line.append("▀", style=ct)
            else:
                line.append("▀", style=f"{ct} on {cb}")
        lines.append(line)
    return lines


# -- one head ---------------------------------------------------------------------------------


def _pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def permutation_phrase(stats) -> str:
    """'permutation helped: +2.1 pts recall vs plain selection (95.0%) at density 31.2%' or similar."""
    if stats.recall_gain is None:
        return "permutation: not compared (off, or shorter than one segment)"
    gain_pts = 100 * stats.recall_gain
    return (f"permutation {stats.verdict}: {gain_pts:+.1f} pts recall vs plain selection "
            f"({_pct(stats.noperm_recall)}) at density {_pct(stats.noperm_density)}")


def numbers_line(stats) -> str:
    return (f"density {_pct(stats.density)} · recall {_pct(stats.recall)} · "
            f"forced-only rows {stats.forced_only_rows}/{stats.rows_with_choice}")


def title_parts(view, source: str) -> list[str]:
    s, c = view.stats, view.config
    where = (f"layer {s.layer} head {s.head}/{view.heads_total}" if s.layer is not None
             else f"head {s.head}/{view.heads_total}")
    n_b = view.kept.shape[0]
    return [source, where, f"N={view.seq_len} d={view.head_dim}",
            f"{n_b} block{'' if n_b == 1 else 's'} of {c.block_size}, segments of {c.segment_size}",
            f"τ={c.threshold:g}"]


def head_title(view, source: str) -> str:
    return " · ".join(title_parts(view, source))


def fit_parts(parts: Sequence[str | Text], width: int, sep: str = " · ") -> list[Text]:
    """Join ``parts`` with ``sep`` into as few lines of at most ``width`` cells as possible
    (a part longer than ``width`` gets a line of its own). Styled parts keep their styles."""
    from rich.cells import cell_len

    lines: list[Text] = []
    for part in parts:
        part = part if isinstance(part, Text) else Text(part)
        if lines and cell_len(lines[-1].plain) + len(sep) + cell_len(part.plain) <= width:
            lines[-1].append(sep)
            lines[-1].append_text(part)
        else:
            lines.append(part.copy())
    return lines


def render_head(view, width: int, color: bool, source: str = "synthetic") -> RenderableType:
    """Header, three panels side by side (original, permuted, kept), legend. Fits ``width`` columns."""
    n_b = view.kept.shape[0]
    panel_cols = max(4, (width - 2 * PANEL_GAP) // 3)
    f = downsample_factor(n_b, panel_cols)
    orig, causal = downsample_mass(view.original, f)
    perm, _ = downsample_mass(view.permuted, f)
    vmax = float(np.nanmax(np.concatenate([orig.ravel(), perm.ravel()]))) if n_b else 1.0
    kept_frac, forced_share, mcausal = downsample_mask(view.kept, view.forced, f)
    panels = [
        ("original order", heatmap_cells(log_scale(orig, vmax))),
        ("permuted", heatmap_cells(log_scale(perm, vmax))),
        ("kept", mask_cells(kept_frac, forced_share, mcausal)),
    ]
    grid = Table.grid(padding=(0, PANEL_GAP))
    for _ in panels:
        grid.add_column(no_wrap=True, overflow="crop")
    cols = orig.shape[1]
    titles = [Text(t[: max(cols, 8)], style="bold" if color else "") for t, _ in panels]
    grid.add_row(*titles)
    bodies = [Text("\n").join(cells_to_lines(cells, color)) for _, cells in panels]
    grid.add_row(*bodies)
    scale = f"1 cell = {f}×{f} blocks" if f > 1 else "1 cell = 1 block"
    if color:
        legend = [
            Text.assemble("mass ", *[("█", colour(x)) for x in np.linspace(0, 1, 8)],
                          f" 1e-{DECADES}…1 × max (log)"),
            Text.assemble("kept ", ("█", KEPT_FORCED), " forced ", ("█", KEPT_SELECTED), " selected ",
                          ("█", SKIPPED_TERM), " skipped"),
        ]
    else:
        legend = [Text(f"mass {PLAIN_RAMP} 1e-{DECADES}…1 × max (log)"), Text("kept █ / skipped ░")]
    style = "bold" if color else ""
    header = fit_parts(title_parts(view, source), width)
    for line in header:
        line.stylize(style)
    verdict, _, versus = permutation_phrase(view.stats).partition(" vs ")
    numbers = fit_parts(numbers_line(view.stats).split(" · ") + [verdict] + ([f"vs {versus}"] if versus else []),
                        width)
    tail = fit_parts([*legend, scale, "rows: query blocks, columns: key blocks"], width)
    return Group(*header, *numbers, grid, *tail)


# -- many heads -------------------------------------------------------------------------------


def _grid_shape(stats: Sequence) -> tuple[list, list]:
    layers = sorted({s.layer for s in stats}, key=lambda x: -1 if x is None else x)
    heads = sorted({s.head for s in stats})
    return layers, heads


_ARROW = {"helped": "▲", "hurt": "▼", "neutral": "·", "n/a": " "}


def _recall_colour(recall: float) -> str:
    # 0.8 and below red, 1.0 green
    t = min(1.0, max(0.0, (recall - 0.8) / 0.2))
    return _blend("#d62728", "#2ca02c", t)


def render_overview(stats: Sequence, width: int, color: bool) -> RenderableType:
    """Per-layer × per-head density grid: '31▲' = density 31%, permutation helped (▼ hurt, · neutral).

    Colour mode colours each cell by recall (red <= 80%, green 100%). Too many heads for ``width``:
    one character per head (density ramp ``░▒▓█``)."""
    layers, heads = _grid_shape(stats)
    by = {(s.layer, s.head): s for s in stats}
    compact = 6 + len(heads) * 4 > width
    table = Table.grid(padding=(0, 0 if compact else 1))
    table.add_column(justify="right", no_wrap=True)
    for _ in heads:
        table.add_column(justify="right", no_wrap=True)
    label = "layer" if layers != [None] else ""
    if compact:
        table.add_row(Text(label + " "), *[Text(str(h % 10)) for h in heads])
    else:
        table.add_row(Text(label), *[Text(f"h{h}", style="bold" if color else "") for h in heads])
    for layer in layers:
        row = [Text("" if layer is None else f"{layer} ")]
        for h in heads:
            s = by.get((layer, h))
            if s is None:
                row.append(Text(" "))
                continue
            style = _recall_colour(s.recall) if color else ""
            if compact:
                ch = PLAIN_RAMP[min(3, int(s.density * 4))]
                row.append(Text(ch, style=style))
            else:
                row.append(Text(f"{100 * s.density:.0f}{_ARROW[s.verdict]}", style=style))
        table.add_row(*row)
    dens = np.array([s.density for s in stats])
    rec = np.array([s.recall for s in stats])
    counts = {v: sum(1 for s in stats if s.verdict == v) for v in ("helped", "hurt", "neutral")}
    worst = sorted(stats, key=lambda s: s.recall)[:3]
    name = lambda s: (f"L{s.layer}" if s.layer is not None else "") + f"H{s.head}"  # noqa: E731
    worst_txt = ", ".join(f"{name(s)} {_pct(s.recall)}" for s in worst)
    compared = sorted((s for s in stats if s.recall_gain is not None), key=lambda s: s.recall_gain)
    extremes = []
    if compared and compared[0].verdict == "hurt":
        extremes.append("most hurt " + ", ".join(f"{name(s)} {100 * s.recall_gain:+.1f} pts"
                                                 for s in compared[:3] if s.verdict == "hurt"))
    if compared and compared[-1].verdict == "helped":
        extremes.append("most helped " + ", ".join(f"{name(s)} {100 * s.recall_gain:+.1f} pts"
                                                   for s in compared[::-1][:3] if s.verdict == "helped"))
    parts = [f"{len(stats)} heads",
             f"density mean {_pct(dens.mean())} (min {_pct(dens.min())}, max {_pct(dens.max())})",
             f"recall mean {_pct(rec.mean())}", f"lowest recall {worst_txt}",
             f"permutation at equal density: helped {counts['helped']} ▲, hurt {counts['hurt']} ▼, "
             f"neutral {counts['neutral']} ·"]
    key = ("cells: density % per head" + ("; colour = recall (red ≤ 80%, green 100%)" if color else "")
           if not compact
           else f"cells: density {PLAIN_RAMP} (0-25-50-75-100%)" + ("; colour = recall" if color else ""))
    lines = fit_parts(parts, width)
    for e in extremes:
        lines += fit_parts(e.split(", "), width, sep=", ")
    return Group(table, *lines, *fit_parts([key], width))


# -- output -----------------------------------------------------------------------------------


def use_color(console: Console, plain: bool = False) -> bool:
    """Colour half-blocks unless asked plain, NO_COLOR is set, or the output is not a colour terminal."""
    return (not plain and console.is_terminal and not console.no_color and console.color_system is not None
            and not os.environ.get("NO_COLOR"))


def export_html(renderables: Sequence[RenderableType], width: int, title: str) -> str:
    """HTML of the renderables in true colour (Rich's export), whatever the current terminal."""
    rec = Console(record=True, file=io.StringIO(), force_terminal=True, color_system="truecolor", width=width)
    for r in renderables:
        rec.print(r)
    return rec.export_html(inline_styles=True, code_format=_HTML_PAGE.replace("{title}", title))


_HTML_PAGE = """<!DOCTYPE html>
<html><head><meta charset="UTF-8"><title>{title}</title>
<style>body {{ background: {background}; color: {foreground}; }}
pre {{ font-family: Menlo, 'DejaVu Sans Mono', Consolas, monospace; line-height: 1.0; }}</style>
</head><body><pre><code>{code}</code></pre></body></html>
"""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` via a temporary file in the target directory and a rename (``reports``' writer)."""
    from ..engine.reports import atomic_write_bytes as write

    write(path, data)


def _figure_bytes(fig, fmt: str) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=150, bbox_inches="tight",
                metadata={"Software": "pbs viz-mask"} if fmt == "png" else None)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def head_figure(view, source: str = "synthetic"):
    """matplotlib Figure: original and permuted block mass (log colour bar) and the kept mask."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap, LogNorm
    from matplotlib.patches import Patch

    n_b = view.kept.shape[0]
    causal = causal_mask(n_b)
    vmax = float(max(view.original[causal].max(), view.permuted[causal].max()))
    norm = LogNorm(vmin=vmax * 10.0**-DECADES, vmax=vmax, clip=True)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.6), constrained_layout=True)
    extent = (-0.5, n_b - 0.5, n_b - 0.5, -0.5)
    per_seg = view.config.segment_size // view.config.block_size
    for ax, data, name in ((axes[0], view.original, "block attention mass, original key order"),
                           (axes[1], view.permuted, "after segment permutation (plan layout)")):
        img = ax.imshow(np.ma.masked_where(~causal, np.maximum(data, vmax * 1e-9)), cmap=cmap, norm=norm,
                        interpolation="nearest", extent=extent)
        ax.set_title(name, fontsize=11)
    cbar = fig.colorbar(img, ax=axes[:2], shrink=0.85, pad=0.01)
    cbar.set_label("mean attention mass per block (log)")
    codes = np.where(~causal, 0, np.where(~view.kept, 1, np.where(view.forced, 2, 3)))
    mcmap = ListedColormap(["white", SKIPPED_FIG, KEPT_FORCED, KEPT_SELECTED])
    axes[2].imshow(codes, cmap=mcmap, vmin=-0.5, vmax=3.5, interpolation="nearest", extent=extent)
    axes[2].set_title(f"kept blocks, plan layout (density {_pct(view.stats.density)})", fontsize=11)
    axes[2].legend(handles=[Patch(color=KEPT_FORCED, label="kept: forced (diagonal segment, sink)"),
                            Patch(color=KEPT_SELECTED, label="kept: selected by score"),
                            Patch(color=SKIPPED_FIG, label="skipped")],
                   loc="upper right", fontsize=8, framealpha=0.9)
    for ax, xlabel in zip(axes, ("key block", "key block (plan layout)", "key block (plan layout)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("query block")
        if n_b // max(1, per_seg) <= 40:
            for b in range(per_seg, n_b, per_seg):
                ax.axvline(b - 0.5, color="black", lw=0.3, alpha=0.25)
                ax.axhline(b - 0.5, color="black", lw=0.3, alpha=0.25)
    s = view.stats
    fig.suptitle(head_title(view, source) + "\n" + numbers_line(s) + " · " + permutation_phrase(s), fontsize=11)
    return fig


def overview_figure(stats: Sequence, title: str):
    """matplotlib Figure: layer × head grids of density, recall and recall gain from the permutation."""
    plt = _pyplot()

    layers, heads = _grid_shape(stats)
    shape = (len(layers), len(heads))
    grids = {name: np.full(shape, np.nan) for name in ("density", "recall", "gain")}
    for s in stats:
        i, j = layers.index(s.layer), heads.index(s.head)
        grids["density"][i, j] = s.density
        grids["recall"][i, j] = s.recall
        grids["gain"][i, j] = np.nan if s.recall_gain is None else 100 * s.recall_gain  # points
    panel_w = 1.6 + 0.42 * len(heads)
    fig, axes = plt.subplots(1, 3, figsize=(3 * panel_w + 1.0, 2.2 + 0.28 * len(layers)), constrained_layout=True,
                             squeeze=False)
    axes = axes[0]
    lim = np.nanmax(np.abs(grids["gain"])) if np.isfinite(grids["gain"]).any() else 1.0
    specs = (("density", "density (kept / causal blocks)", "viridis", 0, 1),
             ("recall", "attention mass recall", "RdYlGn", min(0.8, np.nanmin(grids["recall"])), 1),
             ("gain", "recall gain from permutation at equal density (pts)", "RdBu", -max(lim, 0.1), max(lim, 0.1)))
    for ax, (key, name, cmap, lo, hi) in zip(axes, specs):
        img = ax.imshow(grids[key], cmap=cmap, vmin=lo, vmax=hi, aspect="auto", interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(len(heads)), [str(h) for h in heads])
        ax.set_yticks(range(len(layers)), ["-" if x is None else str(x) for x in layers])
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(img, ax=ax, shrink=0.9)
        if shape[0] * shape[1] <= 120:
            for (i, j), v in np.ndenumerate(grids[key]):
                if np.isfinite(v):
                    ax.text(j, i, f"{100 * v:.0f}" if key != "gain" else f"{v:+.1f}", ha="center",
                            va="center", fontsize=7, color="black")
    fig.suptitle(title, fontsize=11)
    return fig


def save_figure(fig, path: Path, fmt: str) -> None:
    """Render ``fig`` as ``fmt`` ('png' or 'svg') and write it atomically; closes the figure."""
    plt = _pyplot()
    try:
        data = _figure_bytes(fig, fmt)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, data)


def overview_caption(title: str, meta: dict, config) -> str:
    """One line for a multi-head picture: source, length, block/segment size, threshold."""
    return (f"{title} · N={meta['shape']['seq_len']} tokens · blocks of {config.block_size}, "
            f"segments of {config.segment_size} · τ={config.threshold:g}")


def overview_title(title: str, meta: dict, config, color: bool) -> Text:
    return Text(overview_caption(title, meta, config), style="bold" if color else "")
