"""`pbs viz-mask`: see the permuted block masks, in the terminal and as pictures.

Without a document it draws a structured synthetic workload at once (no model load). With a
document it runs the model over it, captures the chosen layers' post-RoPE q/k and plans them with
the PBS parameters. Numbers beside the picture: density, attention-mass recall, query blocks that
kept only forced blocks, and whether the permutation helped or hurt the head at equal density.
"""

# No `from __future__ import annotations` here: Typer would evaluate the string annotations of the
# 23 options several times per run (about 80 ms of a two-second budget).

import contextlib
import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import console
from ..console import command_boundary
from ..errors import OutOfMemory, UsageError
from ..options import Device, Dtype, Force

SYNTHETIC_HEADS = 4
SYNTHETIC_KV_HEADS = 1
SYNTHETIC_HEAD_DIM = 64
SYNTHETIC_SEQ_LEN = 4096
MAX_PANEL_WIDTH = 160  # wider terminals get the panels at this width (more columns add nothing)


def parse_indices(text: str, count: int, what: str) -> list[int]:
    """'all', '3', '0-3,8' -> sorted unique indices in [0, count). UsageError names the valid range."""
    spec = text.strip().lower()
    if spec == "all":
        return list(range(count))
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise UsageError(f"invalid {what} selection {text!r}: use 'all', an index, or ranges like 0-3,8")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise UsageError(f"invalid {what} range {part!r}: the end must be >= the start")
        for i in (lo, hi):
            if i >= count:
                raise UsageError(f"{what} {i} out of range: there are {count} {what}s (0-{count - 1})")
        out.update(range(lo, hi + 1))
    if not out:
        raise UsageError(f"no {what}s in {text!r}")
    return sorted(out)


def _selection(single: int | None, multi: str | None, count: int, what: str, default: int) -> list[int]:
    if single is not None and multi is not None:
        raise UsageError(f"pass --{what} or --{what}s, not both")
    if multi is not None:
        return parse_indices(multi, count, what)
    index = default if single is None else single
    if not 0 <= index < count:
        raise UsageError(f"{what} {index} out of range: there are {count} {what}s (0-{count - 1})")
    return [index]


def check_memory(n_tokens: int, block_size: int, heads: int, layers: int, input_bytes: int, device: str) -> None:
    """Refuse (exit 4) an analysis that cannot fit before it starts: its (N/B)^2 block matrices live in host
    memory, the inputs (q/k, or the model forward) on ``device``."""
    import torch

    from ..engine.mask_analysis import analysis_bytes
    from ..engine.memory import free_memory_bytes, gib

    host = analysis_bytes(n_tokens, block_size, heads, layers)
    dev = torch.device(device)
    needs = [(host + (0 if dev.type == "cuda" else input_bytes), torch.device("cpu"))]
    if dev.type == "cuda":
        needs.append((input_bytes, dev))
    for need, where in needs:
        free = free_memory_bytes(where)
        if need > 0.9 * free:
            raise OutOfMemory(f"{n_tokens} tokens in {block_size}-token blocks need ~{gib(need)} for the mask "
                              f"analysis, {gib(free)} free on {where.type}; try a shorter --seq-len, fewer "
                              "--heads/--layers or a larger --block-size")


