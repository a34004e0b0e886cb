"""Prefill runs: tokenizing a document for a model, timing forwards with PBS or dense attention (alternating
setups), choosing the dense SDPA backend, greedy decoding after a prefill, tracing one forward, and the
per-layer summary of a run. `pbs prefill`, `pbs eval` and `pbs calibrate` run their models through these."""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import dense_sdpa, integration
from . import fidelity as fidelity_metrics
from ..console import err
from ..errors import OutOfMemory, UsageError
from . import models


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
    from . import traces

    cuda = input_ids.is_cuda
    one = PrefillSpec(spec.attn, keep_cache=False, record_dense=spec.record_dense)
    prof = traces.record(lambda: run_prefills(model, input_ids, [one], config, 0, 1, dense=dense), input_ids.device)
    integration.set_attention(model, integration.NAME)
    traces.save(prof, path)
    top = traces.top_ops(prof, cuda)
    busy = traces.gpu_busy(prof) if cuda else None
    if busy:
        err.print(f"GPU busy {busy['busy_ms']:.1f} ms of the traced forward's {busy['span_ms']:.1f} ms"
                  + (" (the rest waited on the host: Python, launches)"
                     if busy["busy_ms"] < 0.9 * busy["span_ms"] else ""),
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


def layer_summary(layers: list[integration.LayerStat]) -> dict[str, Any]:
    dens = [s.density for s in layers if s.density is not None]
    return {
        "density": sum(dens) / len(dens) if dens else None,
        "density_min": min(dens) if dens else None,
        "density_max": max(dens) if dens else None,
        "sparse_layers": sum(1 for s in layers if s.path == "pbs"),
        "dense_layers": sum(1 for s in layers if s.path == "dense"),
    }
