"""`pbs eval DOC`: what sparsity costs. Dense vs PBS vs plain block selection vs the published PBS-Attn
on the same tokens: perplexity, top-1 agreement, mean KL, density and attention recall per layer; a
threshold sweep (density-fidelity table, Pareto PNG); `--passkey` retrieval accuracy."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pbs_kernels import PBSConfig

from .. import fidelity
from ..engine import models, presets, reports
from ..console import command_boundary, debug_enabled, err, out
from ..errors import UsageError
from ..options import Device, Dtype, Force, Json, Model, RecordOutput, check_outputs
from ..engine.sizes import parse_size, parse_sizes
from ..engine.documents import read_document
from ..engine.prefill import DEFAULT_MODEL, greedy_generate, run_prefill, tokenize


def emit(renderable) -> None:
    """Print to stdout; pipes and files get 160 columns (whole rows), not Rich's 80-column default."""
    from rich.console import Console

    (out if out.is_terminal else Console(width=160, soft_wrap=True)).print(renderable)


# The published method (the `published` preset; a test keeps the two equal): one key permutation per
# query head scored by the last query block, top-p 0.9 over mean-pooled off-diagonal block scores, then
# the sink block added; no local block.
PUBLISHED = PBSConfig(block_size=128, segment_size=256, threshold=0.9, permute=True, per_head_permutation=True,
                      sink=True, forced_in_top_p=False, local_blocks=0)


def strategies(config: PBSConfig, profile: str) -> list[tuple[str, PBSConfig]]:
    """(label, config) of every compared selection: the profile, no permutation, the published one."""
    return [(f"pbs ({profile})", config), (f"no-permutation ({profile})", config.replace(permute=False)),
            ("published PBS-Attn", PUBLISHED)]


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


# -- the text evaluation ----------------------------------------------------------------------


def evaluate(mdl, ids, runs: list[tuple[str, PBSConfig]], recall_rows: int,
             continuation: int = 0) -> tuple[dict, list[dict]]:
    """Dense forward, then one PBS forward per (label, config); with ``continuation`` > 0 also
    prefill-then-continue (``fidelity.continuation_metrics``) over the last ``continuation`` tokens.
    Returns (dense row, rows)."""
    n = ids.shape[1]
    with models.progress(f"dense SDPA forward over {n} tokens"):
        dense = fidelity.run_forward(mdl, ids, None)
    prefix = n - continuation
    dense_continued = None
    if continuation:
        with models.progress(f"dense prefill of {prefix} tokens, then {continuation} tokens over its cache"):
            dense_continued = fidelity.continue_after_prefill(mdl, ids, None, prefix)
    rows = []
    for i, (label, cfg) in enumerate(runs):
        err.print(f"[{i + 1}/{len(runs)}] {label}: threshold {cfg.threshold}", highlight=False, markup=False)
        with models.progress(f"{label}, threshold {cfg.threshold}"):
            res = fidelity.run_forward(mdl, ids, cfg, recall_rows)
            metrics = fidelity.compare_hidden(mdl, dense.hidden, res.hidden, ids)
        row = {"strategy": label, "threshold": cfg.threshold, "density": res.density, "recall": res.recall,
               **metrics, "continuation": None, "config": cfg.to_dict(), "layers": res.layers}
        del res
        if continuation:
            with models.progress(f"{label}: prefill of {prefix} tokens, then {continuation} tokens over its cache"):
                row["continuation"] = fidelity.continuation_metrics(mdl, ids, cfg, prefix, dense_continued)
        rows.append(row)
    ppl = rows[0]["ppl_dense"] if rows else None
    return {"strategy": "dense SDPA", "density": 1.0, "ppl": ppl, "top1_agreement": 1.0, "mean_kl": 0.0}, rows


def pareto(rows: list[dict]) -> list[bool]:
    """True where no other row has lower-or-equal density and strictly better (lower) KL."""
    return [not any(o["density"] <= r["density"] and o["mean_kl"] < r["mean_kl"] and o is not r for o in rows)
            for r in rows]


def print_table(rec: dict) -> None:
    cont = rec.get("continuation_tokens") or 0
    caption = ("top-1, KL: every position's next token, teacher-forced over one sparse forward (a position's "
               "selection has seen later tokens of its block); recall: attention mass kept on sampled rows; "
               "pareto *: no sparser row has lower KL")
    if cont:
        caption += (f"; continued: the last {cont} tokens scored with dense attention over the KV cache of a "
                    "sparse prefill of the rest (the selection never saw them)")
    table = Table(title=f"pbs eval: {rec['document']} ({rec['prompt_tokens']} tokens, {rec['model']['name']})",
                  title_justify="left", caption=caption, caption_justify="left")
    table.add_column("strategy", no_wrap=True)
    columns = ["tau", "density", "perplexity", "top-1", "mean KL (nats)", "recall", "pareto"]
    if cont:
        columns[5:5] = ["continued ppl", "continued top-1", "continued KL (nats)"]
    for col in columns:
        table.add_column(col, justify="right")
    d = rec["dense"]
    dense_cont = ["-", "100.00%", "0"] if cont else []
    if cont and rec["results"]:
        dense_cont[0] = f"{rec['results'][0]['continuation']['ppl_dense']:.3f}"
    table.add_row(d["strategy"], "-", "100.0%", f"{d['ppl']:.3f}" if d["ppl"] else "-", "100.00%", "0",
                  *dense_cont, "1", "")
    for r, best in zip(rec["results"], rec["pareto"]):
        c = r["continuation"] if cont else None
        continued = [f"{c['ppl']:.3f} ({c['ppl_increase']:+.1%})", f"{c['top1_agreement']:.2%}",
                     f"{c['mean_kl']:.4f}"] if c else []
        table.add_row(r["strategy"], f"{r['threshold']:g}", f"{r['density']:.1%}",
                      f"{r['ppl']:.3f} ({r['ppl_increase']:+.1%})", f"{r['top1_agreement']:.2%}",
                      f"{r['mean_kl']:.4f}", *continued, f"{r['recall']:.4f}" if r["recall"] is not None else "-",
                      "*" if best else "")
    emit(table)
    worst = min(rec["results"], key=lambda r: min(ly["recall_min_head"] for ly in r["layers"]) if r["layers"] else 1)
    if worst["layers"]:
        ly = min(worst["layers"], key=lambda x: x["recall_min_head"])
        err.print(f"lowest head recall: {worst['strategy']} t={worst['threshold']:g}, layer {ly['layer']}: "
                  f"{ly['recall_min_head']:.3f} (layer mean {ly['recall']:.3f}, density {ly['density']:.1%})",
                  highlight=False, markup=False)


