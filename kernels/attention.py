"""Public entry points: plan, attend, or both."""

from __future__ import annotations

import torch

from . import reference
from .backend import use_triton
from .block_mask import PermutedBlockMask
from .config import PBSConfig
from .permute import compute_permutation
from .select import select_blocks


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
                  scale: float | None = None) -> torch.Tensor:
    """Causal attention over the kept blocks of ``plan``.

    q: (B, H_q, N, D), k/v: (B, H_kv, N, D) in original (unpermuted) order.
    Returns (B, H_q, N, D) in q's dtype. Triton on CUDA, the PyTorch reference elsewhere.
    """
    _check_shapes(q, k, v)
    if plan.seq_len != q.shape[2]:
        raise ValueError(f"plan was built for N={plan.seq_len}, got q with N={q.shape[2]}")
    if use_triton(q):
        from .triton import attention as fast

        if fast.supports(q):
            return fast.pbs_attention(q, k, v, plan, scale)
    return reference.block_sparse_attention(q, k, v, plan, scale)


def pbs_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: PBSConfig,
                          scale: float | None = None) -> tuple[torch.Tensor, PermutedBlockMask]:
    """Plan and attend in one call. Shapes as in ``pbs_attention``; returns (out, plan)."""
    plan = build_plan(q, k, config, scale)
    return pbs_attention(q, k, v, plan, scale), plan
