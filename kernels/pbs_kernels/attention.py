"""Public entry points: plan, attend, or both.

Each step has one dispatcher that picks Triton or the PyTorch reference: ``permute.compute_permutation``,
``select.select_blocks`` (``select.row_selection`` for plans built and attended in chunks of rows) and
``attend.attend`` (``attend.kernel_read``: how the kernel will read q, k, v and which K/V copies it needs).
"""

from __future__ import annotations

import torch

from . import plan_rules, reference
from .attend import attend, attention_kernel, kernel_read, runs_triton
from .band import band_plan, check_window
from .block_mask import PermutedBlockMask
from .config import PBSConfig
from .permute import compute_permutation
from .select import row_selection, select_blocks

__all__ = ["PLAN_CHUNK_BYTES", "attention_kernel", "band_attention", "build_plan", "pbs_attention",
           "pbs_prefill_attention", "plan_chunk_rows"]


# Above this many bytes of plan indices (int32 kv_indices), ``pbs_prefill_attention`` plans and
# attends in chunks of query blocks: the whole table is 2 GiB at 512K tokens with 32 query heads.
PLAN_CHUNK_BYTES = 256 << 20


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"expected q, k as (B, H, N, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    b, h_q, n, d = q.shape
    if k.shape[0] != b or k.shape[2] != n or k.shape[3] != d or h_q % k.shape[1]:
        raise ValueError(
            f"k must be (B={b}, H_kv, N={n}, D={d}) with H_q={h_q} divisible by H_kv; got {tuple(k.shape)}"
        )
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")


def build_plan(q: torch.Tensor, k: torch.Tensor, config: PBSConfig, scale: float | None = None) -> PermutedBlockMask:
    """Permute keys inside segments and select key blocks for every query block.

    q: (B, H_q, N, D), k: (B, H_kv, N, D), H_q a multiple of H_kv. Returns the plan on q's device.
    """
    _check_shapes(q, k)
    perm = compute_permutation(q, k, config, scale)
    num, idx = select_blocks(q, k, perm, config, scale)
    return PermutedBlockMask(perm, num, idx, config.block_size, config.segment_size, q.shape[2])


