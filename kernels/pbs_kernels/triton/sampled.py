"""GPU block selection with sampled-row scoring (score="sampled", the ``default`` preset) and the
ranking options beyond the published method (threshold_scope "total", row_top, local blocks).

Twin of ``reference.select_blocks(q, reference.permute_keys(k, perm), perm, config, k=k)``: the
per-row block masses come from ``sampled_kernel`` (no permuted copy of K, no (rows x N) score
matrix), the ranking is the reference's own ``reference.rank_blocks`` (plain torch on the GPU, no
host syncs). Memory: one fp32 per-row buffer (B, H_q, C, m, N_b) for a chunk of C query blocks, at
most ``_BUFFER_BYTES``, plus the ranking's temporaries of about the same size.
"""

from __future__ import annotations

import math
import os

import torch
import triton

from .. import reference
from ..config import PBSConfig
from . import select as pooled
from .sampled_kernel import _sampled_lse_kernel

# Upper bound of the per-chunk per-row mass buffer: 256 MiB (SmolLM2 at 32K in one chunk; 64 query
# blocks of 64 tokens per chunk for 32 heads at 128K).
_BUFFER_BYTES = 256 << 20
# GPU tile: sampled rows per program (query blocks of one segment x sample_rows; the default preset
# allows at most 4 x 16 = 64), warps, software-pipelining stages (None: Triton's default);
# benchmarks/sampled_bench.py --sweep times alternatives
TUNING = {"rows": 64, "num_warps": 4, "num_stages": None}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _group_blocks(per_seg: int, m_pow2: int, rows: int) -> int:
    """Query blocks per program: the largest divisor of ``per_seg`` whose sampled rows fit ``rows``
    (so a program's blocks always share one diagonal segment); at least 1."""
    return max([qb for qb in range(1, per_seg + 1) if per_seg % qb == 0 and qb * m_pow2 <= rows] or [1])


def _check(q: torch.Tensor, k: torch.Tensor, perm: torch.Tensor, config: PBSConfig) -> None:
    b, h_q, n, _ = q.shape
    h_kv, h_perm = k.shape[1], perm.shape[1]
    if h_q % h_perm or h_perm % h_kv:
        raise ValueError(f"heads must nest: H_q={h_q}, H_perm={h_perm}, H_kv={h_kv} "
                         "(expected H_perm = H_kv or H_q, and H_q a multiple of H_kv)")
    if perm.shape != (b, h_perm, n):
        raise ValueError(f"perm has shape {tuple(perm.shape)}, expected ({b}, {h_perm}, {n})")
    if config.needs_reference_selection():
        raise ValueError("this GPU path has no score=mean_query, importance_rows=strided or "
                         f"permute_heads=auto; run them through pbs_kernels.select (the reference), got {config}")


