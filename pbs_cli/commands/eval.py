"""`pbs eval DOC`: what sparsity costs. Dense vs PBS vs plain block selection vs the published PBS-Attn
on the same tokens: perplexity, top-1 agreement, mean KL, density and attention recall per layer; a
threshold sweep (density-fidelity table, Pareto PNG); `--passkey` retrieval accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..engine import models, presets, reports
from ..console import command_boundary, debug_enabled, err
from ..errors import UsageError
from ..options import Device, Dtype, Force, Json, Model, RecordOutput, check_outputs
from ..engine.sizes import parse_size, parse_sizes
from ..engine.documents import read_document
from ..engine.models import DEFAULT_MODEL
from ..render.evaluation import print_layers, print_passkey, print_table, save_png


def parse_thresholds(text: str | None) -> list[float | None]:
    """--thresholds: None (the option not given) = the profile's threshold alone; else the sweep."""
    if text is None:
        return [None]
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"invalid --thresholds {text!r}; use comma-separated numbers in (0, 1], e.g. 0.8,0.9,0.95") from None
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


# -- the command ----------------------------------------------------------------------------


@command_boundary
def command(
    doc: Annotated[str, typer.Argument(help="UTF-8 text file (real text; - reads stdin). With --passkey, the "
                                       "filler document.", show_default=False)],
    model: Model = DEFAULT_MODEL,
    profile: Annotated[str | None, typer.Option("--profile", "-p", help="PBS preset to evaluate (default: the "
                                                "alias's, else 'default').")] = None,
    thresholds: Annotated[str | None, typer.Option("--thresholds", help="Sweep: comma-separated thresholds, e.g. "
                                                   "0.8,0.9,0.95 (each strategy at each; what tau means follows "
                                                   "each config's threshold_scope, so compare rows by density).")] = None,
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
    dev = models.resolve_device(device)
    # the profile `pbs prefill` would run on this device (on CUDA an unchosen default may become `gpu`)
    config, profile_name = presets.resolve_config(profile, device=dev)
    torch_dtype = models.resolve_dtype(dtype, dev)
    depth_list = parse_fractions(depths, "--depths")
    limit = parse_size(max_tokens) if max_tokens else None
    text, doc_name = read_document(doc)
    spec = models.resolve_model(model)
    if profile is None and spec.profile and spec.profile != profile_name:
        config, profile_name = presets.resolve_config(spec.profile, device=dev, explicit=False)
    err.print(f"model: {spec.describe()}", highlight=False, markup=False)

    import torch

    from ..engine import fidelity
    from ..engine.evaluation import evaluate, pareto, passkey_eval, strategies
    from ..engine.prefill import tokenize

    models.quiet_transformers(debug_enabled())
    torch.manual_seed(seed)
    source = models.ModelSource(spec)
    context = source.max_positions()
    loaded = source.load(torch_dtype, dev, attn_implementation="pbs")
    mdl = loaded.model
    base = dict(model={**spec.to_dict(), "weights": str(loaded.weights)}, document=doc_name, device=str(mdl.device),
                dtype=str(torch_dtype).removeprefix("torch."), profile=profile_name, config=config.to_dict())

    if passkey:
        top = min(x for x in (limit, context) if x) if (limit or context) else 8192
        sizes = parse_sizes(lengths) if lengths else [n for n in (1024, 2048, 4096, 8192, 16384, 32768) if n <= top]
        too_long = [n for n in sizes if context and n > context]
        if too_long:
            raise UsageError(f"--lengths {too_long} exceed the model's {context} positions; pass lengths <= {context}")
        cells = passkey_eval(mdl, loaded.tokenizer, text, sizes, depth_list, trials, config, seed)
        rec = reports.envelope("eval", mode="passkey", **base, lengths=sizes, depths=depth_list, trials=trials,
                               passkey=cells)
        if output is not None:
            reports.atomic_write_text(output, reports.to_json(rec))
        if as_json:
            typer.echo(reports.to_json(rec), nl=False)
        else:
            print_passkey(rec)
        return

    cap = min(x for x in (limit, context) if x) if (limit or context) else None
    ids_list, doc_tokens = tokenize(loaded.tokenizer, text, cap, True, 0, doc_name)
    ids = torch.tensor([ids_list], device=mdl.device)
    cont = 0
    if continuation != 0:
        try:
            cont = fidelity.continuation_tokens(len(ids_list), continuation)
        except ValueError as exc:
            raise UsageError(f"--continuation: {exc} (0 skips it)") from None
    runs = [(label, cfg.replace(threshold=t)) for t in sweep for label, cfg in strategies(config, profile_name)]
    dense, rows = evaluate(mdl, ids, runs, recall_rows, cont)
    rec = reports.envelope("eval", mode="text", **base, document_tokens=doc_tokens, prompt_tokens=len(ids_list),
                           continuation_tokens=cont, thresholds=[r for r in sweep if r is not None], dense=dense,
                           results=rows)
    rec["pareto"] = pareto(rows)
    if png is not None:
        save_png(rec, png)
        err.print(f"saved {png}", highlight=False, markup=False)
    if output is not None:
        reports.atomic_write_text(output, reports.to_json(rec))
        err.print(f"saved {output}", highlight=False, markup=False)
    if as_json:
        typer.echo(reports.to_json(rec), nl=False)
    else:
        print_table(rec)
        if per_layer:
            print_layers(rec)
