"""`pbs prefill`'s work, from a checked request to its JSON record: the model and document resolved, the
tensor-parallel ranks launched, the weights loaded, the timed PBS (and dense) passes, the trace, the
fidelity comparison and the generation. Notes on the way go to stderr; the record is printed and saved
by ``pbs_cli.render.prefill``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..console import debug_enabled, err
from ..errors import UsageError
from . import compiling, distributed, fidelity, integration, models, presets, reports
from .documents import read_document
from .prefill import (PrefillResult, PrefillSpec, choose_dense_backend, greedy_generate, layer_summary,
                      out_of_memory_hint, run_prefills, tokenize, warn_if_not_sparse, write_trace)


@dataclass(frozen=True)
class PrefillRequest:
    """The options of one `pbs prefill` (``--max-tokens`` parsed); ``run`` checks them (``check``) before
    anything is loaded."""

    doc: str
    model: str
    profile: str | None = None
    threshold: float | None = None
    block_size: int | None = None
    segment_size: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    max_new_tokens: int = 0
    compare_dense: bool = False
    continuation: int | None = None
    truncate: bool = False
    max_tokens: int | None = None  # parsed --max-tokens
    beyond_context: bool = False
    rope_scaling: str = "none"
    warmup: int | None = None
    iters: int | None = None
    compile_layers: bool = False
    seed: int = 0
    trace: Path | None = None
    include_text: bool = False
    tp: int | None = None

    @property
    def overrides(self) -> dict[str, Any]:
        return dict(threshold=self.threshold, block_size=self.block_size, segment_size=self.segment_size)


def check(req: PrefillRequest) -> None:
    """Usage errors of the options together, before the device is probed or anything is read."""
    presets.resolve_config(req.profile, **req.overrides)
    if req.device_map not in (None, "auto"):
        raise UsageError(f"invalid --device-map {req.device_map!r}; only 'auto' is supported")
    models.check_rope_scaling(req.rope_scaling)
    if req.rope_scaling != "none" and not req.beyond_context:
        raise UsageError("--rope-scaling stretches RoPE past the model's trained positions: add --beyond-context")
    if req.compile_layers and req.warmup == 0:
        raise UsageError("--compile needs --warmup 1 or more: the first forward of each kind compiles")
    if req.continuation and not req.compare_dense:
        raise UsageError("--continuation compares against a dense prefill: add --compare-dense")


def _note(text: str) -> None:
    err.print(text, highlight=False, markup=False, soft_wrap=True)


@dataclass
class _Setup:
    """What the request resolves to before the weights load."""

    req: PrefillRequest
    dev: str
    config: Any
    profile_name: str
    torch_dtype: Any
    text: str
    doc_name: str
    spec: models.ModelSpec
    tpi: distributed.TPInfo


def _resolve(req: PrefillRequest) -> _Setup:
    """Device, preset, dtype, document and model; launches the tensor-parallel ranks (``--tp``)."""
    dev = models.resolve_device(req.device)
    config, profile_name = presets.resolve_config(req.profile, device=dev, **req.overrides)
    torch_dtype = models.resolve_dtype(req.dtype, dev)
    if req.tp and req.tp > 1 and req.doc == "-":
        raise UsageError("--tp runs the command on several ranks, which cannot share stdin; pass a file, not -")
    text, doc_name = read_document(req.doc)
    spec = models.resolve_model(req.model)
    # -- tensor parallel (pbs_cli.engine.distributed): refuse what cannot shard, re-run on N ranks, join the group --
    distributed.check_launch_environment(req.tp or distributed.env_world_size(), req.device, req.device_map)
    if distributed.needs_launch(req.tp):
        distributed.check_model_config(req.tp, models.ModelSource(spec).config(), spec.name)
        distributed.relaunch(req.tp)  # exits with the ranks' exit code
    tpi = distributed.tp_context(req.tp, req.device)
    if req.profile is None and spec.profile and spec.profile != profile_name:
        config, profile_name = presets.resolve_config(spec.profile, device=dev, explicit=False, **req.overrides)
    if req.profile is None and profile_name == presets.GPU_PROFILE:
        err.print(f"profile: {presets.GPU_PROFILE!r} (on a GPU, planning the default preset's sampled selection "
                  "costs a sixth to a half of a dense attention layer; --profile default forces it)",
                  highlight=False, markup=False)
    return _Setup(req, dev, config, profile_name, torch_dtype, text, doc_name, spec, tpi)


@dataclass
class _Prompt:
    """The tokenized prompt and what follows from its length."""

    source: models.ModelSource
    ids: list[int]
    doc_tokens: int
    trained: int | None
    continuation: int
    past_context: bool
    rope: dict[str, Any] | None
    warmup: int
    iters: int


def _prompt(s: _Setup) -> _Prompt:
    """Tokenize the document for the model; the continuation's size, notes on context and RoPE, the repeats."""
    req = s.req
    source = models.ModelSource(s.spec)
    if s.tpi.active:
        distributed.check_model_config(s.tpi.size, source.config(), s.spec.name)
        with distributed.main_rank_first():  # rank 0 builds a missing GGUF cache, the others then read it
            source.ensure_cache()
    trained = source.max_positions()
    limit, truncate = (None if req.beyond_context else trained), req.truncate
    if req.max_tokens is not None:
        cap = req.max_tokens + req.max_new_tokens
        limit, truncate = (cap if limit is None else min(limit, cap)), True
    ids, doc_tokens = tokenize(source.tokenizer(), s.text, limit, truncate, req.max_new_tokens, s.doc_name)
    continuation = _continuation(req, len(ids))
    total = len(ids) + req.max_new_tokens
    past_context = trained is not None and total > trained
    if past_context:
        _note(f"note: {len(ids)} prompt tokens exceed the model's {trained} trained positions (--beyond-context): "
              "timings are real; the outputs, and --compare-dense agreement, are out of distribution")
    rope = _rope(source, req.rope_scaling, total, trained)
    on_gpu = s.dev.startswith("cuda") or req.device_map == "auto"
    warmup = req.warmup if req.warmup is not None else (1 if on_gpu or req.compile_layers else 0)
    iters = req.iters if req.iters is not None else (3 if on_gpu else 1)
    return _Prompt(source, ids, doc_tokens, trained, continuation, past_context, rope, warmup, iters)


