"""`pbs calibrate`: find the sparsest PBS parameters that meet a fidelity target on the user's model
and text, and save them as a named preset (`--profile NAME` then uses it)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from pbs_kernels import PBSConfig

from ..engine import models, presets, reports
from ..console import command_boundary, debug_enabled, err, out
from ..errors import UsageError
from ..options import Device, Dtype, Json, Model, RecordOutput, check_outputs
from ..engine.sizes import parse_size
from ..engine.documents import read_document
from ..engine.calibration import search_threshold
from ..engine.models import DEFAULT_MODEL
from ..render.calibration import summary_table
from ..render.tables import emit


@command_boundary
def command(
    doc: Annotated[str, typer.Option("--doc", help="Real text to calibrate on (UTF-8 file).", show_default=False)],
    name: Annotated[str, typer.Option("--name", help="Preset name to write (letters, digits, -, _, .; not a "
                                      "built-in preset's name).", show_default=False)],
    model: Model = DEFAULT_MODEL,
    target_recall: Annotated[float | None, typer.Option("--target-recall", help="Mean attention-mass recall "
                                                        "of sampled query rows to reach, in (0, 1].")] = None,
    target_kl: Annotated[float | None, typer.Option("--target-kl", help="Mean KL(dense || PBS) of the "
                                                    "next-token distributions to stay under (nats, > 0).")] = None,
    profile: Annotated[str | None, typer.Option("--profile", "-p", help="Preset whose other parameters are "
                                                "kept (default: 'default').")] = None,
    block_sizes: Annotated[str, typer.Option("--block-sizes", help="Block sizes to search.")] = "64,128",
    max_tokens: Annotated[str | None, typer.Option("--max-tokens", help="Use the first N tokens of DOC "
                                                   "(default: the model's context).")] = None,
    recall_rows: Annotated[int, typer.Option("--recall-rows", min=1, help="Query rows per layer sampled "
                                             "for recall.")] = 64,
    device: Device = "auto",
    dtype: Dtype = "auto",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing preset / --output.")] = False,
    as_json: Json = False,
    output: RecordOutput = None,
) -> None:
    """Find the sparsest block size and threshold meeting --target-recall or --target-kl; save it as preset NAME.

    --target-recall is measured on dense activations (fast); --target-kl runs a PBS forward per step."""
    if (target_recall is None) == (target_kl is None):
        raise UsageError("pass exactly one of --target-recall R (e.g. 0.95) or --target-kl K (e.g. 0.01)")
    if target_recall is not None and not 0.0 < target_recall <= 1.0:
        raise UsageError(f"--target-recall must be in (0, 1], got {target_recall}")
    if target_kl is not None and not 0.0 < target_kl < math.inf:
        raise UsageError(f"--target-kl must be a finite number of nats > 0 (e.g. 0.01), got {target_kl}")
    presets.check_new_profile(name, force)  # a bad or built-in --name: refused before the model loads
    check_outputs({"--output": output}, force)
    try:
        sizes = [int(x) for x in block_sizes.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"invalid --block-sizes {block_sizes!r}; use e.g. 64,128") from None
    dev = models.resolve_device(device)
    base, base_name = presets.resolve_config(profile, device=dev)  # what `pbs prefill` would start from here
    candidates = []
    for bs in sizes:
        try:
            seg = max(base.segment_size, bs)
            candidates.append(base.replace(block_size=bs, segment_size=seg - seg % bs,
                                           sample_rows=min(base.sample_rows, bs)))
        except ValueError as exc:
            raise UsageError(f"--block-sizes: {exc}") from None
    torch_dtype = models.resolve_dtype(dtype, dev)
    limit = parse_size(max_tokens) if max_tokens else None
    text, doc_name = read_document(doc)
    spec = models.resolve_model(model)
    err.print(f"model: {spec.describe()}", highlight=False, markup=False)

    import torch

    from ..engine import fidelity
    from ..engine.prefill import tokenize

    models.quiet_transformers(debug_enabled())
    source = models.ModelSource(spec)
    context = source.max_positions()
    cap = min(x for x in (limit, context) if x) if (limit or context) else None
    loaded = source.load(torch_dtype, dev, attn_implementation="pbs")
    mdl = loaded.model
    ids_list, doc_tokens = tokenize(loaded.tokenizer, text, cap, True, 0, doc_name)
    ids = torch.tensor([ids_list], device=mdl.device)

    tried: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    if target_recall is not None:
        kind, value = "recall", target_recall
        with models.progress("dense forward (capturing q/k of every layer)"):
            _, captured = fidelity.capture_qk(mdl, ids)

        def meets(r: dict) -> bool:
            return r["recall"] >= target_recall

        for cand in candidates:
            def evaluate(tau: float, cand: PBSConfig = cand) -> dict:
                cfg = cand.replace(threshold=tau)
                with models.progress(f"block {cfg.block_size}, threshold {tau:g}"):
                    st = fidelity.plan_stats(captured, cfg, recall_rows)
                err.print(f"block {cfg.block_size}, threshold {tau:g}: density {st['density']:.1%}, "
                          f"recall {st['recall']:.4f}", highlight=False, markup=False)
                return {"block_size": cfg.block_size, "density": st["density"], "recall": st["recall"],
                        "recall_min_head": st["recall_min_head"], "mean_kl": None, "config": cfg.to_dict()}

            found, steps = search_threshold(evaluate, meets)
            tried += steps
            if found is not None and (best is None or found["density"] < best["density"]):
                best = found
        del captured
    else:
        kind, value = "kl", target_kl
        with models.progress("dense forward"):
            dense = fidelity.run_forward(mdl, ids, None)

        def meets(r: dict) -> bool:
            return r["mean_kl"] <= target_kl

        for cand in candidates:
            def evaluate(tau: float, cand: PBSConfig = cand) -> dict:
                cfg = cand.replace(threshold=tau)
                with models.progress(f"block {cfg.block_size}, threshold {tau:g}: PBS forward"):
                    res = fidelity.run_forward(mdl, ids, cfg, 0)
                    m = fidelity.compare_hidden(mdl, dense.hidden, res.hidden, ids)
                err.print(f"block {cfg.block_size}, threshold {tau:g}: density {res.density:.1%}, "
                          f"KL {m['mean_kl']:.4f}", highlight=False, markup=False)
                return {"block_size": cfg.block_size, "density": res.density, "recall": None,
                        "mean_kl": m["mean_kl"], "top1_agreement": m["top1_agreement"],
                        "ppl_increase": m["ppl_increase"], "config": cfg.to_dict()}

            found, steps = search_threshold(evaluate, meets)
            tried += steps
            if found is not None and (best is None or found["density"] < best["density"]):
                best = found
    rec = reports.envelope("calibrate", model={**spec.to_dict(), "weights": str(loaded.weights)}, document=doc_name,
                           device=str(mdl.device), dtype=str(torch_dtype).removeprefix("torch."),
                           base_profile=base_name, document_tokens=doc_tokens, prompt_tokens=len(ids_list),
                           target={"kind": kind, "value": value}, tried=tried, best=best)
    if best is None:
        # tau = 1.0 (dense) always meets a target; only a failed search over a bad range ends here
        raise UsageError(f"no threshold in [0.5, 1.0) met {kind} {value:g}; even dense may be needed — "
                         "try a looser target")
    config = PBSConfig.from_dict(best["config"])
    what = f"recall >= {value:g}" if kind == "recall" else f"mean KL <= {value:g}"
    path = presets.save_user_profile(
        name, config, description=f"calibrated by pbs calibrate on {Path(doc_name).name}: {what}, "
                                  f"density {best['density']:.1%}",
        extra={"calibration": {"model": spec.name, "document": doc_name, "tokens": len(ids_list),
                               "target": kind, "value": value, "density": round(best["density"], 5),
                               "achieved": round(best["recall"] if kind == "recall" else best["mean_kl"], 6),
                               "timestamp": rec["timestamp"]}},
        force=force)
    rec["profile_path"] = str(path)
    if output is not None:
        reports.atomic_write_text(output, reports.to_json(rec))
    if as_json:
        typer.echo(reports.to_json(rec), nl=False)
    else:
        emit(summary_table(rec))
        out.print(f"wrote {path}: block {config.block_size}, threshold {config.threshold:g}, density "
                  f"{best['density']:.1%}; use it with --profile {name}", highlight=False)
