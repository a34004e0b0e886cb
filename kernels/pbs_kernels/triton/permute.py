"""GPU segmented key permutation: key importance and the per-segment sort, both in Triton.

Twin of ``reference.key_importance`` + ``reference.segment_permutation``. No host syncs; memory is
O(B * H * N) (no (rows x N) score matrix): the importance is computed in two passes over the keys
(row log-sum-exp first, then probabilities summed over the rows), and each segment is sorted by one
program of a single launch (``torch.sort`` is the fallback for segments the kernel does not take), see
``permute_kernel``.
"""

from __future__ import annotations

import math

import torch
import triton

from .. import plan_rules
from ..config import PBSConfig
from .launching import interpreting, last_dim_contiguous
from .permute_kernel import _importance_kernel, _row_stats_kernel, _segment_sort_kernel
from .tiles import PERMUTE_TILES, PermuteTiles

# Largest segment the fused sort takes by default: the whole segment (an int64 per key) sorts in registers
SORT_MAX_SEGMENT = 2048


def key_importance(q: torch.Tensor, k: torch.Tensor, block_size: int, per_head: bool = False,
                   scale: float | None = None, *, tiles: PermuteTiles = PERMUTE_TILES) -> torch.Tensor:
    """fp32 (B, H_perm, N): mean probability each key gets from the last ``block_size`` query rows.

    q (B, H_q, N, D), k (B, H_kv, N, D); H_perm = H_kv, or H_q when ``per_head`` (see
    ``reference.key_importance``, which this matches up to fp32 rounding). ``tiles``: the launches of both
    passes (``pbs_kernels.triton.tiles``).
    """
    b, h_q, n, d = q.shape
    h_kv = k.shape[1]
    if h_q % h_kv:
        raise ValueError(f"query heads ({h_q}) must be a multiple of key/value heads ({h_kv})")
    g = h_q // h_kv
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    rows = min(block_size, n)
    h_perm = h_q if per_head else h_kv
    gp = h_q // h_perm  # query heads averaged into one permutation head
    d_pow2 = max(16, triton.next_power_of_2(d))
    ieee = q.dtype == torch.float32
    block_m, block_n, num_warps = tiles.block_m, tiles.block_n, tiles.num_warps
    if interpreting():  # the interpreter's cost is per operation: fewer, larger tiles
        block_m, block_n = 128, 512

    qk_scale = scale * math.log2(math.e)  # both passes work in base 2 (exp2)

    # -- pass 1: per row, max and sum of exponentials over spans of keys; merged into a log-sum-exp --
    span = max(block_n, tiles.span // block_n * block_n)
    n_spans = triton.cdiv(n, span)
    m_part = torch.empty(b * h_q, n_spans, rows, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    _row_stats_kernel[(triton.cdiv(rows, block_m), n_spans, b * h_q)](
        q, k, m_part, l_part,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        n, rows, span, n_spans, h_q, g, qk_scale,
        HEAD_DIM=d, D_POW2=d_pow2, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=ieee, num_warps=num_warps,
    )
    m_max = m_part.amax(1, keepdim=True)  # finite: key 0 is visible to every row
    lse = (m_max + torch.log2((l_part * torch.exp2(m_part - m_max)).sum(1, keepdim=True))).reshape(b * h_q, rows)

    # -- pass 2: probabilities of every row, summed per key --
    out = torch.empty(b, h_perm, n, dtype=torch.float32, device=q.device)
    _importance_kernel[(triton.cdiv(n, block_n), b * h_perm)](
        q, k, lse, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        n, rows, h_q, h_perm, gp, h_perm // h_kv, qk_scale, 1.0 / (gp * rows),
        HEAD_DIM=d, D_POW2=d_pow2, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=ieee, num_warps=num_warps,
    )
    return out


def _fused_sort_fits(segment_size: int) -> bool:
    return 2 <= segment_size <= SORT_MAX_SEGMENT and segment_size & (segment_size - 1) == 0


def _sort_warps(segment_size: int) -> int:
    # one warp keeps every compare-and-swap in registers and warp shuffles (more warps exchange through
    # shared memory, with barriers): on an H100 at 128K keys, 8 and 32 heads, one warp was fastest up to
    # 1024-key segments, two at 2048 (where the kernel only draws level with torch.sort; 6-10x faster
    # than it from 64 to 512 keys)
    return 1 if segment_size <= 1024 else 2


def segment_permutation(scores: torch.Tensor, segment_size: int, fused: bool | None = None) -> torch.Tensor:
    """int32 (B, H, N): ``reference.segment_permutation`` (stable descending sort of scores (B, H, N)
    inside each complete segment of ``segment_size`` keys, identity over the trailing partial one).

    ``fused``: True runs the Triton kernel (one launch; the interpreter too), False ``torch.sort``; None
    picks the kernel for CUDA tensors when ``segment_size`` is a power of two <= ``SORT_MAX_SEGMENT``.
    The kernel sorts fp32: fp16/bf16 scores widen exactly, other dtypes go to ``torch.sort``.
    """
    exact_fp32 = scores.dtype in (torch.float32, torch.float16, torch.bfloat16)
    if fused is None:
        fused = scores.is_cuda and exact_fp32 and _fused_sort_fits(segment_size)
    elif fused and not (exact_fp32 and _fused_sort_fits(segment_size)):
        raise ValueError(f"the fused sort takes fp32/fp16/bf16 scores and a power-of-two segment in "
                         f"2..{SORT_MAX_SEGMENT}, got {scores.dtype} and {segment_size}")
    if not fused:
        return plan_rules.segment_permutation(scores, segment_size)
    b, h, n = scores.shape
    scores = scores.float().contiguous()
    out = torch.empty(b, h, n, dtype=torch.int32, device=scores.device)
    if out.numel():
        _segment_sort_kernel[(triton.cdiv(n, segment_size), b * h)](
            scores, out, n, SEG=segment_size, num_warps=_sort_warps(segment_size))
    return out


def compute_permutation(q: torch.Tensor, k: torch.Tensor, config: PBSConfig,
                        scale: float | None = None, *, tiles: PermuteTiles = PERMUTE_TILES) -> torch.Tensor:
    """int32 (B, H_perm, N): original key position at each permuted slot (see ``pbs_kernels.permute``).

    q (B, H_q, N, D), k (B, H_kv, N, D) on the GPU (or CPU under ``TRITON_INTERPRET=1``); ``tiles``: the
    launches of the key importance.
    """
    b, h_q, n, _ = q.shape
    h_perm = h_q if config.per_head_permutation else k.shape[1]
    if getattr(config, "beyond_published", lambda: False)():
        raise ValueError("this GPU path implements the published method only; options beyond it run "
                         f"through pbs_kernels.permute (the reference), got {config}")
    if not config.permute or n < config.segment_size:
        return plan_rules.identity_permutation(b, h_perm, n, q.device)
    imp = key_importance(q, k, config.block_size, config.per_head_permutation, scale, tiles=tiles)
    # stable descending sort per segment, exactly as the reference (one Triton launch; torch.sort for
    # segments the kernel does not take; no sync either way)
    return segment_permutation(imp, config.segment_size)