def _continuation(req: PrefillRequest, n: int) -> int:
    if not req.compare_dense or req.continuation == 0:
        return 0
    try:
        return fidelity.continuation_tokens(n, req.continuation)
    except ValueError as exc:
        raise UsageError(f"--continuation: {exc} (0 skips it)") from None


def _rope(source: models.ModelSource, scaling: str, positions: int, trained: int | None) -> dict[str, Any] | None:
    rope = models.rope_scaling(source.config(), scaling, positions)
    if rope:
        err.print(f"RoPE: {rope['rope_type']} x{rope['factor']:.3g} over {rope['original_max_position_embeddings']} "
                  "trained positions (--rope-scaling)", highlight=False, markup=False)
    elif scaling != "none":
        err.print(f"note: --rope-scaling {scaling} does nothing here: the {positions} positions "
                  f"fit the model's {trained} trained positions", highlight=False, markup=False)
    return rope


def _load(s: _Setup, p: _Prompt):
    """The weights, with the "pbs" attention (and the tensor-parallel plan, the stretched RoPE)."""
    _note(f"model: {s.spec.describe()}")
    with out_of_memory_hint("loading the weights for a prefill", len(p.ids), s.dev, _dtype_name(s)):
        loaded = p.source.load(s.torch_dtype, s.dev, s.req.device_map, attn_implementation=integration.NAME,
                               load_kwargs={**distributed.load_kwargs_for_tp(s.tpi.size),
                                            **({"rope_parameters": p.rope} if p.rope else {})})
    if loaded.cache == "built":
        _note(f"cached the dequantized weights in {loaded.weights}")
    return loaded


