"""The attention profiler behind `pbs profile`: backends, measurements and result records.

One *case* is one attention problem (q, k, v at one length, one layer for captured inputs). For a
case, every requested backend is timed on the same tensors; PBS is timed per phase (permute,
select, attend) and end to end; each sparse result is compared against a dense output.

Backends (``BACKENDS``):

- ``pbs``            ``pbs_kernels``' dispatch: Triton on CUDA, the PyTorch reference on CPU. On CUDA its
  end-to-end time is that of a layer inside ``pbs prefill``: below 64K tokens the input copies and the
  replay of a CUDA graph of permute + select + attend (``pbs_kernels.graphs``; the eager time is in
  ``notes``), from ``GRAPHS_BELOW`` tokens on the eager calls, as there; the phase times are eager.
  End to end (``pbs_prefill_attention``) the selection's pooling pass also makes the permuted K/V
  copies; as phases, the attend phase makes them itself (``pbs_attention`` given a plan).
- ``sdpa-cudnn``, ``sdpa-flash``, ``sdpa-efficient``, ``sdpa-math``: ``F.scaled_dot_product_attention``
  (causal) restricted to one SDPA backend each. GQA runs with ``enable_gqa=True`` where the backend
  accepts it, else on K/V expanded to H_q heads beforehand (outside the timed region; noted).
- ``flex``           FlexAttention (``torch.compile(flex_attention)``, CUDA only) with a ``BlockMask``
  equivalent to the PBS plan: K/V gathered into permuted order, the plan's off-diagonal blocks as
  full blocks, every block of the diagonal segment as a partial block whose ``mask_mod`` applies
  causality on *original* positions (``perm[kv] <= q``) -- exactly the plan's key set. Its time is
  PBS's permute + select plus FlexAttention's gather + attention.
- ``reference``      the plain-PyTorch twin (``pbs_kernels.reference``), plan and attention.

Numbers per record (all times in ms; spread = quartiles and min/max over the repeats):

- ``tflops``: dense-equivalent throughput, causal FLOPs / time, where causal FLOPs =
  ``2 * 2 * N^2 * D * H_q * B / 2`` = ``2 * N^2 * D * H_q * B`` (two matmuls, half the square).
- ``tflops_computed``: FLOPs actually computed, ``density * causal FLOPs``, over the attend time.
- ``speedup``: best dense SDPA time (the fastest ``sdpa-*`` at that length, named in ``best_dense``)
  / this backend's time; ``attend_speedup``: the same over the attend phase alone (sparse backends);
  ``plan_share``: the planning phases (permute + select) over that dense time (sparse backends), the share
  of a dense layer that choosing the blocks costs.
- ``rel_l2_error``: ``||out - dense||_2 / ||dense||_2`` against one dense output (``error_vs``).
- ``recall_mean``/``recall_min``: share of the full causal attention mass (softmax over all keys) that
  the kept blocks cover, over sampled query rows and all heads.
- ``kernel`` (pbs rows): the attention implementation that ran, "reference" or "triton/MODE" with the
  Triton read mode (``pbs_kernels.attention.attention_kernel``; ``PBS_PERM_MODE`` overrides the rule).
"""

from __future__ import annotations

import dataclasses
import math
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from pbs_kernels import PBSConfig, reference
from pbs_kernels.attention import attention_kernel, pbs_attention, pbs_prefill_attention
from pbs_kernels.block_mask import PermutedBlockMask
from pbs_kernels.graphs import GRAPHS_BELOW, LayerGraphs, worth_capturing
from pbs_kernels.graphs import enabled as graphs_enabled
from pbs_kernels.permute import compute_permutation
from pbs_kernels.select import select_blocks

from ..console import debug_enabled
from ..errors import is_out_of_memory
from .dense_sdpa import probe_sdpa, sdpa_call
from .memory import free_memory_bytes
from .profile_records import DENSE_BACKENDS, SPARSE_BACKENDS, causal_flops, result, skipped
from .timing import Timing, bench


