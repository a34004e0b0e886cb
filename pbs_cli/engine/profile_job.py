"""`pbs profile`'s work, from its options to the finished document: the shape (defaults, a model's
config, flags, or Q/K/V captured from a model's forward), the tensor-parallel ranks, and the sweep over
lengths, each length's records handed on as it finishes (``on_length``). Ctrl-C ends the sweep with
the lengths that finished (``ProfileResult.interrupted``). Writing the outputs is
``pbs_cli.render.profile``'s."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..console import debug_enabled, err
from ..errors import UnsupportedError, UsageError, is_out_of_memory
from . import distributed, models, presets, reports
from .memory import free_memory_bytes
from .profile_records import BACKENDS, skipped, summarize
from .profiling import Case, Profiler, Settings, input_bytes, unavailable_here
from .sizes import format_size, parse_sizes
from .workloads import PATTERNS

# Llama-3.1-8B attention: 32 query heads, 8 KV heads, head_dim 128
DEFAULT_SHAPE = {"batch": 1, "heads": 32, "kv_heads": 8, "head_dim": 128}
DEFAULT_LENGTHS = {"cuda": "8k,32k,128k", "cpu": "1k,4k"}

Records = list[dict[str, Any]]


@dataclass(frozen=True)
class ProfileRequest:
    """The options of one `pbs profile` (its output options aside)."""

    seq_len: str | None = None
    model: str | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    batch: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    profile: str | None = None
    threshold: float | None = None
    block_size: int | None = None
    segment_size: int | None = None
    backends: str | None = None
    pattern: str = "mixed"
    seed: int = 0
    from_model: str | None = None
    doc: Path | None = None
    layers: str = "0"
    warmup: int | None = None
    iters: int = 3
    budget: float = 1.0
    recall_rows: int = 32
    reference_max_len: int = 16384
    trace: Path | None = None
    tp: int | None = None


@dataclass
class ProfileResult:
    doc: dict[str, Any]  # the document: envelope, results, summary (and "incomplete" after Ctrl-C)
    sizes: list[int]  # the lengths asked for
    main: bool = True  # rank 0 (the only rank without tensor parallelism): it writes the outputs
    interrupted: bool = False
    traced: bool = False  # --trace: a PBS pass was traced

    @property
    def finished(self) -> list[int]:
        return list(dict.fromkeys(r["seq_len"] for r in self.doc["results"]))

    @property
    def nothing_fit(self) -> bool:
        """Every result a skip for memory: no report of nothing but failures."""
        results = self.doc["results"]
        return bool(results) and all(
            r["status"] != "ok" and ("GiB" in (r.get("reason") or "") or "out of memory" in (r.get("reason") or ""))
            for r in results)


def parse_backends(text: str | None) -> tuple[str, ...]:
    if text is None:
        return BACKENDS
    names = [x.strip().lower() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in BACKENDS]
    if unknown or not names:
        raise UsageError(f"unknown backend(s) {', '.join(unknown) or repr(text)}; valid: {', '.join(BACKENDS)}")
    return tuple(dict.fromkeys(names))


def parse_layers(text: str) -> list[int]:
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"invalid --layers {text!r}; use comma-separated layer indices, e.g. 0,10,-1") from None
    if not layers:
        raise UsageError(f"no layers in --layers {text!r}")
    return list(dict.fromkeys(layers))


def shape_from_model(spec_text: str) -> tuple[dict[str, int], str]:
    """Attention shape from a model's config (no weights read). Returns (shape, description)."""
    spec = models.resolve_model(spec_text)
    heads, kv, head_dim = models.attention_shape(models.ModelSource(spec).config())
    return {"batch": 1, "heads": heads, "kv_heads": kv, "head_dim": head_dim}, spec.describe()


def _check_backends_here(names: tuple[str, ...], dev: torch.device) -> None:
    """Named backends that cannot run on this device: all of them is exit 3 (nothing would be measured),
    some of them a warning (they are reported as skipped)."""
    missing = {name: why for name in names if (why := unavailable_here(name, dev))}
    if not missing:
        return
    listed = "; ".join(f"{name} {why}" for name, why in missing.items())
    if len(missing) == len(names):
        raise UnsupportedError(f"no --backends can run on {dev.type}: {listed}; name others (e.g. pbs,sdpa-math)")
    err.print(f"warning: {listed}: reported as skipped", highlight=False, markup=False)


def _check_tp_shape(req: ProfileRequest) -> None:
    """Before launching ranks: refuse a --tp that does not divide the heads of the profiled shape."""
    if req.from_model is not None:
        spec = models.resolve_model(req.from_model)
        h, hk, _, _ = distributed.model_dims(models.ModelSource(spec).config())
        name = spec.name
    else:
        h, hk, name = DEFAULT_SHAPE["heads"], DEFAULT_SHAPE["kv_heads"], "the default Llama-3.1-8B shape"
        if req.model is not None:
            shape, name = shape_from_model(req.model)
            h, hk = shape["heads"], shape["kv_heads"]
        if req.heads or req.kv_heads:
            h, hk, name = req.heads or h, req.kv_heads or hk, "--heads/--kv-heads"
    distributed.check_tp_size(req.tp, h, hk, name=name)