@command_boundary
def command(
    document: Annotated[Optional[str], typer.Argument(
        help="UTF-8 text file to run through the model (- reads stdin). Omit it for a synthetic example "
             "(no model load).", show_default=False)] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="Model for DOC: alias, local dir, .gguf file or HF id.")] = "llama",
    layer: Annotated[Optional[int], typer.Option("--layer", help="Layer to show (default: the middle layer).", show_default=False)] = None,
    head: Annotated[Optional[int], typer.Option("--head", help="Query head to show (default 0).", show_default=False)] = None,
    layers: Annotated[Optional[str], typer.Option("--layers", help="Several layers: 'all' or ranges like 0-3,8 (summary grid).", show_default=False)] = None,
    heads: Annotated[Optional[str], typer.Option("--heads", help="Several heads: 'all' or ranges like 0-3,8 (summary grid).", show_default=False)] = None,
    seq_len: Annotated[Optional[str], typer.Option("--seq-len", help="Tokens: synthetic length (default 4k) or the DOC prefix to use (default: all, up to the model's positions).", show_default=False)] = None,
    pattern: Annotated[str, typer.Option("--pattern", help="Synthetic pattern: mixed, sink, local, vertical, slash, topic, uniform.")] = "mixed",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the synthetic workload.")] = 0,
    profile: Annotated[Optional[str], typer.Option("--profile", help="PBS preset (default: the model's, else 'default').", show_default=False)] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Top-p share of block attention to keep, in (0, 1].", show_default=False)] = None,
    block_size: Annotated[Optional[int], typer.Option("--block-size", help="Tokens per block (power of two >= 16).", show_default=False)] = None,
    segment_size: Annotated[Optional[int], typer.Option("--segment-size", help="Permutation segment (multiple of the block size).", show_default=False)] = None,
    permute: Annotated[Optional[bool], typer.Option("--permute/--no-permute", help="Permute keys inside segments (default: the profile's).", show_default=False)] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    png: Annotated[Optional[Path], typer.Option("--png", help="Also write the panels as a PNG.", show_default=False)] = None,
    svg: Annotated[Optional[Path], typer.Option("--svg", help="Also write the panels as an SVG.", show_default=False)] = None,
    html: Annotated[Optional[Path], typer.Option("--html", help="Also write the terminal picture as HTML.", show_default=False)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the numbers as JSON instead of the picture.")] = False,
    force: Force = False,
    plain: Annotated[bool, typer.Option("--plain", help="Plain █░ characters, no colour (also with NO_COLOR or a non-terminal).")] = False,
) -> None:
    """Show block attention mass before and after the segment permutation, and the blocks PBS keeps.

    Without DOC: a structured synthetic example, drawn at once (no model). With DOC: a forward of
    --model over it, planned with the PBS parameters. Beside the picture: density, attention-mass
    recall, query blocks that kept only forced blocks, and the recall gain of the permutation over
    plain block selection at equal density.

    Examples:

    pbs viz-mask

    pbs viz-mask doc.txt --model llama --layer 10 --head 2 --png out.png

    pbs viz-mask doc.txt --layers all --heads all --json
    """
    with console.heavy_imports():
        import torch  # noqa: F401 - imported here, under heavy_imports, by whichever module needs it first

        from ..engine import presets, reports
        from ..render import viz
        from ..options import check_outputs
        from ..engine.sizes import parse_size

    outputs = {option[2:]: path for option, path in
               check_outputs({"--png": png, "--svg": svg, "--html": html}, force).items()}
    n_tokens = parse_size(seq_len) if seq_len is not None else None
    pbs_overrides = dict(threshold=threshold, block_size=block_size, segment_size=segment_size, permute=permute)

    if document is None:
        if layer is not None or layers is not None:
            raise UsageError("the synthetic example has no layers; pass a DOC to choose --layer/--layers")
        from ..engine.workloads import PATTERNS

        if pattern not in PATTERNS:
            raise UsageError(f"unknown --pattern {pattern!r}; use one of {', '.join(PATTERNS)}")
        config, profile_name = presets.resolve_config(profile, **pbs_overrides)
        head_ids = _selection(head, heads, SYNTHETIC_HEADS, "head", 0)
        n = n_tokens or SYNTHETIC_SEQ_LEN
        check_memory(n, config.block_size, len(head_ids), 1,
                     (SYNTHETIC_HEADS + 2 * SYNTHETIC_KV_HEADS) * n * SYNTHETIC_HEAD_DIM * 4, _device(device))
        source = f"synthetic {pattern} (seed {seed})"
        views, meta = _synthetic(config, head_ids, n, pattern, seed, device, dtype)
    else:
        from ..engine.documents import read_document

        text, doc_name = read_document(document)
        views, meta, config, profile_name = _from_model(text, model, profile, pbs_overrides, layer, layers, head,
                                                        heads, n_tokens, device, dtype)
        source = f"{Path(doc_name).name} · {meta['model']['name']}"

    stats = [v.stats for v in views]
    record = dict(source=source, profile=profile_name, pbs=config.to_dict(), **meta,
                  heads=[s.to_dict() for s in stats])
    width = min(console.out.width, MAX_PANEL_WIDTH)
    single = len(views) == 1
    title = f"pbs viz-mask · {source}"

    def renderables(color: bool, w: int):
        if single:
            return [viz.render_head(views[0], w, color, source)]
        return [viz.overview_title(title, meta, config, color), viz.render_overview(stats, w, color)]

    if json_out:
        console.out.print_json(reports.to_json(reports.envelope("viz-mask", **record)))
    else:
        color = viz.use_color(console.out, plain)
        for r in renderables(color, width):
            console.out.print(r)
    for fmt, path in outputs.items():
        if fmt == "html":
            reports.atomic_write_text(path, viz.export_html(renderables(True, 120), 120, title))
        else:
            fig = viz.head_figure(views[0], source) if single else viz.overview_figure(stats, viz.overview_caption(title, meta, config))
            viz.save_figure(fig, path, fmt)
        console.err.print(f"wrote {path}", highlight=False)