@dataclass
class Settings:
    """How to measure. ``budget_s``: seconds per measurement (repeats adapt); ``iters``: min repeats."""

    config: PBSConfig
    backends: tuple[str, ...]
    warmup: int = 1
    iters: int = 3
    max_iters: int = 50
    budget_s: float = 1.0
    recall_rows: int = 32
    reference_max_len: int = 16384
    seed: int = 0
    scale: float | None = None
    explicit_backends: bool = False  # the user named the backends (time "reference" even where pbs == reference)


def _timing_fields(t: Timing) -> dict[str, Any]:
    return dict(median_ms=t.median_ms, q25_ms=t.q25_ms, q75_ms=t.q75_ms, min_ms=t.min_ms, max_ms=t.max_ms,
                repeats=t.repeats, peak_mem_mib=t.peak_mem_mib)


def input_bytes(batch: int, heads: int, kv_heads: int, seq_len: int, head_dim: int, dtype: torch.dtype) -> int:
    """Memory of q, k, v, two outputs and one fp32 generation scratch head (what a case holds)."""
    elt = torch.empty((), dtype=dtype).element_size()
    tokens = batch * seq_len * head_dim
    return tokens * (3 * heads + 2 * kv_heads) * elt + seq_len * head_dim * 4 * 4


def math_sdpa_bytes(batch: int, heads: int, seq_len: int, dtype: torch.dtype) -> int:
    """The (B, H, N, N) score and probability matrices the math SDPA backend materializes."""
    elt = torch.empty((), dtype=dtype).element_size()
    return batch * heads * seq_len * seq_len * (2 * elt + 1)


# -- PBS plan helpers -----------------------------------------------------------------------------


