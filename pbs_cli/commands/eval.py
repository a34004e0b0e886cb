"""`pbs eval DOC`: what sparsity costs. Dense vs PBS vs plain block selection vs the published PBS-Attn
on the same tokens: perplexity, top-1 agreement, mean KL, density and attention recall per layer; a
threshold sweep (density-fidelity table, Pareto PNG); `--passkey` retrieval accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import command_boundary
from ..errors import UsageError
from ..options import DEFAULT_MODEL, Device, Dtype, Force, Json, Model, RecordOutput, check_outputs


def parse_thresholds(text: str | None) -> list[float | None]:
    """--thresholds: None (the option not given) = the profile's threshold alone; else the sweep."""
    if text is None:
        return [None]
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"invalid --thresholds {text!r}; use comma-separated numbers in (0, 1], "
                         "e.g. 0.8,0.9,0.95") from None
    if not values:
        raise UsageError(f"no thresholds in --thresholds {text!r}; pass numbers in (0, 1] such as 0.8,0.9,0.95, "
                         "or leave the option out for the profile's threshold")
    if any(not 0.0 < v <= 1.0 for v in values):
        raise UsageError(f"--thresholds must be numbers in (0, 1], got {text!r}")
    return values


def parse_fractions(text: str, name: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise UsageError(f"invalid {name} {text!r}; use comma-separated fractions in [0, 1], e.g. 0.1,0.5,0.9")
    return values


@command_boundary
def command(
    doc: Annotated[str, typer.Argument(help="UTF-8 text file (real text; - reads stdin). With --passkey, the "
                                       "filler document.", show_default=False)],
    model: Model = DEFAULT_MODEL,
    profile: Annotated[str | None, typer.Option("--profile", "-p", help="PBS preset to evaluate (default: the "
                                                "alias's, else 'default').")] = None,
    thresholds: Annotated[str | None, typer.Option("--thresholds", help="Sweep: comma-separated thresholds, e.g. "
                                                   "0.8,0.9,0.95 (each strategy at each; what tau means follows "
                                                   "each config's threshold_scope, so compare rows by "
                                                   "density).")] = None,
    max_tokens: Annotated[str | None, typer.Option("--max-tokens", help="Use the first N tokens (e.g. 4k; "
                                                   "default: the model's context).")] = None,
    recall_rows: Annotated[int, typer.Option("--recall-rows", min=0, help="Query rows per layer sampled for "
                                             "attention recall (0 = skip).")] = 64,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="Also print density and recall of every "
                                            "layer (mean and lowest head).")] = False,
    continuation: Annotated[int | None, typer.Option("--continuation", min=0, help="Prefill-then-continue: "
                                                     "prefill all but the last N tokens with each strategy, then "
                                                     "score those N with dense attention over the KV cache that "
                                                     "prefill made, against the same after a dense prefill "
                                                     "(default: the last eighth, at most 1024 tokens; 0 skips "
                                                     "it). The selection never sees the scored tokens.")] = None,
    passkey: Annotated[bool, typer.Option("--passkey", help="Passkey retrieval instead: dense vs PBS accuracy "
                                          "with greedy generation.")] = False,
    lengths: Annotated[str, typer.Option("--lengths", help="Passkey prompt lengths (default: 1k up to the "
                                         "model's context, doubling).")] = "",
    depths: Annotated[str, typer.Option("--depths", help="Passkey depths as fractions.")] = "0.1,0.5,0.9",
    trials: Annotated[int, typer.Option("--trials", min=1, help="Random keys per length and depth.")] = 2,
    device: Device = "auto",
    dtype: Dtype = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Random seed (passkeys).")] = 0,
    png: Annotated[Path | None, typer.Option("--png", help="Save a density-fidelity Pareto plot here.")] = None,
    as_json: Json = False,
    output: RecordOutput = None,
    force: Force = False,
) -> None:
    """Dense vs PBS vs plain block selection vs published PBS-Attn on DOC: perplexity, top-1 agreement, KL, recall.

    Two views of fidelity. Teacher-forced: every position's next-token prediction after one sparse
    forward over DOC, against dense attention on the same tokens; the selection of a position's block
    has seen later tokens of that block (the permutation is scored by the last query block, block
    scores pool or sample later rows), so it can look better than a real prefill. Continued
    (--continuation): all but the last tokens prefilled sparse, the rest scored with dense attention
    over that KV cache; nothing the selection saw comes after the prefix, as when a user generates
    or appends after a prefill. --thresholds sweeps the density-fidelity trade-off, --passkey tests
    retrieval."""
    check_outputs({"--output": output, "--png": png}, force)
    sweep = parse_thresholds(thresholds)
    depth_list = parse_fractions(depths, "--depths")
    from ..engine import evaluation
    from ..engine.sizes import parse_size

    request = evaluation.EvalRequest(
        doc=doc, model=model, profile=profile, thresholds=tuple(sweep),
        max_tokens=parse_size(max_tokens) if max_tokens else None, recall_rows=recall_rows,
        continuation=continuation, passkey=passkey, lengths=lengths, depths=tuple(depth_list), trials=trials,
        device=device, dtype=dtype, seed=seed)
    rec = evaluation.run(request)
    from ..render.evaluation import deliver

    deliver(rec, as_json, output, png, per_layer)