def _dtype_name(s: _Setup) -> str:
    return str(s.torch_dtype).removeprefix("torch.")


class _Run:
    """The loaded model and its input, with the out-of-memory hint of this prompt."""

    def __init__(self, s: _Setup, p: _Prompt, loaded):
        import torch

        self.s, self.p, self.loaded, self.mdl = s, p, loaded, loaded.model
        self.input_ids = torch.tensor([p.ids], device=self.mdl.device)

    def oom(self, step: str):
        return out_of_memory_hint(step, len(self.p.ids), str(self.mdl.device), _dtype_name(self.s))


def _dense_choice(r: _Run):
    """When dense attention runs (--compare-dense, or a prompt below dense_below): its fastest SDPA backend."""
    if not (r.s.req.compare_dense or len(r.p.ids) < r.s.config.dense_below):
        return None
    with models.progress("timing the SDPA backends for dense attention"), r.oom("timing the dense SDPA backends"):
        choice = choose_dense_backend(r.mdl, r.input_ids, r.s.config)
    if choice is not None:
        _note(f"dense attention: {choice.name} (fastest of "
              + ", ".join(f"{k} {v:.0f} ms" for k, v in choice.times_ms.items()) + " per forward)")
    return choice


def _specs(r: _Run) -> list[PrefillSpec]:
    """The timed setups: PBS (a prompt below dense_below runs the dense forward itself, recorded as dense),
    and dense SDPA with --compare-dense (timed in alternation with the PBS passes)."""
    n, below_at = len(r.p.ids), r.s.config.dense_below
    below = f"seq_len {n} < dense_below {below_at}" if n < below_at else None
    specs = [PrefillSpec(integration.DENSE_NAME if below else integration.NAME, r.s.req.max_new_tokens > 0, below)]
    if r.s.req.compare_dense:
        specs.append(PrefillSpec(integration.DENSE_NAME))
    return specs


def _timed(r: _Run, specs: list[PrefillSpec], choice) -> tuple[PrefillResult, list[PrefillResult]]:
    req = r.s.req
    with models.progress(f"prefill of {len(r.p.ids)} tokens with PBS attention"
                         + (" and with dense SDPA, alternating" if req.compare_dense else "")), \
            r.oom("in the prefill"), compiling.compiled_layers(r.mdl, req.compile_layers):
        pbs, *dense_runs = run_prefills(r.mdl, r.input_ids, specs, r.s.config, r.p.warmup, r.p.iters, dense=choice)
    integration.set_attention(r.mdl, integration.NAME)  # decode steps and --trace go through "pbs"
    pbs.times_ms = distributed.reduce_max(pbs.times_ms)  # tensor parallel: each run's slowest rank
    distributed.merge_layer_stats(pbs.layers)  # tensor parallel: densities over the heads of all ranks
    warn_if_not_sparse(pbs.layers, type(r.mdl).__name__)
    if pbs.graph_failure:
        _note(f"note: the sparse layers ran without CUDA graphs ({pbs.graph_failure})")
    return pbs, dense_runs


def _record(r: _Run, pbs: PrefillResult, choice) -> dict[str, Any]:
    s, p, loaded = r.s, r.p, r.loaded
    summary = layer_summary(pbs.layers)
    return reports.envelope(
        "prefill",
        document=s.doc_name,
        model={**s.spec.to_dict(), "weights": str(loaded.weights), "cache": loaded.cache,
               "architecture": type(r.mdl).__name__, "max_position_embeddings": p.trained},
        device=str(r.mdl.device),
        dtype=_dtype_name(s),
        profile=s.profile_name,
        config=s.config.to_dict(),
        document_tokens=p.doc_tokens,
        prompt_tokens=len(p.ids),
        truncated=len(p.ids) < p.doc_tokens,
        beyond_context=p.past_context,
        rope_scaling=p.rope,
        warmup=p.warmup,
        iters=p.iters,
        compiled=s.req.compile_layers,
        cuda_graph_layers=pbs.graph_replays,
        prefill_ms=pbs.median_ms,
        prefill_ms_all=pbs.times_ms,
        tokens_per_s=len(p.ids) / (pbs.median_ms / 1e3),
        density=summary["density"],
        layer_summary=summary,
        layers=[st.to_dict() for st in pbs.layers],
        load_s=loaded.load_s,
        tensor_parallel=s.tpi.to_dict(),
        dense_sdpa=choice.to_dict() if choice is not None else None,
    )