def _slice_plan(plan: PermutedBlockMask, h0: int, h1: int, g_perm: int) -> PermutedBlockMask:
    """The plan restricted to query heads [h0, h1) (h0, h1 multiples of the permutation group)."""
    return PermutedBlockMask(plan.perm[:, h0 // g_perm : h1 // g_perm], plan.kv_num_blocks[:, h0:h1],
                             plan.kv_indices[:, h0:h1], plan.block_size, plan.segment_size, plan.seq_len)


def sample_rows(seq_len: int, count: int, seed: int, device: torch.device) -> torch.Tensor:
    """int64 (R,): distinct query rows spread over [N/8, N), always including the last row."""
    lo = seq_len // 8
    count = max(1, min(count, seq_len - lo))
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(seq_len - lo, generator=gen)[: count - 1] + lo
    rows = torch.cat([rows, torch.tensor([seq_len - 1])]).unique().sort().values
    return rows.to(device)


def recall_stats(q: torch.Tensor, k: torch.Tensor, plan: PermutedBlockMask, rows: torch.Tensor,
                 scale: float | None, max_elements: int = 1 << 27) -> tuple[float, float]:
    """(mean, min) attention-mass recall of ``plan`` over ``rows``, all heads; chunks of KV heads keep
    the (heads x rows x N) fp32 score matrix under ``max_elements``."""
    b, h_q, n, _ = q.shape
    h_kv = k.shape[1]
    g = h_q // h_kv
    g_perm = h_q // plan.perm.shape[1]
    step_q = max(g, g_perm)  # slices must hold whole GQA and permutation groups
    per_head = b * rows.numel() * n * 3  # scores, probabilities, key map
    heads_per_chunk = max(step_q, (max_elements // max(1, per_head)) // step_q * step_q)
    total, count, worst = 0.0, 0, float("inf")
    for h0 in range(0, h_q, heads_per_chunk):
        h1 = min(h_q, h0 + heads_per_chunk)
        r = reference.attention_recall(q[:, h0:h1], k[:, h0 // g : h1 // g], _slice_plan(plan, h0, h1, g_perm),
                                       rows, scale)
        total += float(r.double().sum())
        count += r.numel()
        worst = min(worst, float(r.min()))
    return total / max(1, count), worst


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in fp64 accumulation, one head at a time (no full fp32 copies)."""
    num = den = 0.0
    for h in range(out.shape[1]):
        a, r = out[:, h].double(), ref[:, h].double()
        num += float(((a - r) ** 2).sum())
        den += float((r**2).sum())
    return math.sqrt(num / den) if den > 0 else float("nan")


def unavailable_here(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` at all, known before any work (None: it may run;
    the SDPA backends' shape and dtype limits are probed per length, ``probe_sdpa``)."""
    if name in ("sdpa-cudnn", "sdpa-efficient") and device.type != "cuda":  # as probe_sdpa says
        return "needs a CUDA GPU"
    if name == "flex":
        return flex_available(device)
    return None


# -- FlexAttention --------------------------------------------------------------------------------

_compiled_flex = None


def flex_available(device: torch.device) -> str | None:
    """None when FlexAttention can be timed here, else the reason."""
    if device.type != "cuda":
        return "FlexAttention is timed on CUDA only (it compiles Triton kernels)"
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as exc:
        return f"torch {torch.__version__} has no FlexAttention ({exc})"
    return None


def flex_block_mask(plan: PermutedBlockMask, heads: int):
    """A FlexAttention ``BlockMask`` equivalent to ``plan`` over keys in permuted order.

    Off-diagonal kept blocks are full blocks (every permuted key there is earlier than the query);
    every block of the query's own segment is a partial block with ``perm[kv] <= q``.
    """
    from torch.nn.attention.flex_attention import BlockMask

    b, h_q, n_qb, n_kb = plan.kv_indices.shape
    device = plan.kv_indices.device
    bs = plan.block_size
    per_seg = plan.segment_size // bs
    diag = reference.segment_starts(n_qb, bs, plan.segment_size, device)  # (N_qb,)
    slot = torch.arange(n_kb, device=device)
    kept = slot < plan.kv_num_blocks[..., None]
    full_num = (kept & (plan.kv_indices < diag[:, None])).sum(-1).to(torch.int32)  # packed left, ascending
    part_num = (n_kb - diag).clamp(max=per_seg).to(torch.int32).expand(b, h_q, n_qb).contiguous()
    part_idx = (diag[:, None] + slot[None, :]).clamp(max=n_kb - 1).to(torch.int32).expand(b, h_q, n_qb, n_kb)
    n_pad = n_kb * bs
    perm = torch.nn.functional.pad(plan.perm, (0, n_pad - plan.seq_len), value=2**30)  # (B, H_perm, N_pad)
    g_perm = heads // plan.perm.shape[1]

    def mask_mod(bi, hi, q_idx, kv_idx):
        return perm[bi, hi // g_perm, kv_idx] <= q_idx

    return BlockMask.from_kv_blocks(part_num, part_idx.contiguous(), full_num, plan.kv_indices.contiguous(),
                                    BLOCK_SIZE=bs, mask_mod=mask_mod, seq_lengths=(plan.seq_len, plan.seq_len))


def flex_runner(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PermutedBlockMask,
                scale: float | None) -> Callable[[], torch.Tensor]:
    """A closure that gathers K/V into permuted order and runs compiled FlexAttention on the plan."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    mask = flex_block_mask(plan, q.shape[1])
    gqa = q.shape[1] != plan.perm.shape[1] or q.shape[1] != k.shape[1]
    # FlexAttention's kernel tiles must divide the mask's blocks (its H100 default is 128)
    options = {"BLOCK_M": plan.block_size, "BLOCK_N": plan.block_size} if plan.block_size < 128 else None

    def run() -> torch.Tensor:
        kp = reference.permute_keys(k, plan.perm)
        vp = reference.permute_keys(v, plan.perm)
        return _compiled_flex(q, kp, vp, block_mask=mask, scale=scale, enable_gqa=gqa and kp.shape[1] != q.shape[1],
                              kernel_options=options)

    return run


# -- one case -------------------------------------------------------------------------------------


@dataclass
class Case:
    """One attention problem: q (B, H_q, N, D), k/v (B, H_kv, N, D), optional layer index."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layer: int | None = None
    records: list[dict[str, Any]] = field(default_factory=list)


class Profiler:
    """Runs the backends of ``settings`` on cases; ``on_step(text)`` is called before each step."""

    def __init__(self, settings: Settings, on_step: Callable[[str], None] | None = None):
        self.s = settings
        self.on_step = on_step or (lambda text: None)

    def _bench(self, fn: Callable[[], object], device: torch.device, memory: bool = True) -> Timing:
        s = self.s
        return bench(fn, device, warmup=s.warmup, min_repeats=s.iters, max_repeats=max(s.iters, s.max_iters),
                     budget_s=s.budget_s, memory=memory)

    def run(self, case: Case) -> list[dict[str, Any]]:
        """Every backend on ``case``; returns its records (also kept in ``case.records``)."""
        q, k, v = case.q, case.k, case.v
        b, h_q, n, d = q.shape
        h_kv = k.shape[1]
        device = q.device
        s = self.s
        flops = causal_flops(b, h_q, n, d)
        recs: dict[str, dict[str, Any]] = {}
        dense_out: torch.Tensor | None = None
        dense_name: str | None = None

        def guarded(name: str, fn: Callable[[], dict[str, Any]]) -> None:
            self.on_step(f"N={n} {name}" + (f" layer {case.layer}" if case.layer is not None else ""))
            try:
                rec = fn()
                note = rec.pop("recall_note", None)
                if note:
                    rec["notes"] = f"{rec['notes']}; {note}" if rec.get("notes") else note
                recs[name] = rec
            except Exception as exc:  # noqa: BLE001 - one backend failing must not end the sweep
                first = str(exc).splitlines()[0][:160] if str(exc) else ""
                if is_out_of_memory(exc):
                    recs[name] = skipped(n, name, f"out of memory ({first})", case.layer)
                else:
                    if debug_enabled():
                        traceback.print_exc()
                    recs[name] = skipped(n, name, f"failed: {type(exc).__name__}: {first}", case.layer)
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()

        # -- dense baselines --
        for name in [x for x in s.backends if x in DENSE_BACKENDS]:
            mode, reason = probe_sdpa(name, device, q.dtype, h_q, h_kv, d)
            if mode is None:
                recs[name] = skipped(n, name, reason or "not available", case.layer)
                continue
            if name == "sdpa-math":
                need = math_sdpa_bytes(b, h_q, n, q.dtype)
                free = free_memory_bytes(device)
                if need > 0.8 * free:
                    recs[name] = skipped(n, name, f"needs ~{need / 2**30:.1f} GiB for its N x N matrices, "
                                         f"{free / 2**30:.1f} GiB free", case.layer)
                    continue
            kk, vv = ((k, v) if mode == "gqa"
                      else (k.repeat_interleave(h_q // h_kv, 1), v.repeat_interleave(h_q // h_kv, 1)))
            gqa = mode == "gqa" and h_q != h_kv

            def dense_case(name=name, kk=kk, vv=vv, gqa=gqa, mode=mode) -> dict[str, Any]:
                nonlocal dense_out, dense_name
                keep: dict[str, torch.Tensor] = {}
                t = self._bench(lambda: keep.__setitem__("out", sdpa_call(name, q, kk, vv, gqa, s.scale)), device)
                if dense_out is None:
                    dense_out, dense_name = keep["out"], name
                keep.clear()
                return result(n, name, case.layer, **_timing_fields(t), attend_ms=t.median_ms, density=1.0,
                              tflops=flops / (t.median_ms * 1e9), tflops_computed=flops / (t.median_ms * 1e9),
                              notes=("K/V expanded to H_q heads (no native GQA)"
                                     if mode == "expand" and h_q != h_kv else None))

            guarded(name, dense_case)
            del kk, vv

        if dense_out is None and any(x in SPARSE_BACKENDS for x in s.backends):
            # errors need a dense output even when no dense backend was timed: chunked reference
            self.on_step(f"N={n} dense output for errors")
            try:
                dense_out, dense_name = _dense_reference(q, k, v, s.scale), "dense reference (fp32)"
            except Exception as exc:  # noqa: BLE001
                if not is_out_of_memory(exc):
                    raise
        rows = sample_rows(n, s.recall_rows, s.seed, device)
        config = s.config

        def quality(out: torch.Tensor, plan: PermutedBlockMask) -> dict[str, Any]:
            fields: dict[str, Any] = {"density": plan.density()}
            if dense_out is not None:
                fields.update(rel_l2_error=rel_l2(out, dense_out), error_vs=dense_name)
            try:  # a failing recall must not cost the timings already taken
                fields["recall_mean"], fields["recall_min"] = recall_stats(q, k, plan, rows, s.scale)
            except Exception as exc:  # noqa: BLE001
                if debug_enabled():
                    traceback.print_exc()
                first = str(exc).splitlines()[0][:120] if str(exc) else ""
                fields["recall_note"] = f"recall failed: {type(exc).__name__}: {first}"
            return fields

        pbs_phases: dict[str, Timing] = {}
        pbs_plan: PermutedBlockMask | None = None

        if "pbs" in s.backends:
            def pbs_case() -> dict[str, Any]:
                nonlocal pbs_plan
                perm = compute_permutation(q, k, config, s.scale)
                t_perm = self._bench(lambda: compute_permutation(q, k, config, s.scale), device, memory=False)
                num, idx = select_blocks(q, k, perm, config, s.scale)
                t_sel = self._bench(lambda: select_blocks(q, k, perm, config, s.scale), device, memory=False)
                plan = PermutedBlockMask(perm, num, idx, config.block_size, config.segment_size, n)
                keep: dict[str, torch.Tensor] = {}
                t_att = self._bench(lambda: keep.__setitem__("out", pbs_attention(q, k, v, plan, s.scale)), device,
                                    memory=False)

                t_tot = self._bench(lambda: pbs_prefill_attention(q, k, v, config, s.scale), device)
                note = None if q.is_cuda else "CPU: pbs runs the PyTorch reference path"
                graphs = LayerGraphs()
                if graphs_enabled() and graphs.eligible(q, config):  # as a layer runs inside pbs prefill
                    t_graph = self._bench(lambda: graphs(q, k, v, config, s.scale), device, memory=False)
                    if graphs.replays:
                        note = f"CUDA graph replay, as in pbs prefill (eager {t_tot.median_ms:.3f} ms)"
                        # the graph's memory is allocated at capture, outside the measured calls: keep
                        # the eager pass's peak, which holds the same tensors
                        t_tot = dataclasses.replace(t_graph, peak_mem_mib=t_tot.peak_mem_mib)
                    else:
                        note = f"eager: the CUDA graph capture failed ({graphs.failed})"
                    graphs.close()
                elif q.is_cuda and graphs_enabled() and not worth_capturing(n):
                    note = (f"eager, as pbs prefill runs layers of {GRAPHS_BELOW:,} tokens or more "
                            "(PBS_CUDA_GRAPHS=1: graph replays)")
                out = keep.pop("out")
                pbs_phases.update(permute=t_perm, select=t_sel, attend=t_att)
                pbs_plan = plan
                fields = quality(out, plan)
                return result(n, "pbs", case.layer, **_timing_fields(t_tot), permute_ms=t_perm.median_ms,
                              select_ms=t_sel.median_ms, attend_ms=t_att.median_ms,
                              tflops=flops / (t_tot.median_ms * 1e9),
                              tflops_computed=fields["density"] * flops / (t_att.median_ms * 1e9), **fields,
                              kernel=attention_kernel(q, config.block_size), notes=note)

            guarded("pbs", pbs_case)

        if "flex" in s.backends:
            reason = flex_available(device)
            if reason is None and pbs_plan is None:
                reason = "needs the pbs plan (add pbs to --backends; it failed or was skipped)"
            if reason is not None:
                recs["flex"] = skipped(n, "flex", reason, case.layer)
            else:
                def flex_case() -> dict[str, Any]:
                    assert pbs_plan is not None
                    run = flex_runner(q, k, v, pbs_plan, s.scale)
                    t = self._bench(run, device)
                    plan_ms = pbs_phases["permute"].median_ms + pbs_phases["select"].median_ms
                    fields = quality(run(), pbs_plan)
                    tot = plan_ms + t.median_ms
                    rec = result(n, "flex", case.layer, **_timing_fields(t), permute_ms=pbs_phases["permute"].median_ms,
                                 select_ms=pbs_phases["select"].median_ms, attend_ms=t.median_ms,
                                 tflops=flops / (tot * 1e9),
                                 tflops_computed=fields["density"] * flops / (t.median_ms * 1e9), **fields,
                                 notes="time = pbs permute + select + FlexAttention (gather + attend); spread of "
                                       "the attend part")
                    for key in ("median_ms", "q25_ms", "q75_ms", "min_ms", "max_ms"):
                        rec[key] = rec[key] + plan_ms
                    return rec

                guarded("flex", flex_case)

        if "reference" in s.backends:
            from pbs_kernels.backend import use_triton

            if not s.explicit_backends and not use_triton(q):
                recs["reference"] = skipped(n, "reference", "pbs runs this same PyTorch reference path on "
                                            f"{device.type}; name it in --backends to time it twice", case.layer)
            elif n > s.reference_max_len:
                recs["reference"] = skipped(n, "reference", f"N={n} > --reference-max-len {s.reference_max_len} "
                                            "(the plain-PyTorch twin is slow; raise the limit to time it)", case.layer)
            else:
                def ref_case() -> dict[str, Any]:
                    t_plan = self._bench(lambda: reference.build_plan(q, k, config, s.scale), device, memory=False)
                    plan = reference.build_plan(q, k, config, s.scale)
                    keep: dict[str, torch.Tensor] = {}
                    t_att = self._bench(lambda: keep.__setitem__("out", reference.block_sparse_attention(
                        q, k, v, plan, s.scale)), device)
                    out = keep.pop("out")
                    fields = quality(out, plan)
                    tot = t_plan.median_ms + t_att.median_ms
                    rec = result(n, "reference", case.layer, **_timing_fields(t_att), attend_ms=t_att.median_ms,
                                 tflops=flops / (tot * 1e9),
                                 tflops_computed=fields["density"] * flops / (t_att.median_ms * 1e9), **fields,
                                 notes="time = plan (permute + select) + attend, timed separately")
                    for key in ("median_ms", "q25_ms", "q75_ms", "min_ms", "max_ms"):
                        rec[key] = rec[key] + t_plan.median_ms
                    return rec

                guarded("reference", ref_case)

        # -- speedups vs the best dense backend of this case --
        dense_ok = [recs[x] for x in DENSE_BACKENDS if x in recs and recs[x]["status"] == "ok"]
        best = min(dense_ok, key=lambda r: r["median_ms"]) if dense_ok else None
        ordered = [recs[x] for x in s.backends if x in recs]
        for rec in ordered:
            if best is not None and rec["status"] == "ok":
                rec["best_dense"] = best["backend"]
                rec["speedup"] = best["median_ms"] / rec["median_ms"]
                if rec["backend"] in SPARSE_BACKENDS and rec.get("attend_ms"):
                    rec["attend_speedup"] = best["median_ms"] / rec["attend_ms"]  # the attention kernel alone
                if rec["backend"] in SPARSE_BACKENDS and rec.get("permute_ms") is not None:
                    rec["plan_share"] = (rec["permute_ms"] + rec["select_ms"]) / best["median_ms"]
        case.records = ordered
        return ordered


def _dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Exact causal attention in fp32, one head and chunks of rows at a time. Returns q's dtype."""
    b, h_q, n, d = q.shape
    g = h_q // k.shape[1]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    out = torch.empty_like(q)
    rows = max(1, (1 << 24) // max(1, n))
    pos = torch.arange(n, device=q.device)
    for h in range(h_q):
        kh, vh = k[:, h // g].float(), v[:, h // g].float()
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            s_ = torch.matmul(q[:, h, r0:r1].float(), kh.transpose(-1, -2)) * scale
            s_ = s_.masked_fill(pos[None, None, :] > pos[r0:r1, None][None], float("-inf"))
            out[:, h, r0:r1] = torch.matmul(s_.softmax(-1), vh).to(q.dtype)
    return out
