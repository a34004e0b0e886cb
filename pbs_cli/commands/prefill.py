"""`pbs prefill DOC`: prefill a document with PBS attention, report time, density and (optionally) fidelity."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import command_boundary
from ..errors import UsageError
from ..options import DEFAULT_MODEL, BlockSize, Device, Dtype, Force, Json, SegmentSize, Threshold, check_outputs


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
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Also save the JSON record to this "
                                                "file.")] = None,
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
    if trace is not None and tp and tp > 1:
        raise UsageError("--trace profiles one process; run it without --tp")
    check_outputs({"--output": output, "--trace": trace}, force)
    from ..engine import prefill_job
    from ..engine.sizes import parse_size

    request = prefill_job.PrefillRequest(
        doc=doc, model=model, profile=profile, threshold=threshold, block_size=block_size,
        segment_size=segment_size, device=device, dtype=dtype, device_map=device_map, max_new_tokens=max_new_tokens,
        compare_dense=compare_dense, continuation=continuation, truncate=truncate,
        max_tokens=parse_size(max_tokens) if max_tokens is not None else None, beyond_context=beyond_context,
        rope_scaling=rope_scaling, warmup=warmup, iters=iters, compile_layers=compile_layers, seed=seed, trace=trace,
        include_text=include_text, tp=tp)
    rec = prefill_job.run(request)
    if rec is None:  # tensor parallel: rank 0 alone prints and writes
        return
    from ..render.prefill import print_summary
    from ..render.records import deliver

    deliver(rec, as_json, output, print_summary)