def _trace(r: _Run, spec: PrefillSpec, choice) -> dict[str, Any]:
    with models.progress("one PBS forward under torch.profiler (--trace)"), r.oom("in the traced PBS prefill"), \
            compiling.compiled_layers(r.mdl, r.s.req.compile_layers):
        return write_trace(r.s.req.trace, r.mdl, r.input_ids, spec, r.s.config, choice)


def _compare(r: _Run, pbs: PrefillResult, dense: PrefillResult) -> dict[str, Any]:
    """--compare-dense: the dense time, the speedup, top-1 and KL over every position, the continuation."""
    dense.times_ms = distributed.reduce_max(dense.times_ms)
    with models.progress("comparing next-token distributions"), r.oom("comparing the logits (--compare-dense)"):
        agreement = fidelity.compare_hidden(r.mdl, dense.hidden, pbs.hidden, r.input_ids)
    kl = agreement["mean_kl"]
    fields = dict(dense_prefill_ms=dense.median_ms, dense_prefill_ms_all=dense.times_ms,
                  speedup=dense.median_ms / pbs.median_ms, top1_agreement=agreement["top1_agreement"], mean_kl=kl)
    if not math.isfinite(kl):
        _note("warning: KL is not finite (the PBS output has NaN/inf)")
    integration.set_attention(r.mdl, integration.NAME)
    cont = r.p.continuation
    if cont:
        prefix = len(r.p.ids) - cont
        with models.progress(f"prefill of {prefix} tokens with PBS and with dense SDPA, then {cont} tokens "
                             "over each KV cache (--continuation)"), r.oom("in the continuation (--continuation)"):
            fields["continuation"] = fidelity.continuation_metrics(r.mdl, r.input_ids, r.s.config, prefix)
    return fields


def _generate(r: _Run, pbs: PrefillResult) -> dict[str, Any]:
    """--max-new-tokens: greedy tokens after the prefill (decode runs dense)."""
    n_new, tokenizer = r.s.req.max_new_tokens, r.loaded.tokenizer
    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    with models.progress(f"generating up to {n_new} tokens"), r.oom("generating after the prefill"):
        gen, decode_ms = greedy_generate(r.mdl, pbs.last_logits, pbs.cache, n_new, eos_ids)
    decode_ms = distributed.reduce_max(decode_ms)
    return {"token_ids": gen, "text": tokenizer.decode(gen, skip_special_tokens=True),
            "decode_ms": decode_ms, "decode_tokens_per_s": len(gen) / max(decode_ms / 1e3, 1e-9)}


def run(req: PrefillRequest) -> dict[str, Any] | None:
    """Check and run a request; its JSON record (None on the other ranks of a tensor-parallel run: rank 0
    alone prints and writes)."""
    import torch

    check(req)
    s = _resolve(req)
    models.quiet_transformers(debug_enabled())
    torch.manual_seed(req.seed)
    p = _prompt(s)
    r = _Run(s, p, _load(s, p))
    choice = _dense_choice(r)
    specs = _specs(r)
    pbs, dense_runs = _timed(r, specs, choice)
    rec = _record(r, pbs, choice)
    if req.trace is not None:
        rec["trace"] = _trace(r, specs[0], choice)
    if req.compare_dense:
        rec.update(_compare(r, pbs, dense_runs[0]))
    if req.max_new_tokens > 0:
        rec["generation"] = _generate(r, pbs)
    if req.include_text:
        rec["text"] = s.text
    return rec if distributed.is_main_rank() else None