def _launch(req: ProfileRequest) -> distributed.TPInfo:
    """Tensor parallel (pbs_cli.engine.distributed): re-run on N ranks, each timing its own heads."""
    distributed.check_launch_environment(req.tp or distributed.env_world_size(), req.device)
    if distributed.needs_launch(req.tp):
        _check_tp_shape(req)
        distributed.relaunch(req.tp)  # exits with the ranks' exit code
    return distributed.tp_context(req.tp, req.device)


@dataclass
class _Plan:
    """What the request resolves to before any Q/K/V exists."""

    req: ProfileRequest
    tpi: distributed.TPInfo
    dev: torch.device
    dtype: torch.dtype
    sizes: list[int]
    names: tuple[str, ...]
    config: Any
    profile_name: str
    layer_list: list[int] = field(default_factory=list)
    shape: dict[str, int] = field(default_factory=dict)
    shape_source: str = ""


def _resolve(req: ProfileRequest, tpi: distributed.TPInfo) -> _Plan:
    """Device, dtype, lengths, backends, workload and preset, every usage error before any work."""
    dev = torch.device(models.resolve_device(req.device))
    torch_dtype = models.resolve_dtype(req.dtype, str(dev))
    sizes = parse_sizes(req.seq_len if req.seq_len is not None else DEFAULT_LENGTHS[
        "cuda" if dev.type == "cuda" else "cpu"])
    if min(sizes) < 2:
        raise UsageError(f"--seq-len must be at least 2 tokens, got {min(sizes)}")
    names = parse_backends(req.backends)
    if req.backends is not None:
        _check_backends_here(names, dev)
    if req.pattern not in PATTERNS:
        raise UsageError(f"unknown --pattern {req.pattern!r}; choose one of {', '.join(PATTERNS)}")
    config, profile_name = presets.resolve_config(req.profile, device=str(dev), threshold=req.threshold,
                                                  block_size=req.block_size, segment_size=req.segment_size)
    plan = _Plan(req, tpi, dev, torch_dtype, sizes, names, config, profile_name)
    if req.from_model is not None:
        if req.doc is None:
            raise UsageError("--from-model needs --doc FILE (the text to run the model on)")
        if any(x is not None for x in (req.model, req.heads, req.kv_heads, req.head_dim, req.batch)):
            raise UsageError("--model/--heads/--kv-heads/--head-dim/--batch do not apply with --from-model "
                             "(the captured tensors have the model's shape)")
        plan.layer_list = parse_layers(req.layers)
    elif req.doc is not None:
        raise UsageError("--doc needs --from-model MODEL")
    plan.shape, plan.shape_source = _shape(req)
    return plan


def _shape(req: ProfileRequest) -> tuple[dict[str, int], str]:
    """Default, a model's config, then the flags on top; refuses heads that GQA or --tp cannot split."""
    shape, source = dict(DEFAULT_SHAPE), "default (Llama-3.1-8B attention)"
    if req.model is not None:
        shape, source = shape_from_model(req.model)
    for key in ("heads", "kv_heads", "head_dim", "batch"):
        value = getattr(req, key)
        if value is not None:
            shape[key] = value
            source = "flags" if req.model is None else source + " with flags"
    if shape["heads"] % shape["kv_heads"]:
        raise UsageError(f"--heads ({shape['heads']}) must be a multiple of --kv-heads ({shape['kv_heads']})")
    distributed.check_tp_size(req.tp or distributed.env_world_size(), shape["heads"], shape["kv_heads"], name=source)
    return shape, source


def _settings(plan: _Plan) -> Settings:
    req = plan.req
    warmup = req.warmup if req.warmup is not None else (2 if plan.dev.type == "cuda" else 1)
    return Settings(config=plan.config, backends=plan.names, warmup=warmup, iters=req.iters, budget_s=req.budget,
                    recall_rows=req.recall_rows, reference_max_len=req.reference_max_len, seed=req.seed,
                    explicit_backends=req.backends is not None)


@dataclass
class _Workload:
    sizes_run: list[int]  # the lengths that run (a captured document may be shorter than some)
    record: dict[str, Any]
    captured: dict[int, tuple] | None = None


