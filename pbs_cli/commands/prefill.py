"""`pbs prefill DOC`: prefill a document with PBS attention, report time, density and (optionally) fidelity."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from ..console import command_boundary, debug_enabled, err
from ..engine import distributed, models, presets, reports
from ..engine.documents import read_document
from ..engine.models import DEFAULT_MODEL
from ..engine.sizes import parse_size
from ..errors import UsageError
from ..options import BlockSize, Device, Dtype, Force, Json, SegmentSize, Threshold, check_outputs


@command_boundary
def command(
    doc: Annotated[str, typer.Argument(help="UTF-8 text file to prefill; - reads stdin.", show_default=False)],
    model: Annotated[str, typer.Option("--model", "-m", help="Alias (llama, smollm2), local directory, .gguf file, "
                                       "or Hugging Face id in the local cache.")] = DEFAULT_MODEL,
    profile: Annotated[str | None, typer.Option("--profile", "-p", help="PBS preset name (default: the alias's, "
                                                "else 'default'). See `pbs env` for the list.")] = None,
    threshold: Threshold = None,
    block_size: BlockSize = None,
    segment_size: SegmentSize = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    device_map: Annotated[str | None, typer.Option("--device-map", help="'auto' spreads layers over the GPUs "
                                                   "(accelerate).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=0, help="Greedy tokens to generate after "
                                                 "the prefill (decode runs dense).")] = 0,
    compare_dense: Annotated[bool, typer.Option("--compare-dense", help="Also run dense SDPA on the same input: "
                                                "its time, the speedup, top-1 agreement and mean KL over every "
                                                "prompt position, teacher-forced (a position's selection has seen "
                                                "later tokens of its block), and the --continuation check.")] = False,
    continuation: Annotated[int | None, typer.Option("--continuation", min=0, help="With --compare-dense: after "
                                                     "the timed passes, prefill all but the last N prompt tokens "
                                                     "again (untimed) with PBS and with dense SDPA, then score those "
                                                     "N tokens with dense attention over each KV cache: top-1, KL "
                                                     "and perplexity on tokens the selection never saw (default: the "
                                                     "last eighth, at most 1024 tokens; 0 skips it).")] = None,
    truncate: Annotated[bool, typer.Option("--truncate", help="Keep the first tokens of a document longer than "
                                           "the model's context instead of failing.")] = False,
    max_tokens: Annotated[str | None, typer.Option("--max-tokens", help="Use at most this many tokens of the "
                                                   "document (e.g. 32k), for length sweeps.")] = None,
    beyond_context: Annotated[bool, typer.Option("--beyond-context", help="Benchmarking only: allow prompts longer "
                                                 "than the model's trained positions (quality is meaningless "
                                                 "there; timings are real).")] = False,
    rope_scaling: Annotated[str, typer.Option("--rope-scaling", help="With --beyond-context: stretch the model's "
                                              "RoPE over the prompt (none, yarn, dynamic or linear; factor = "
                                              "prompt length / trained positions), in the PBS and the dense "
                                              "forward alike. An untrained extension: it changes the outputs.")]
    = "none",
    warmup: Annotated[int | None, typer.Option("--warmup", min=0, help="Untimed runs first "
                                               "(default: 0 on CPU, 1 on GPU or with --compile).")] = None,
    iters: Annotated[int | None, typer.Option("--iters", min=1, help="Timed runs; the median is reported "
                                              "(default: 1 on CPU, 3 on GPU).")] = None,
    compile_layers: Annotated[bool, typer.Option("--compile", help="Fuse the model's non-attention work (norms, "
                                                 "RoPE, MLP) with torch.compile, in the PBS and the dense forward "
                                                 "alike; attention stays eager. The warm-up compiles (untimed; "
                                                 "it takes a while).")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    as_json: Json = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Also save the JSON record to this file.")] = None,
    force: Force = False,
    trace: Annotated[Path | None, typer.Option("--trace", help="Also run one PBS forward under torch.profiler: "
                                               "save its Chrome trace (.json or .json.gz; open in chrome://tracing "
                                               "or Perfetto) and print the ops that took the most time.")] = None,
    include_text: Annotated[bool, typer.Option("--include-text", help="Put the document's text in the JSON "
                                               "record (left out by default: reports get shared).")] = False,
    tp: Annotated[int | None, typer.Option("--tp", min=1, help="Tensor-parallel size: shard the heads over N GPUs "
                                           "(re-runs this command on N ranks through torch.distributed; query and "
                                           "KV heads must divide by N). Under torchrun: the world size.")] = None,
) -> None:
    """Prefill DOC with PBS attention: time, tokens/s, density per layer; --compare-dense adds speedup and fidelity.

    Fidelity comes two ways: top-1 and KL over every prompt position (teacher-forced over the timed
    forward: a position's selection has seen later tokens of its block), and the continuation (the
    last tokens scored with dense attention over the KV cache of a PBS prefill of the rest, tokens
    the selection never saw)."""
    # -- validate everything before loading the model --
    if trace is not None and tp and tp > 1:
        raise UsageError("--trace profiles one process; run it without --tp")
    check_outputs({"--output": output, "--trace": trace}, force)
    overrides = dict(threshold=threshold, block_size=block_size, segment_size=segment_size)
    cap = parse_size(max_tokens) if max_tokens is not None else None
    presets.resolve_config(profile, **overrides)  # usage errors first, before the device is probed
    if device_map not in (None, "auto"):
        raise UsageError(f"invalid --device-map {device_map!r}; only 'auto' is supported")
    models.check_rope_scaling(rope_scaling)
    if rope_scaling != "none" and not beyond_context:
        raise UsageError("--rope-scaling stretches RoPE past the model's trained positions: add --beyond-context")
    if compile_layers and warmup == 0:
        raise UsageError("--compile needs --warmup 1 or more: the first forward of each kind compiles")
    if continuation and not compare_dense:
        raise UsageError("--continuation compares against a dense prefill: add --compare-dense")
    dev = models.resolve_device(device)
    config, profile_name = presets.resolve_config(profile, device=dev, **overrides)
    torch_dtype = models.resolve_dtype(dtype, dev)
    if tp and tp > 1 and doc == "-":
        raise UsageError("--tp runs the command on several ranks, which cannot share stdin; pass a file, not -")
    text, doc_name = read_document(doc)
    spec = models.resolve_model(model)
    # -- tensor parallel (pbs_cli.engine.distributed): refuse what cannot shard, re-run on N ranks, join the group --
    distributed.check_launch_environment(tp or distributed.env_world_size(), device, device_map)
    if distributed.needs_launch(tp):
        distributed.check_model_config(tp, models.ModelSource(spec).config(), spec.name)
        distributed.relaunch(tp)  # exits with the ranks' exit code
    tpi = distributed.tp_context(tp, device)
    if profile is None and spec.profile and spec.profile != profile_name:
        config, profile_name = presets.resolve_config(spec.profile, device=dev, explicit=False, **overrides)

    if profile is None and profile_name == presets.GPU_PROFILE:
        err.print(f"profile: {presets.GPU_PROFILE!r} (on a GPU the default preset's sampled selection costs more "
                  "than dense attention; "
                  "--profile default forces it)", highlight=False, markup=False)

    import torch

    from ..engine import compiling, integration
    from ..engine import fidelity as fidelity_metrics
    from ..engine.prefill import (PrefillSpec, choose_dense_backend, greedy_generate, layer_summary, out_of_memory_hint,
                                  run_prefills, tokenize, warn_if_not_sparse, write_trace)
    from ..render.prefill import print_summary

    models.quiet_transformers(debug_enabled())
    torch.manual_seed(seed)
    source = models.ModelSource(spec)
    if tpi.active:
        distributed.check_model_config(tpi.size, source.config(), spec.name)
        with distributed.main_rank_first():  # rank 0 builds a missing GGUF cache, the others then read it
            source.ensure_cache()
    trained = source.max_positions()
    limit = None if beyond_context else trained
    if cap is not None:
        limit, truncate = (cap + max_new_tokens if limit is None else min(limit, cap + max_new_tokens)), True
    ids, doc_tokens = tokenize(source.tokenizer(), text, limit, truncate, max_new_tokens, doc_name)
    cont = 0
    if compare_dense and continuation != 0:
        try:
            cont = fidelity_metrics.continuation_tokens(len(ids), continuation)
        except ValueError as exc:
            raise UsageError(f"--continuation: {exc} (0 skips it)") from None
    past_context = trained is not None and len(ids) + max_new_tokens > trained
    if past_context:
        err.print(f"note: {len(ids)} prompt tokens exceed the model's {trained} trained positions (--beyond-context): "
                  "timings are real; the outputs, and --compare-dense agreement, are out of distribution",
                  highlight=False, markup=False, soft_wrap=True)
    on_gpu = dev.startswith("cuda") or device_map == "auto"
    rope = models.rope_scaling(source.config(), rope_scaling, len(ids) + max_new_tokens)
    if rope:
        err.print(f"RoPE: {rope['rope_type']} x{rope['factor']:.3g} over {rope['original_max_position_embeddings']} "
                  "trained positions (--rope-scaling)", highlight=False, markup=False)
    elif rope_scaling != "none":
        err.print(f"note: --rope-scaling {rope_scaling} does nothing here: the {len(ids) + max_new_tokens} positions "
                  f"fit the model's {trained} trained positions", highlight=False, markup=False)
    warmup = warmup if warmup is not None else (1 if on_gpu or compile_layers else 0)
    iters = iters if iters is not None else (3 if on_gpu else 1)

    err.print(f"model: {spec.describe()}", highlight=False, markup=False, soft_wrap=True)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    with out_of_memory_hint("loading the weights for a prefill", len(ids), dev, dtype_name):
        loaded = source.load(torch_dtype, dev, device_map, attn_implementation=integration.NAME,
                             load_kwargs={**distributed.load_kwargs_for_tp(tpi.size),
                                          **({"rope_parameters": rope} if rope else {})})
    if loaded.cache == "built":
        err.print(f"cached the dequantized weights in {loaded.weights}", highlight=False, markup=False, soft_wrap=True)
    mdl = loaded.model
    input_ids = torch.tensor([ids], device=mdl.device)

    choice = None
    if compare_dense or len(ids) < config.dense_below:  # dense attention runs: on its fastest SDPA backend
        with models.progress("timing the SDPA backends for dense attention"), \
                out_of_memory_hint("timing the dense SDPA backends", len(ids), str(mdl.device), dtype_name):
            choice = choose_dense_backend(mdl, input_ids, config)
        if choice is not None:
            err.print(f"dense attention: {choice.name} (fastest of "
                      + ", ".join(f"{k} {v:.0f} ms" for k, v in choice.times_ms.items()) + " per forward)",
                      highlight=False, markup=False, soft_wrap=True)

    # a prompt below dense_below runs the dense forward itself (no per-layer dispatch), recorded as dense
    below = f"seq_len {len(ids)} < dense_below {config.dense_below}" if len(ids) < config.dense_below else None
    specs = [PrefillSpec(integration.DENSE_NAME if below else integration.NAME, max_new_tokens > 0, below)]
    if compare_dense:
        specs.append(PrefillSpec(integration.DENSE_NAME))  # timed in alternation with the PBS passes
    with models.progress(f"prefill of {len(ids)} tokens with PBS attention"
                         + (" and with dense SDPA, alternating" if compare_dense else "")), \
            out_of_memory_hint("in the prefill", len(ids), str(mdl.device), dtype_name), \
            compiling.compiled_layers(mdl, compile_layers):
        pbs, *dense_runs = run_prefills(mdl, input_ids, specs, config, warmup, iters, dense=choice)
    integration.set_attention(mdl, integration.NAME)  # decode steps and --trace go through "pbs"
    pbs.times_ms = distributed.reduce_max(pbs.times_ms)  # tensor parallel: each run's slowest rank
    distributed.merge_layer_stats(pbs.layers)  # tensor parallel: densities over the heads of all ranks
    summary = layer_summary(pbs.layers)
    warn_if_not_sparse(pbs.layers, type(mdl).__name__)
    if pbs.graph_failure:
        err.print(f"note: the sparse layers ran without CUDA graphs ({pbs.graph_failure})",
                  highlight=False, markup=False, soft_wrap=True)
    rec = reports.envelope(
        "prefill",
        document=doc_name,
        model={**spec.to_dict(), "weights": str(loaded.weights), "cache": loaded.cache,
               "architecture": type(mdl).__name__, "max_position_embeddings": trained},
        device=str(mdl.device),
        dtype=str(torch_dtype).removeprefix("torch."),
        profile=profile_name,
        config=config.to_dict(),
        document_tokens=doc_tokens,
        prompt_tokens=len(ids),
        truncated=len(ids) < doc_tokens,
        beyond_context=past_context,
        rope_scaling=rope,
        warmup=warmup,
        iters=iters,
        compiled=compile_layers,
        cuda_graph_layers=pbs.graph_replays,
        prefill_ms=pbs.median_ms,
        prefill_ms_all=pbs.times_ms,
        tokens_per_s=len(ids) / (pbs.median_ms / 1e3),
        density=summary["density"],
        layer_summary=summary,
        layers=[s.to_dict() for s in pbs.layers],
        load_s=loaded.load_s,
        tensor_parallel=tpi.to_dict(),
        dense_sdpa=choice.to_dict() if choice is not None else None,
    )
    if trace is not None:
        with models.progress("one PBS forward under torch.profiler (--trace)"), \
                out_of_memory_hint("in the traced PBS prefill", len(ids), str(mdl.device), dtype_name), \
                compiling.compiled_layers(mdl, compile_layers):
            rec["trace"] = write_trace(trace, mdl, input_ids, specs[0], config, choice)
    if compare_dense:
        dense = dense_runs[0]
        dense.times_ms = distributed.reduce_max(dense.times_ms)
        with models.progress("comparing next-token distributions"), \
                out_of_memory_hint("comparing the logits (--compare-dense)", len(ids), str(mdl.device), dtype_name):
            agreement = fidelity_metrics.compare_hidden(mdl, dense.hidden, pbs.hidden, input_ids)
        kl = agreement["mean_kl"]
        rec.update(dense_prefill_ms=dense.median_ms, dense_prefill_ms_all=dense.times_ms,
                   speedup=dense.median_ms / pbs.median_ms, top1_agreement=agreement["top1_agreement"], mean_kl=kl)
        if not (math.isfinite(kl)):
            err.print("warning: KL is not finite (the PBS output has NaN/inf)", highlight=False, markup=False, soft_wrap=True)
        integration.set_attention(mdl, integration.NAME)
        if cont:
            prefix = len(ids) - cont
            with models.progress(f"prefill of {prefix} tokens with PBS and with dense SDPA, then {cont} tokens "
                                 "over each KV cache (--continuation)"), \
                    out_of_memory_hint("in the continuation (--continuation)", len(ids), str(mdl.device), dtype_name):
                rec["continuation"] = fidelity_metrics.continuation_metrics(mdl, input_ids, config, prefix)
    if max_new_tokens > 0:
        eos = loaded.tokenizer.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        with models.progress(f"generating up to {max_new_tokens} tokens"), \
                out_of_memory_hint("generating after the prefill", len(ids), str(mdl.device), dtype_name):
            gen, decode_ms = greedy_generate(mdl, pbs.last_logits, pbs.cache, max_new_tokens, eos_ids)
        decode_ms = distributed.reduce_max(decode_ms)
        rec["generation"] = {"token_ids": gen, "text": loaded.tokenizer.decode(gen, skip_special_tokens=True),
                             "decode_ms": decode_ms, "decode_tokens_per_s": len(gen) / max(decode_ms / 1e3, 1e-9)}

    if include_text:
        rec["text"] = text
    if not distributed.is_main_rank():  # tensor parallel: rank 0 alone prints and writes
        return
    if output is not None:
        reports.atomic_write_text(output, reports.to_json(rec))
        err.print(f"saved {output}", highlight=False, markup=False, soft_wrap=True)
    if as_json:
        typer.echo(reports.to_json(rec), nl=False)
    else:
        print_summary(rec)