def _block_lse(q: torch.Tensor, k: torch.Tensor, perm: torch.Tensor, config: PBSConfig, r0: int, r1: int,
               scale: float, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Run the kernel for query blocks [r0, r1) into ``out`` fp32 (B*H_q, C, m, N_b) (per-tile
    log-sum-exp) and ``lse`` fp32 (B*H_q, C, m) (per-row log-sum-exp). q, k last-dim contiguous."""
    b, h_q, n, d = q.shape
    bs = config.block_size
    m = config.sample_rows
    m_pow2 = triton.next_power_of_2(m)
    per_seg = config.segment_size // bs
    qb = _group_blocks(per_seg, m_pow2, max(TUNING["rows"], m_pow2))
    block_r = max(16, triton.next_power_of_2(qb * m_pow2))
    g_first = r0 // qb * qb
    _sampled_lse_kernel[(triton.cdiv(r1 - g_first, qb), b * h_q)](
        q, k, perm, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        perm.stride(0), perm.stride(1),
        n, triton.cdiv(n, bs), r0, r1, g_first, h_q, h_q // k.shape[1], h_q // perm.shape[1], per_seg, scale,
        M=m, M_POW2=m_pow2, STEP=bs // m, QB=qb, BLOCK_R=block_r, BLOCK_N=bs,
        HEAD_DIM=d, D_POW2=max(16, triton.next_power_of_2(d)), IEEE=q.dtype == torch.float32,
        num_warps=TUNING["num_warps"], **({"num_stages": TUNING["num_stages"]} if TUNING["num_stages"] else {}),
    )


def sampled_block_mass(q: torch.Tensor, k: torch.Tensor, perm: torch.Tensor, config: PBSConfig,
                       r0: int, r1: int, scale: float | None = None) -> torch.Tensor:
    """fp32 (B, H_q, C, m, N_b): softmax mass of each sampled row of query blocks [r0, r1) on every
    key block, in the layout that the row's query block reads (each row sums to 1).

    q (B, H_q, N, D), k (B, H_kv, N, D) in ORIGINAL order, perm int32 (B, H_perm, N). Twin of
    ``reference.sampled_block_mass(q, k_all, kp_all, config, r0, r1, scale, per_row=True)`` (k_all,
    kp_all: original and permuted keys expanded to the query heads).
    """
    _check(q, k, perm, config)
    b, h_q, n, d = q.shape
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    n_b = triton.cdiv(n, config.block_size)
    if not 0 <= r0 < r1 <= n_b:
        raise ValueError(f"query blocks [r0, r1) = [{r0}, {r1}) must lie in [0, {n_b}) with r0 < r1")
    c, m = r1 - r0, config.sample_rows
    out = torch.empty(b * h_q, c, m, n_b, dtype=torch.float32, device=q.device)
    lse = torch.empty(b * h_q, c, m, dtype=torch.float32, device=q.device)
    _block_lse(_last_dim_contiguous(q), _last_dim_contiguous(k), perm.to(torch.int32).contiguous(),
               config, r0, r1, scale, out, lse)
    return out.sub_(lse[..., None]).exp_().view(b, h_q, c, m, n_b)


def select_blocks(q: torch.Tensor, k: torch.Tensor, perm: torch.Tensor, config: PBSConfig,
                  scale: float | None = None, buffer_bytes: int = _BUFFER_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_num_blocks int32 (B, H_q, N_qb), kv_indices int32 (B, H_q, N_qb, N_kb)), equal to the
    reference's plan (up to exact ties of the block masses).

    q (B, H_q, N, D); k (B, H_kv, N, D) in ORIGINAL order; perm int32 (B, H_perm, N). Handles
    score "sampled" and "pooled" with any threshold_scope / row_top / local_blocks / sink (for the
    published pooled options ``pbs_kernels.triton.select`` is the faster, fused path).
    """
    _check(q, k, perm, config)
    b, h_q, n, d = q.shape
    bs = config.block_size
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    n_b = triton.cdiv(n, bs)
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    perm = perm.to(torch.int32).contiguous()
    g = h_q // perm.shape[1]
    sink = reference.sink_block(perm, bs).repeat_interleave(g, dim=1)  # (B, H_q)
    num = torch.empty(b, h_q, n_b, dtype=torch.int32, device=q.device)
    idx = torch.empty(b, h_q, n_b, n_b, dtype=torch.int32, device=q.device)

    if config.score == "pooled":  # pooled means (Triton), scores and ranking in torch
        q_bar = pooled.pool_blocks(q, bs)  # (B, H_q, N_b, D)
        k_bar = pooled.pool_blocks(k, bs, perm).repeat_interleave(g, dim=1)  # (B, H_q, N_b, D), permuted
        # scope "total" also scores the diagonal segment, which attention reads in original order
        k_orig = pooled.pool_blocks(k, bs, heads=h_q) if config.threshold_scope == "total" else None
        rows = max(1, min(n_b, buffer_bytes // (4 * b * h_q * n_b)))
        for r0 in range(0, n_b, rows):
            r1 = min(n_b, r0 + rows)
            candidate, causal, forced = reference.chunk_blocks(n_b, r0, r1, config, sink, q.device)
            probs = reference.pooled_block_probs(q_bar[:, :, r0:r1], k_bar, k_orig, candidate, causal, config, scale)
            num[:, :, r0:r1], idx[:, :, r0:r1] = reference.rank_blocks(probs, candidate, forced, config)
        return num, idx

    m = config.sample_rows
    per_seg = config.segment_size // bs
    qb = _group_blocks(per_seg, triton.next_power_of_2(m), max(TUNING["rows"], triton.next_power_of_2(m)))
    # query blocks per chunk: as many as the buffer holds (a multiple of the program's group)
    rows = max(1, min(n_b, buffer_bytes // (4 * b * h_q * m * n_b)))
    if qb < rows < n_b:
        rows = rows // qb * qb
    buf = torch.empty(b * h_q * rows * m * n_b, dtype=torch.float32, device=q.device)
    lse_buf = torch.empty(b * h_q * rows * m, dtype=torch.float32, device=q.device)
    for r0 in range(0, n_b, rows):  # fixed host-side chunking: no data-dependent branching
        r1 = min(n_b, r0 + rows)
        c = r1 - r0
        out = buf[: b * h_q * c * m * n_b].view(b * h_q, c, m, n_b)
        lse = lse_buf[: b * h_q * c * m].view(b * h_q, c, m)
        _block_lse(q, k, perm, config, r0, r1, scale, out, lse)
        per_row = out.sub_(lse[..., None]).exp_().view(b, h_q, c, m, n_b)
        candidate, _, forced = reference.chunk_blocks(n_b, r0, r1, config, sink, q.device)
        num[:, :, r0:r1], idx[:, :, r0:r1] = reference.rank_blocks(None, candidate, forced, config, per_row=per_row)
    return num, idx
