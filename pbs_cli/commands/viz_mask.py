"""`pbs viz-mask`: see the permuted block masks, in the terminal and as pictures.

Without a document it draws a structured synthetic workload at once (no model load). With a
document it runs the model over it, captures the chosen layers' post-RoPE q/k and plans them with
the PBS parameters. Numbers beside the picture: density, attention-mass recall, query blocks that
kept only forced blocks, and whether the permutation helped or hurt the head at equal density.
"""

# No `from __future__ import annotations` here: Typer would evaluate the string annotations of the
# 23 options several times per run (about 80 ms of a two-second budget).

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import console
from ..console import command_boundary
from ..options import DEFAULT_MODEL, BlockSize, Device, Dtype, Force, Model, SegmentSize, Threshold


@command_boundary
def command(
    document: Annotated[Optional[str], typer.Argument(
        help="UTF-8 text file to run through the model (- reads stdin). Omit it for a synthetic example "
             "(no model load).", show_default=False)] = None,
    model: Model = DEFAULT_MODEL,
    layer: Annotated[Optional[int], typer.Option("--layer", help="Layer to show (default: the middle layer).",
                                                 show_default=False)] = None,
    head: Annotated[Optional[int], typer.Option("--head", help="Query head to show (default 0).",
                                                show_default=False)] = None,
    layers: Annotated[Optional[str], typer.Option("--layers", help="Several layers: 'all' or ranges like 0-3,8 "
                                                  "(summary grid).", show_default=False)] = None,
    heads: Annotated[Optional[str], typer.Option("--heads", help="Several heads: 'all' or ranges like 0-3,8 (summary "
                                                 "grid).", show_default=False)] = None,
    seq_len: Annotated[Optional[str], typer.Option("--seq-len", help="Tokens: synthetic length (default 4k) or the DOC "
                                                   "prefix to use (default: all, up to the model's positions).",
                                                   show_default=False)] = None,
    pattern: Annotated[str, typer.Option("--pattern", help="Synthetic pattern: mixed, sink, local, vertical, slash, "
                                         "topic, uniform.")] = "mixed",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the synthetic workload.")] = 0,
    profile: Annotated[Optional[str], typer.Option("--profile", help="PBS preset (default: the model's, else "
                                                   "'default').", show_default=False)] = None,
    threshold: Threshold = None,
    block_size: BlockSize = None,
    segment_size: SegmentSize = None,
    permute: Annotated[Optional[bool], typer.Option("--permute/--no-permute", help="Permute keys inside segments "
                                                    "(default: the profile's).", show_default=False)] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    png: Annotated[Optional[Path], typer.Option("--png", help="Also write the panels as a PNG.",
                                                show_default=False)] = None,
    svg: Annotated[Optional[Path], typer.Option("--svg", help="Also write the panels as an SVG.",
                                                show_default=False)] = None,
    html: Annotated[Optional[Path], typer.Option("--html", help="Also write the terminal picture as HTML.",
                                                 show_default=False)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the numbers as JSON instead of the picture.")] = False,
    force: Force = False,
    plain: Annotated[bool, typer.Option("--plain", help="Plain █░ characters, no colour (also with NO_COLOR or a "
                                        "non-terminal).")] = False,
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

        from ..engine import mask_views
        from ..engine.sizes import parse_size
        from ..options import check_outputs
        from ..render.mask_outputs import deliver

    files = {option[2:]: path for option, path in
             check_outputs({"--png": png, "--svg": svg, "--html": html}, force).items()}
    pbs_overrides = dict(threshold=threshold, block_size=block_size, segment_size=segment_size, permute=permute)
    request = mask_views.VizRequest(
        document=document, model=model, layer=layer, head=head, layers=layers, heads=heads,
        n_tokens=parse_size(seq_len) if seq_len is not None else None, pattern=pattern, seed=seed, profile=profile,
        overrides=tuple(pbs_overrides.items()), device=device, dtype=dtype)
    deliver(mask_views.run(request), json_out, plain, files)