def print_layers(rec: dict) -> None:
    """Per-layer density and recall (mean and lowest head) of every evaluated strategy."""
    for r in rec["results"]:
        table = Table(title=f"{r['strategy']}, tau {r['threshold']:g}: per layer", title_justify="left")
        for col in ("layer", "path", "density", "recall", "lowest head recall"):
            table.add_column(col, justify="right")
        for ly in r["layers"]:
            table.add_row(str(ly["layer"]), ly["path"], f"{ly['density']:.1%}", f"{ly['recall']:.4f}",
                          f"{ly['recall_min_head']:.4f}")
        emit(table)


def save_png(rec: dict, path: Path) -> None:
    """Density (x) against mean KL and perplexity increase (y), one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    by: dict[str, list[dict]] = {}
    for r in rec["results"]:
        by.setdefault(r["strategy"], []).append(r)
    for label, rows in by.items():
        rows = sorted(rows, key=lambda r: r["density"])
        x = [100 * r["density"] for r in rows]
        axes[0].plot(x, [r["mean_kl"] for r in rows], "o-", label=label)
        axes[1].plot(x, [100 * r["ppl_increase"] for r in rows], "o-", label=label)
    axes[0].set_ylabel("mean KL(dense || sparse), nats")
    axes[1].set_ylabel("perplexity increase, %")
    for ax in axes:
        ax.set_xlabel("density, % of causal blocks")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{rec['model']['name']}, {rec['prompt_tokens']} tokens of {Path(rec['document']).name}")
    fig.tight_layout()
    from ..render.viz import save_figure

    save_figure(fig, path, "png")  # temp file + rename in the same folder; closes the figure


# -- passkey ----------------------------------------------------------------------------------


def passkey_eval(mdl, tokenizer, filler: str, lengths: list[int], depths: list[float], trials: int,
                 config: PBSConfig, seed: int, max_new_tokens: int = 8) -> list[dict]:
    """Dense vs PBS retrieval at every (length, depth), ``trials`` random keys each."""
    import torch

    from .. import integration

    rng = random.Random(seed)
    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    cells = []
    for length in lengths:
        for depth in depths:
            hits = {"dense": 0, "pbs": 0}
            answers = []
            for _ in range(trials):
                prompt = fidelity.passkey_prompt(tokenizer, filler, length, depth, fidelity.random_key(rng))
                ids = torch.tensor([prompt.ids], device=mdl.device)
                row = {"key": prompt.key}
                for name, attn in (("dense", "sdpa"), ("pbs", integration.NAME)):
                    res = run_prefill(mdl, ids, attn, config, 0, 1, keep_cache=True)
                    gen, _ = greedy_generate(mdl, res.last_logits, res.cache, max_new_tokens, eos_ids)
                    text = tokenizer.decode(gen, skip_special_tokens=True)
                    ok = fidelity.passkey_found(text, prompt.key)
                    hits[name] += ok
                    row[name] = text
                    if name == "pbs":
                        dens = [s.density for s in res.layers if s.density is not None]
                        row["density"] = sum(dens) / max(1, len(dens))
                answers.append(row)
            integration.set_attention(mdl, integration.NAME)
            cells.append({"length": length, "depth": depth, "trials": trials,
                          "dense_accuracy": hits["dense"] / trials, "pbs_accuracy": hits["pbs"] / trials,
                          "answers": answers})
            err.print(f"passkey {length} tokens, depth {depth:g}: dense {hits['dense']}/{trials}, "
                      f"pbs {hits['pbs']}/{trials}", highlight=False, markup=False)
    return cells


def print_passkey(rec: dict) -> None:
    table = Table(title=f"pbs eval --passkey ({rec['model']['name']}, filler {rec['document']})", title_justify="left")
    for col in ("length", "dense accuracy", "pbs accuracy", "difference"):
        table.add_column(col, justify="right")
    for length in sorted({c["length"] for c in rec["passkey"]}):
        cells = [c for c in rec["passkey"] if c["length"] == length]
        n = sum(c["trials"] for c in cells)
        d = sum(c["dense_accuracy"] * c["trials"] for c in cells) / n
        p = sum(c["pbs_accuracy"] * c["trials"] for c in cells) / n
        table.add_row(str(length), f"{d:.0%}", f"{p:.0%}", f"{100 * (p - d):+.0f} pts")
    emit(table)


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