def _device(device: str) -> str:
    from ..engine.models import resolve_device

    return resolve_device(device)


def _synthetic(config, head_ids: list[int], n: int, pattern: str, seed: int, device: str, dtype: str):
    from ..engine import mask_analysis, models
    from ..engine.workloads import synthetic_qkv

    dev = models.resolve_device(device)
    torch_dtype = models.resolve_dtype(dtype, dev)
    q, k, _ = synthetic_qkv(1, SYNTHETIC_HEADS, SYNTHETIC_KV_HEADS, n, SYNTHETIC_HEAD_DIM, seed=seed, pattern=pattern,
                            device=dev, dtype=torch_dtype)
    views = mask_analysis.analyze(q, k, config, head_ids)
    meta = {"shape": {"heads": SYNTHETIC_HEADS, "kv_heads": SYNTHETIC_KV_HEADS, "seq_len": n,
                      "head_dim": SYNTHETIC_HEAD_DIM}, "device": dev, "dtype": str(torch_dtype).removeprefix("torch."),
            "workload": {"kind": "synthetic", "pattern": pattern, "seed": seed}}
    return views, meta


def _from_model(text: str, model_spec: str, profile, overrides, layer, layers, head, heads, n_tokens, device, dtype):
    from ..engine import mask_analysis, models, presets
    from ..engine.workloads import captured_qkv

    models.quiet_transformers(console.debug_enabled())
    spec = models.resolve_model(model_spec)
    config, profile_name = presets.resolve_config(profile or spec.profile, **overrides)
    source = models.ModelSource(spec)
    cfg = source.config()
    n_layers = int(cfg.num_hidden_layers)
    n_heads = int(cfg.num_attention_heads)
    layer_ids = _selection(layer, layers, n_layers, "layer", n_layers // 2)
    head_ids = _selection(head, heads, n_heads, "head", 0)
    dev = models.resolve_device(device)
    torch_dtype = models.resolve_dtype(dtype, dev)
    tokens = source.tokenizer()(text, return_tensors="pt", add_special_tokens=True)["input_ids"]
    limit = n_tokens or source.max_positions() or tokens.shape[1]
    tokens = tokens[:, :limit]
    n, hidden = int(tokens.shape[1]), int(getattr(cfg, "hidden_size", n_heads * 64))
    kv_heads, head_dim = int(getattr(cfg, "num_key_value_heads", n_heads)), hidden // n_heads
    # the forward's activations (a few hidden-size copies, fp32 at most) and the captured q/k/v of each layer
    inputs = n * (8 * hidden + len(layer_ids) * (n_heads + 2 * kv_heads) * head_dim) * 4
    check_memory(n, config.block_size, len(head_ids), len(layer_ids), inputs, dev)
    console.err.print(f"model: {spec.describe()} · {tokens.shape[1]} tokens · layers {_ranges(layer_ids)} · "
                      f"heads {_ranges(head_ids)}", highlight=False)
    loaded = source.load(torch_dtype, dev, attn_implementation="sdpa")
    with models.progress(f"running {spec.name} over {tokens.shape[1]} tokens"):
        captured = captured_qkv(loaded.model, tokens.to(loaded.device), layer_ids)
    views = []
    with _layer_progress(len(layer_ids), len(head_ids)) as advance:
        for li in layer_ids:
            q, k, _ = captured.pop(li)
            views.extend(mask_analysis.analyze(q, k, config, head_ids, layer=li))
            advance()
    meta = {"shape": {"layers": n_layers, "heads": n_heads, "kv_heads": int(getattr(cfg, "num_key_value_heads", n_heads)),
                      "seq_len": int(tokens.shape[1]), "head_dim": views[0].head_dim},
            "model": spec.to_dict(), "device": dev, "dtype": str(torch_dtype).removeprefix("torch."),
            "workload": {"kind": "document", "tokens": int(tokens.shape[1])}}
    return views, meta, config, profile_name


@contextlib.contextmanager
def _layer_progress(n_layers: int, n_heads: int):
    """A Rich progress bar on stderr (terminal only) advanced once per analysed layer."""
    if not console.err.is_terminal or n_layers == 1:
        with contextlib.nullcontext():
            yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(f"planning and measuring {n_heads} head(s) per layer"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=console.err, transient=True) as bar:
        task = bar.add_task("layers", total=n_layers)
        yield lambda: bar.advance(task)


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts, start = [], None
    for i, x in enumerate(ids):
        if start is None:
            start = x
        if i + 1 == len(ids) or ids[i + 1] != x + 1:
            parts.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(parts)
