"""`pbs profile`: time PBS attention against the best dense attention on this machine, at one or many lengths."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import command_boundary
from ..errors import UsageError
from ..engine.profile_records import BACKENDS  # plain names, no torch: --help stays light
from ..options import BlockSize, Device, Dtype, Force, SegmentSize, Threshold, check_outputs

HELP = (
    "Time PBS attention (permute / select / attend) against dense SDPA backends and FlexAttention on the same "
    "Q/K/V, at one or many sequence lengths; report density, speedup, error and recall.\n\n"
    "Q/K/V come from the structured synthetic generator (sinks, local windows, heavy-hitter keys, slash and topic "
    "heads; --pattern) or, with --from-model/--doc/--layers, from a real model's forward. Shapes: --model (its "
    "config only) or --heads/--kv-heads/--head-dim/--batch; default Llama-3.1-8B (32/8/128, batch 1). Lengths take "
    "k/m suffixes (128k = 131072). Unavailable backends and lengths that do not fit in memory are reported as "
    "skipped and the sweep goes on.\n\n"
    "On CUDA the pbs total is timed as a layer runs inside `pbs prefill`: below 64K tokens the copies of Q/K/V "
    "into a CUDA graph's buffers and one replay of permute + select + attend (PBS_CUDA_GRAPHS=0: eager launches; "
    "the eager total is in the row's notes), from 64K on eager launches (PBS_CUDA_GRAPHS=1: graphs there too); "
    "the phase times are eager, and there the attend phase makes its own K/V copy (a layer makes it in the "
    "selection's pooling pass).\n\n"
    "TFLOP/s dense-equivalent = causal FLOPs / time, causal FLOPs = 2*2*N^2*D*H_q*B/2 = 2*N^2*D*H_q*B; "
    "TFLOP/s computed = density * causal FLOPs / attend time. Speedup = time of the best dense SDPA backend at "
    "that length (named) / this backend's time. Break-even = smallest tested length where PBS beats it."
)


@command_boundary
def command(
    seq_len: Annotated[str | None, typer.Option("--seq-len", "-n", help="Length or comma list, k/m suffixes "
                                                "(128k = 131072). Default: 8k,32k,128k on CUDA, 1k,4k on CPU.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Take heads / KV heads / head_dim from this "
                                              "model's config (alias, directory, .gguf, HF id); no weights are "
                                              "read.")] = None,
    heads: Annotated[int | None, typer.Option("--heads", min=1, help="Query heads (default 32).")] = None,
    kv_heads: Annotated[int | None, typer.Option("--kv-heads", min=1, help="KV heads (default 8).")] = None,
    head_dim: Annotated[int | None, typer.Option("--head-dim", min=8, help="Head dimension (default 128).")] = None,
    batch: Annotated[int | None, typer.Option("--batch", min=1, help="Batch size (default 1).")] = None,
    dtype: Dtype = "auto",
    device: Device = "auto",
    profile: Annotated[str | None, typer.Option("--profile", "-p", help="PBS preset name (see `pbs env`).")] = None,
    threshold: Threshold = None,
    block_size: BlockSize = None,
    segment_size: SegmentSize = None,
    backends: Annotated[str | None, typer.Option("--backends", "-b", help=f"Comma list of {', '.join(BACKENDS)} "
                                                 "(default: all; unavailable ones are reported as skipped; "
                                                 "naming only ones that cannot run on this device is exit 3).")]
    = None,
    pattern: Annotated[str, typer.Option("--pattern", help="Synthetic workload: mixed, sink, local, vertical, "
                                         "slash, topic, uniform.")] = "mixed",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the synthetic workload and the recall rows.")] = 0,
    from_model: Annotated[str | None, typer.Option("--from-model", help="Capture real post-RoPE Q/K/V from this "
                                                   "model's forward over --doc (loads the weights).")] = None,
    doc: Annotated[Path | None, typer.Option("--doc", help="UTF-8 text for --from-model.")] = None,
    layers: Annotated[str, typer.Option("--layers", help="Layers to capture with --from-model, e.g. 0,10,-1.")] = "0",
    warmup: Annotated[int | None, typer.Option("--warmup", min=0, help="Untimed calls before timing (default: 2 "
                                               "on CUDA, where the first call may autotune or compile; 1 on "
                                               "CPU).")] = None,
    iters: Annotated[int, typer.Option("--iters", min=1, help="Minimum timed repeats.")] = 3,
    budget: Annotated[float, typer.Option("--budget", min=0.0, help="Seconds to spend per measurement "
                                          "(repeats adapt, at most 50).")] = 1.0,
    recall_rows: Annotated[int, typer.Option("--recall-rows", min=1, help="Query rows sampled for recall.")] = 32,
    reference_max_len: Annotated[int, typer.Option("--reference-max-len", min=1, help="Longest N to time the "
                                                   "plain-PyTorch reference at.")] = 16384,
    trace: Annotated[Path | None, typer.Option("--trace", help="Write a torch.profiler Chrome trace (.json or "
                                               ".json.gz) of one PBS pass at the last length.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
    as_jsonl: Annotated[bool, typer.Option("--jsonl", help="Print JSON lines (header, then one per result, "
                                           "flushed per length).")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV.")] = False,
    as_markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table.")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Also save to this file; format from the "
                                                "extension: .json .jsonl .csv .md .html.")] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Also save an HTML report with plots.")] = None,
    force: Force = False,
    tp: Annotated[int | None, typer.Option("--tp", min=1, help="Tensor-parallel size: each of N ranks (one GPU "
                                           "each, re-launched through torch.distributed) times its H/N heads; "
                                           "times are the slowest rank's.")] = None,
) -> None:
    chosen = [name for name, on in (("json", as_json), ("jsonl", as_jsonl), ("csv", as_csv),
                                    ("markdown", as_markdown)) if on]
    if len(chosen) > 1:
        raise UsageError(f"choose one stdout format, got --{' --'.join(chosen)}")
    check_outputs({"--output": output, "--html": html, "--trace": trace}, force)
    from ..engine import profile_job
    from ..render.profile import ProfileOutputs, deliver

    request = profile_job.ProfileRequest(
        seq_len=seq_len, model=model, heads=heads, kv_heads=kv_heads, head_dim=head_dim, batch=batch, dtype=dtype,
        device=device, profile=profile, threshold=threshold, block_size=block_size, segment_size=segment_size,
        backends=backends, pattern=pattern, seed=seed, from_model=from_model, doc=doc, layers=layers, warmup=warmup,
        iters=iters, budget=budget, recall_rows=recall_rows, reference_max_len=reference_max_len, trace=trace, tp=tp)
    outputs = ProfileOutputs(chosen[0] if chosen else None, output, html)
    try:
        result = profile_job.run(request, on_start=outputs.start, on_length=outputs.records)
    except BaseException:
        outputs.close()  # finished JSONL lines stay on disk
        raise
    deliver(outputs, result, trace)


command.__doc__ = HELP
