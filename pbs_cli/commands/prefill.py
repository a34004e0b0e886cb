"""`pbs prefill DOC`: prefill a document with PBS attention, report time, density and (optionally) fidelity."""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..engine import compiling, distributed, models, presets, reports
from .. import dense_sdpa, integration
from .. import fidelity as fidelity_metrics
from ..console import command_boundary, debug_enabled, err, out
from ..engine.sizes import parse_size
from ..errors import OutOfMemory, UsageError
from ..engine.documents import read_document  # eval, calibrate and profile import it from here too
from ..options import Device, Dtype, Force, check_outputs

DEFAULT_MODEL = "llama"


# -- input ----------------------------------------------------------------------------------


def tokenize(tokenizer, text: str, limit: int | None, truncate: bool, reserve: int, name: str) -> tuple[list[int], int]:
    """Token ids of ``text``, cut to ``limit - reserve`` with ``truncate``. Returns (ids, original count)."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    total = len(ids)
    if limit is not None:
        room = limit - reserve
        if room < 2:
            raise UsageError(f"--max-new-tokens {reserve} leaves no room for a prompt in the model's {limit} positions")
        if total > room:
            if not truncate:
                extra = f" plus {reserve} new tokens" if reserve else ""
                raise UsageError(f"document {name!r} has {total} tokens{extra}, more than the model's limit of {limit} "
                                 f"positions; pass --truncate to keep the first {room} tokens")
            ids = ids[:room]
    if len(ids) < 2:
        raise UsageError(f"document {name!r} has {len(ids)} token; prefill needs at least 2")
    return ids, total


# -- running --------------------------------------------------------------------------------


def _sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


@dataclass
class PrefillResult:
    times_ms: list[float]
    hidden: Any  # (B, N, hidden) last hidden state of the final iteration
    last_logits: Any  # (B, vocab)
    cache: Any = None
    layers: list[integration.LayerStat] = field(default_factory=list)
    graph_replays: int = 0  # sparse layers of the last pass replayed from a CUDA graph
    graph_failure: str | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)


@dataclass
class PrefillSpec:
    """One attention setup to time: implementation ``attn`` ("pbs", "pbs_dense", ...), whether to keep
    the KV cache (for generation after it), and ``record_dense`` (see ``integration.pbs_run``)."""

    attn: str
    keep_cache: bool = False
    record_dense: str | None = None


def speedup_caveat(rec: dict) -> str:
    """What the speedup of a ``--compare-dense`` record does not show by itself: that both passes ran
    the same dense forward (every layer dense), or that the PBS and dense times overlap over the runs
    (the difference is within their run-to-run spread). Empty otherwise."""
    summary = rec["layer_summary"]
    if summary["sparse_layers"] == 0 and summary["dense_layers"] > 0:
        return " (both passes ran the same dense forward: the difference is run-to-run spread)"
    t, d = rec["prefill_ms_all"], rec["dense_prefill_ms_all"]
    if len(t) > 1 and len(d) > 1 and min(t) <= max(d) and min(d) <= max(t):
        return " (within the run-to-run spread of the two: their min-max ranges overlap)"
    return ""


def run_prefills(model, input_ids, specs: list[PrefillSpec], config, warmup: int, iters: int,
                 dense: dense_sdpa.DenseChoice | None = None) -> list[PrefillResult]:
    """Time ``iters`` forward passes (after ``warmup``) of each spec, alternating the specs in every
    round and reversing their order every other round (A B, B A, ...), so that drift in clocks,
    temperature or host load, and whatever the previous pass leaves behind, reach them alike; dense
    calls run on SDPA backend ``dense``. One result per spec, with per-layer stats of its last pass."""
    import torch

    backbone = model.base_model
    times: list[list[float]] = [[] for _ in specs]
    last: list[tuple | None] = [None for _ in specs]
    with torch.inference_mode():
        for i in range(warmup + iters):
            order = list(enumerate(specs))
            for j, spec in (order if i % 2 == 0 else order[::-1]):
                integration.set_attention(model, spec.attn)
                recorder = integration.Recorder()
                with integration.pbs_run(config, recorder, dense, spec.record_dense):
                    _sync(input_ids.device)
                    t0 = time.perf_counter()
                    outputs = backbone(input_ids=input_ids, use_cache=spec.keep_cache)
                    hidden = outputs.last_hidden_state
                    logits = fidelity_metrics.output_logits(model, hidden[:, -1:])[:, -1]
                    _sync(input_ids.device)
                    elapsed = (time.perf_counter() - t0) * 1e3
                if i >= warmup:
                    times[j].append(elapsed)
                last[j] = (hidden, logits, fidelity_metrics.cache_of(outputs) if spec.keep_cache else None, recorder)
                del outputs
    results = []
    for t, res in zip(times, last):
        assert res is not None
        rec = res[3]
        results.append(PrefillResult(t, res[0], res[1], res[2], rec.prefill_layers(), rec.graph_replays,
                                     rec.graph_failure))
    return results


def run_prefill(model, input_ids, attn: str, config, warmup: int, iters: int, keep_cache: bool,
                dense: dense_sdpa.DenseChoice | None = None, record_dense: str | None = None) -> PrefillResult:
    """``run_prefills`` of one setup: attention ``attn`` (see ``PrefillSpec``)."""
    return run_prefills(model, input_ids, [PrefillSpec(attn, keep_cache, record_dense)], config, warmup, iters,
                        dense)[0]


def choose_dense_backend(model, input_ids, config) -> dense_sdpa.DenseChoice | None:
    """On CUDA, the fastest SDPA backend for this model and input, timed on whole forwards (None elsewhere)."""
    import torch

    heads, kv_heads, head_dim = models.attention_shape(model.config)

    def forward(choice: dense_sdpa.DenseChoice) -> None:
        with torch.inference_mode(), integration.pbs_run(config, None, choice):
            model.base_model(input_ids=input_ids, use_cache=False)

    integration.set_attention(model, integration.DENSE_NAME)
    return dense_sdpa.pick_fastest(forward, input_ids.device, model.dtype, heads, kv_heads, head_dim)


def greedy_generate(model, first_logits, cache, max_new_tokens: int, eos: set[int]) -> tuple[list[int], float]:
    """Greedy decoding from a prefilled cache (decode steps run dense via the integration). Returns (ids, ms)."""
    import torch

    ids: list[int] = []
    kwarg = fidelity_metrics.cache_kwarg(model)
    nxt = first_logits.argmax(-1, keepdim=True)  # (B, 1)
    _sync(first_logits.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            tok = int(nxt[0, 0])
            ids.append(tok)
            if tok in eos or len(ids) == max_new_tokens:
                break
            step = model(input_ids=nxt, use_cache=True, **{kwarg: cache})
            cache = fidelity_metrics.cache_of(step)
            nxt = step.logits[:, -1].argmax(-1, keepdim=True)
    _sync(first_logits.device)
    return ids, (time.perf_counter() - t0) * 1e3


def write_trace(path: Path, model, input_ids, spec: PrefillSpec, config,
                dense: dense_sdpa.DenseChoice | None) -> dict[str, Any]:
    """One forward of the timed PBS setup ``spec`` under torch.profiler: save the Chrome trace at
    ``path``, print what took the most time (GPU kernels on CUDA, ops' self CPU time elsewhere) to
    stderr; returns {"path", "device_time", "top_ops"} for the record. The layers' PBS work sits
    inside "pbs.attention" ranges."""
    from ..engine import traces

    cuda = input_ids.is_cuda
    one = PrefillSpec(spec.attn, keep_cache=False, record_dense=spec.record_dense)
    prof = traces.record(lambda: run_prefills(model, input_ids, [one], config, 0, 1, dense=dense), input_ids.device)
    integration.set_attention(model, integration.NAME)
    traces.save(prof, path)
    top = traces.top_ops(prof, cuda)
    busy = traces.gpu_busy(prof) if cuda else None
    if busy:
        err.print(f"GPU busy {busy['busy_ms']:.1f} ms of the traced forward's {busy['span_ms']:.1f} ms"
                  + (" (the rest waited on the host: Python, launches)" if busy["busy_ms"] < 0.9 * busy["span_ms"] else ""),
                  highlight=False, markup=False, soft_wrap=True)
    err.print(f"saved {path}; the {'GPU kernels' if cuda else 'ops'} with the most "
              f"{'time' if cuda else 'self CPU time'} in that forward:",
              highlight=False, markup=False, soft_wrap=True)
    for op in top:
        err.print(f"  {op['share']:6.1%} {op['ms']:10.2f} ms {op['calls']:6d}x  {op['name'][:90]}",
                  highlight=False, markup=False, soft_wrap=True)
    return {"path": str(path), "device_time": cuda, "top_ops": top, "gpu_busy": busy}


@contextlib.contextmanager
def out_of_memory_hint(step: str, tokens: int, device: str, dtype: str):
    """Out-of-memory inside ``step`` becomes ``OutOfMemory`` (exit 4) naming the size and what to try."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - only OOM is translated, everything else passes
        import torch

        from ..errors import is_out_of_memory

        if not is_out_of_memory(exc):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        tries = ["a shorter document (or --truncate with a model of fewer positions)"]
        if dtype == "float32":
            tries.append("--dtype bfloat16")
        tries.append("--device-map auto (spread the layers over several GPUs)")
        detail = (str(exc).splitlines() or [""])[0]
        if len(detail) > 160:  # keep whole sentences ("CUDA out of memory. Tried to allocate 128.00 GiB.")
            cut = detail.rfind(". ", 0, 160)
            detail = detail[: cut + 1] if cut > 0 else detail[:160]
        raise OutOfMemory(f"out of memory {step} of {tokens} tokens ({dtype} on {device}): {detail}; "
                          f"try {', '.join(tries)}") from None


def warn_if_not_sparse(layers: list[integration.LayerStat], architecture: str) -> None:
    """One stderr warning when PBS did not run on some or all attention calls of the prefill."""
    if not layers:
        err.print(f"warning: {architecture} made no attention calls through PBS (no attention layers that "
                  "use transformers' attention interface): nothing ran sparse", highlight=False, markup=False)
        return
    chosen = ("dense_below", "dense_layers")  # dense because the PBS parameters asked for it: no warning
    dense = [s for s in layers if s.path == "dense" and not any(c in s.reason for c in chosen)]
    if dense:
        reasons = "; ".join(sorted({s.reason for s in dense}))
        err.print(f"warning: {len(dense)} of {len(layers)} attention layers ran dense, not PBS ({reasons})",
                  highlight=False, markup=False)


# -- reporting ------------------------------------------------------------------------------


def _layer_summary(layers: list[integration.LayerStat]) -> dict[str, Any]:
    dens = [s.density for s in layers if s.density is not None]
    return {
        "density": sum(dens) / len(dens) if dens else None,
        "density_min": min(dens) if dens else None,
        "density_max": max(dens) if dens else None,
        "sparse_layers": sum(1 for s in layers if s.path == "pbs"),
        "dense_layers": sum(1 for s in layers if s.path == "dense"),
    }


def _spread(times: list[float], unit: str) -> str:
    """'  (min a, max b over n runs)' for a list of pass times in ms, in ``unit``; empty for a single run."""
    if len(times) < 2:
        return ""
    return f"  (min {_fmt_ms(min(times), unit)}, max {_fmt_ms(max(times), unit)} over {len(times)} runs)"


def _other_params(config: dict[str, Any]) -> str:
    """', name value' for every further PBS parameter that differs from its default."""
    from pbs_kernels import PBSConfig

    shown = {"block_size", "segment_size", "threshold", "permute", "sink", "local_blocks", "dense_below"}
    defaults = PBSConfig().to_dict()
    extra = [f"{k} {v}" for k, v in config.items() if k not in shown and (k not in defaults or defaults[k] != v)]
    return "".join(f", {e}" for e in extra)


def _unit(*ms: float) -> str:
    """One unit for times shown together: seconds once any of them reaches 10 s, else milliseconds."""
    return "s" if max(ms) >= 1e4 else "ms"


def _fmt_ms(ms: float, unit: str | None = None) -> str:
    return f"{ms / 1e3:.2f} s" if (unit or _unit(ms)) == "s" else f"{ms:.1f} ms"


def print_summary(rec: dict[str, Any]) -> None:
    table = Table(title=f"pbs prefill: {rec['document']}", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    m = rec["model"]
    table.add_row("model", f"{m['spec']} -> {m['name']} ({m['kind']}: {m['path']})")
    table.add_row("device / dtype", f"{rec['device']} / {rec['dtype']}")
    if rec.get("tensor_parallel", {}).get("size", 1) > 1:
        table.add_row("tensor parallel", f"{rec['tensor_parallel']['size']} ranks ({rec['tensor_parallel']['backend']}); "
                      "times are the slowest rank's, density covers all heads")
    toks = f"{rec['prompt_tokens']}"
    if rec["truncated"]:
        toks += f" (truncated from {rec['document_tokens']})"
    table.add_row("prompt tokens", toks)
    unit = _unit(rec["prefill_ms"], rec.get("dense_prefill_ms") or 0.0)  # the PBS and dense rows alike
    table.add_row("prefill time", _fmt_ms(rec["prefill_ms"], unit) + _spread(rec["prefill_ms_all"], unit)
                  + ("  [--compile: norms, RoPE and MLP compiled; attention eager]" if rec.get("compiled") else ""))
    table.add_row("throughput", f"{rec['tokens_per_s']:,.0f} tokens/s")
    c = rec["config"]
    table.add_row("PBS parameters", f"profile {rec['profile']}: block {c['block_size']}, segment {c['segment_size']}, "
                  f"threshold {c['threshold']}, permute {c['permute']}, sink {c['sink']}, "
                  f"local_blocks {c['local_blocks']}, dense_below {c['dense_below']}" + _other_params(c))
    s = rec["layer_summary"]
    if s["density"] is not None:
        table.add_row("density", f"{rec['density']:.1%} overall; per layer {s['density_min']:.1%} - {s['density_max']:.1%}"
                      f" ({s['sparse_layers']} sparse, {s['dense_layers']} dense)")
    from pbs_kernels.graphs import GRAPHS_BELOW

    kernels = sorted({ly["kernel"] for ly in rec["layers"] if ly.get("kernel")})
    on_triton = any(k.startswith("triton/") for k in kernels)
    if kernels:
        note = " (sparse layers; PBS_PERM_MODE overrides the read mode)" if on_triton else " (sparse layers)"
        table.add_row("attention kernel", ", ".join(kernels) + note)
    if rec.get("cuda_graph_layers"):
        table.add_row("CUDA graphs", f"{rec['cuda_graph_layers']} sparse layers replayed from one captured layer "
                      "(PBS_CUDA_GRAPHS=0 turns this off)")
    elif on_triton and rec["prompt_tokens"] >= GRAPHS_BELOW:
        table.add_row("CUDA graphs", f"none: layers of {GRAPHS_BELOW:,} tokens or more keep the GPU busy "
                      "longer than their launches take (PBS_CUDA_GRAPHS=1 captures them anyway)")
    dense_reasons = sorted({ly["reason"] for ly in rec["layers"] if ly["path"] == "dense"})
    if dense_reasons:
        table.add_row("dense because", "; ".join(dense_reasons))
    if "dense_prefill_ms" in rec:
        backend = (rec.get("dense_sdpa") or {}).get("backend", "PyTorch's choice")
        table.add_row("dense SDPA prefill",
                      f"{_fmt_ms(rec['dense_prefill_ms'], unit)} ({backend})"
                      + _spread(rec["dense_prefill_ms_all"], unit))
        table.add_row("speedup", f"{rec['speedup']:.2f}x vs dense SDPA" + speedup_caveat(rec))
        table.add_row("top-1 agreement", f"{rec['top1_agreement']:.2%} of {rec['prompt_tokens']} positions")
        table.add_row("mean KL(dense||pbs)", f"{rec['mean_kl']:.4f} nats")
    c = rec.get("continuation")
    if c:
        table.add_row("continued", f"last {c['tokens']} tokens over the KV cache of a PBS prefill of "
                      f"{c['prefix_tokens']}, dense attention: top-1 {c['top1_agreement']:.2%}, mean KL "
                      f"{c['mean_kl']:.4f} nats, perplexity {c['ppl']:.3f} vs {c['ppl_dense']:.3f} dense "
                      f"({c['ppl_increase']:+.1%})")
    g = rec.get("generation")
    if g:
        table.add_row("generated", f"{len(g['token_ids'])} tokens in {_fmt_ms(g['decode_ms'])}: {g['text']!r}")
    out.print(table)


# -- the command ----------------------------------------------------------------------------


@command_boundary
def command(
    doc: Annotated[str, typer.Argument(help="UTF-8 text file to prefill; - reads stdin.", show_default=False)],
    model: Annotated[str, typer.Option("--model", "-m", help="Alias (llama, smollm2), local directory, .gguf file, "
                                       "or Hugging Face id in the local cache.")] = DEFAULT_MODEL,
    profile: Annotated[str | None, typer.Option("--profile", "-p", help="PBS preset name (default: the alias's, "
                                                "else 'default'). See `pbs env` for the list.")] = None,
    threshold: Annotated[float | None, typer.Option("--threshold", "-t", help="Top-p share of block attention "
                                                    "to keep, in (0, 1]; 1.0 = dense.")] = None,
    block_size: Annotated[int | None, typer.Option("--block-size", help="Tokens per block (power of two >= 16).")] = None,
    segment_size: Annotated[int | None, typer.Option("--segment-size", help="Permutation segment, a multiple "
                                                     "of the block size.")] = None,
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
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
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
    summary = _layer_summary(pbs.layers)
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