def pbs_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PermutedBlockMask,
                  scale: float | None = None, *, window: int | None = None,
                  softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention over the kept blocks of ``plan``.

    q: (B, H_q, N, D), k/v: (B, H_kv, N, D) in original (unpermuted) order.
    window: a sliding window of W tokens (query q sees original keys q - W < k <= q), masked token by
    token inside the kept blocks (``band.band_plan`` keeps the blocks it touches). softcap: scores
    become ``softcap * tanh(scores / softcap)`` (Gemma-2). sinks: (H_q,) per-head attention sink logits
    (gpt-oss), one extra term in every row's softmax denominator.
    Returns (B, H_q, N, D) in q's dtype. Triton on CUDA, the PyTorch reference elsewhere (``attend.attend``).
    """
    _check_shapes(q, k, v)
    if plan.seq_len != q.shape[2]:
        raise ValueError(f"plan was built for N={plan.seq_len}, got q with N={q.shape[2]}")
    window = None if window is None else check_window(window)
    reference.check_softcap(softcap)
    return attend(q, k, v, plan, scale, window=window, softcap=softcap, sinks=sinks)


def plan_chunk_rows(q: torch.Tensor, config: PBSConfig, budget: int = PLAN_CHUNK_BYTES) -> int | None:
    """Query blocks per row chunk when q's whole plan index table (int32, B x H_q x N_qb x N_kb)
    would exceed ``budget`` bytes and the fused GPU path can plan and attend in row chunks (Triton
    attention, the published selection options); None = plan the whole sequence at once."""
    b, h_q, n, _ = q.shape
    n_b = -(-n // config.block_size)
    if 4 * b * h_q * n_b * n_b <= budget or config.beyond_published() or not runs_triton(q):
        return None
    return max(1, budget // (4 * b * h_q * n_b))


def band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: PBSConfig, window: int,
                   scale: float | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None,
                   plan_bytes: int = PLAN_CHUNK_BYTES) -> tuple[torch.Tensor, PermutedBlockMask]:
    """A sliding-window layer through the block-sparse kernels: the band plan of ``window``
    (``band.band_plan``, no permutation, no selection: exact at any threshold), attended with the
    window masked inside its edge blocks. Shapes as in ``pbs_attention``; returns (out, plan). On
    the Triton path a plan whose index table exceeds ``plan_bytes`` is built and attended in row chunks
    (the returned plan is then a summary, ``kv_indices`` None)."""
    _check_shapes(q, k, v)
    b, h_q, n, _ = q.shape
    bs, seg = config.block_size, config.segment_size
    n_b = -(-n // bs)
    if not runs_triton(q) or 4 * b * h_q * n_b * n_b <= plan_bytes:
        plan = band_plan(b, h_q, k.shape[1], n, window, bs, seg, q.device)
        return pbs_attention(q, k, v, plan, scale, window=window, softcap=softcap, sinks=sinks), plan
    rows = max(1, plan_bytes // (4 * b * h_q * n_b))
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    nums = []
    for r0 in range(0, n_b, rows):
        chunk = band_plan(b, h_q, k.shape[1], n, window, bs, seg, q.device, r0, min(n_b, r0 + rows))
        attend(q, k, v, chunk, scale, out=out, window=window, softcap=softcap, sinks=sinks)
        nums.append(chunk.kv_num_blocks)
    return out, PermutedBlockMask(plan_rules.identity_permutation(b, k.shape[1], n, q.device), torch.cat(nums, -1),
                                  None, bs, seg, n)


def pbs_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: PBSConfig,
                          scale: float | None = None, plan_bytes: int = PLAN_CHUNK_BYTES, *,
                          softcap: float | None = None, sinks: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, PermutedBlockMask]:
    """Plan and attend in one call. Shapes as in ``pbs_attention``; returns (out, plan).
    ``softcap`` soft-caps the attention scores and ``sinks`` adds per-head sink logits to each softmax (the
    selection ranks blocks on plain pooled scores).

    On the Triton path the pooling pass of the selection also makes the permuted K/V copies the
    attention kernel reads (``select.row_selection`` with values: one read of K for both). Long sequences
    (``plan_chunk_rows``: index table over ``plan_bytes``) are planned and attended one chunk of
    query blocks at a time, after one permutation for all: the same result, with at most
    ``plan_bytes`` of indices alive. The returned plan is then a summary (``kv_indices`` None).
    """
    if not runs_triton(q) or config.beyond_published():
        plan = build_plan(q, k, config, scale)
        return pbs_attention(q, k, v, plan, scale, softcap=softcap, sinks=sinks), plan
    _check_shapes(q, k, v)
    bs, seg, n = config.block_size, config.segment_size, q.shape[2]
    n_b = -(-n // bs)
    rows = plan_chunk_rows(q, config, plan_bytes) or n_b
    read = kernel_read(q, bs, k, v, masked=softcap is not None or sinks is not None)
    q, k, v = read.inputs(q, k, v)
    perm = compute_permutation(q, k, config, scale)
    selection = row_selection(q, k, perm, config, scale, values=v if read.copies_in_selection else None)
    copies = read.copies(k, v, perm, selection.copies)  # one copy for every chunk
    if rows >= n_b:
        num, idx = selection.select(0, n_b)
        plan = PermutedBlockMask(perm, num, idx, bs, seg, n)
        return attend(q, k, v, plan, scale, copies=copies, softcap=softcap, sinks=sinks), plan
    out = torch.empty_like(q)  # laid out like q now
    nums = []
    for r0, num, idx in selection.row_chunks(rows):
        attend(q, k, v, PermutedBlockMask(perm, num, idx, bs, seg, n, row_offset=r0), scale, out=out,
               copies=copies, softcap=softcap, sinks=sinks)
        nums.append(num)
        del idx
    return out, PermutedBlockMask(perm, torch.cat(nums, -1), None, bs, seg, n)