def _capture(plan: _Plan) -> _Workload:
    """--from-model: one forward at the longest length, prefixes for shorter ones; the shape becomes the
    model's. Otherwise the synthetic workload of --pattern at every length."""
    req = plan.req
    if req.from_model is None:
        return _Workload(plan.sizes, {"source": "synthetic", "pattern": req.pattern, "seed": req.seed})
    from .documents import read_document
    from .workloads import captured_qkv

    text, doc_name = read_document(str(req.doc))
    spec = models.resolve_model(req.from_model)
    err.print(f"model: {spec.describe()}", highlight=False, markup=False)
    models.quiet_transformers(debug_enabled())
    source = models.ModelSource(spec)
    ids = source.tokenizer()(text, add_special_tokens=True)["input_ids"]
    sizes_run = _lengths_of_document(plan.sizes, len(ids), doc_name)
    longest = max(sizes_run)
    loaded = source.load(plan.dtype, str(plan.dev), attn_implementation="sdpa")
    tokens = torch.tensor([ids[:longest]], device=loaded.model.device)
    with models.progress(f"capturing Q/K/V of layer(s) {','.join(map(str, plan.layer_list))} over {longest} tokens"):
        try:
            captured = captured_qkv(loaded.model, tokens, plan.layer_list)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    del loaded
    q0, k0 = next(iter(captured.values()))[:2]
    plan.shape = {"batch": 1, "heads": q0.shape[1], "kv_heads": k0.shape[1], "head_dim": q0.shape[3]}
    plan.shape_source = f"captured from {spec.name}"
    distributed.check_tp_size(req.tp or distributed.env_world_size(), plan.shape["heads"], plan.shape["kv_heads"],
                              name=spec.name)
    plan.dtype = q0.dtype
    return _Workload(sizes_run, {"source": "model", "model": spec.to_dict(), "document": doc_name,
                                 "document_tokens": len(ids), "layers": sorted(captured)}, captured)


def _lengths_of_document(sizes: list[int], tokens: int, doc_name: str) -> list[int]:
    too_long = [n for n in sizes if n > tokens]
    if too_long:
        err.print(f"document has {tokens} tokens: skipping --seq-len {', '.join(map(format_size, too_long))}",
                  highlight=False, markup=False)
    sizes_run = [n for n in sizes if n <= tokens]
    if not sizes_run:
        raise UsageError(f"document {doc_name!r} has only {tokens} tokens, fewer than every --seq-len; "
                         "pass a longer document or a shorter --seq-len")
    return sizes_run


def _document(plan: _Plan, settings: Settings, workload: _Workload) -> dict[str, Any]:
    req = plan.req
    return reports.envelope(
        "profile", device=str(plan.dev), dtype=str(plan.dtype).removeprefix("torch."),
        shape={**plan.shape, "source": plan.shape_source}, tensor_parallel=plan.tpi.to_dict(),
        profile=plan.profile_name, pbs=plan.config.to_dict(), workload=workload.record,
        seq_lens=plan.sizes, backends=list(plan.names),
        measurement={"warmup": settings.warmup, "min_repeats": req.iters, "budget_s": req.budget,
                     "recall_rows": req.recall_rows,
                     "timer": "cuda events" if plan.dev.type == "cuda" else "time.perf_counter"},
        results=[], summary={},
    )


def write_trace(path: Path, case: Case, settings: Settings) -> None:
    """One PBS pass under torch.profiler with ranges pbs.permute / pbs.select / pbs.attend; Chrome
    trace JSON (gzip-compressed when ``path`` ends in .gz), written atomically."""
    from torch.profiler import record_function

    from pbs_kernels.attention import pbs_attention
    from pbs_kernels.block_mask import PermutedBlockMask
    from pbs_kernels.permute import compute_permutation
    from pbs_kernels.select import select_blocks

    from . import traces

    q, k, v = case.q, case.k, case.v
    cfg, scale = settings.config, settings.scale

    def one_pass() -> None:
        with record_function("pbs.permute"):
            perm = compute_permutation(q, k, cfg, scale)
        with record_function("pbs.select"):
            num, idx = select_blocks(q, k, perm, cfg, scale)
        with record_function("pbs.attend"):
            mask = PermutedBlockMask(perm, num, idx, cfg.block_size, cfg.segment_size, q.shape[2])
            pbs_attention(q, k, v, mask, scale)

    traces.save(traces.record(one_pass, q.device), path)


def _cases(n: int, plan: _Plan, captured) -> list[Case]:
    """Q/K/V of one length: the captured layers' prefixes, or the synthetic workload (this rank's heads)."""
    from .workloads import synthetic_qkv

    if captured is not None:
        return [Case(*distributed.local_heads(q[:, :, :n], k[:, :, :n], v[:, :, :n]), layer)
                for layer, (q, k, v) in captured.items()]
    s, req = plan.shape, plan.req
    q, k, v = synthetic_qkv(s["batch"], s["heads"], s["kv_heads"], n, s["head_dim"], seed=req.seed, dtype=plan.dtype,
                            device=plan.dev, pattern=req.pattern)
    return [Case(*distributed.local_heads(q, k, v))]  # tensor parallel: this rank's heads


def _skip_all(n: int, names: tuple[str, ...], reason: str) -> Records:
    err.print(f"skipping N={format_size(n)}: {reason}", highlight=False, markup=False)
    return [skipped(n, x, reason) for x in names]


def _run_length(n: int, captured, profiler: Profiler, settings: Settings, plan: _Plan,
                trace: Path | None) -> Records:
    """All cases of one length: generate (or slice) Q/K/V, run the profiler, optionally trace."""
    try:
        cases = _cases(n, plan, captured)
    except Exception as exc:  # noqa: BLE001
        if not is_out_of_memory(exc):
            raise
        if plan.dev.type == "cuda":
            torch.cuda.empty_cache()
        return _skip_all(n, settings.backends,
                         f"out of memory while creating the inputs ({str(exc).splitlines()[0][:100]})")
    recs: Records = []
    for case in cases:
        recs.extend(profiler.run(case))
    if trace is not None and "pbs" in settings.backends and _pbs_ran(recs):
        write_trace(trace, cases[-1], settings)
    del cases
    if plan.dev.type == "cuda":
        torch.cuda.empty_cache()
    return recs


def _pbs_ran(recs: Records) -> bool:
    return any(r["backend"] == "pbs" and r["status"] == "ok" for r in recs)


def _length(n: int, plan: _Plan, workload: _Workload, profiler: Profiler, settings: Settings) -> Records:
    """One length's records: skipped when the document is shorter or the inputs cannot fit in memory."""
    if n not in workload.sizes_run:
        return [skipped(n, x, "the document is shorter than this length") for x in plan.names]
    s, captured = plan.shape, workload.captured
    need = input_bytes(s["batch"], s["heads"], s["kv_heads"], n, s["head_dim"], plan.dtype) * (
        len(captured) if captured else 1)
    free = free_memory_bytes(plan.dev)
    if captured is None and need > 0.9 * free:
        return _skip_all(n, plan.names, f"inputs need ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free on "
                                        f"{plan.dev.type}; try a shorter --seq-len or fewer heads")
    return _run_length(n, captured, profiler, settings, plan, plan.req.trace if plan.tpi.is_main else None)


def _say_failures(n: int, recs: Records) -> None:
    """A backend that ran out of memory or failed: say so now, the sweep goes on."""
    for r in recs:
        why = r.get("reason") or ""
        if r["status"] != "ok" and why.startswith(("out of memory", "failed:")):
            where = format_size(n) + (f" layer {r['layer']}" if r.get("layer") is not None else "")
            err.print(f"skipping {r['backend']} at N={where}: {why}", highlight=False, markup=False)


def _sweep(plan: _Plan, workload: _Workload, settings: Settings, result: ProfileResult,
           on_length: Callable[[Records], None]) -> None:
    """Every length in turn, with a progress bar on a terminal's stderr; records go to ``result`` and
    ``on_length`` as each length finishes."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), TimeElapsedColumn(),
                        console=err, transient=True, disable=not err.is_terminal)
    task = progress.add_task("profiling", total=len(plan.sizes))
    profiler = Profiler(settings, on_step=lambda s: progress.update(task, description=s))
    with progress:
        for n in plan.sizes:
            recs = _length(n, plan, workload, profiler, settings)
            result.traced = result.traced or (plan.req.trace is not None and _pbs_ran(recs))
            recs = distributed.merge_profile_records(recs)  # tensor parallel: all heads, slowest rank
            _say_failures(n, recs)
            result.doc["results"].extend(recs)
            if result.main:
                on_length(recs)
            progress.advance(task)


def run(req: ProfileRequest, on_start: Callable[[dict[str, Any]], None] = lambda doc: None,
        on_length: Callable[[Records], None] = lambda recs: None) -> ProfileResult:
    """Profile every length of the request. ``on_start(document)`` before the first length and
    ``on_length(records)`` after each (rank 0 only); Ctrl-C returns what finished, ``interrupted``."""
    tpi = _launch(req)
    plan = _resolve(req, tpi)
    settings = _settings(plan)
    workload = _capture(plan)
    result = ProfileResult(_document(plan, settings, workload), plan.sizes, main=tpi.is_main)
    if result.main:
        on_start(result.doc)
    try:
        _sweep(plan, workload, settings, result, on_length)
    except KeyboardInterrupt:  # Ctrl-C: every finished length is kept, marked incomplete
        result.interrupted = True
        if result.finished:
            result.doc["incomplete"] = {"reason": "interrupted", "finished_seq_lens": result.finished,
                                        "missing_seq_lens": [n for n in plan.sizes if n not in result.finished]}
    result.doc["summary"] = summarize(result.doc["results"])
    return result
