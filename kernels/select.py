"""Block selection: pooled block scores, top-p per query block, forced blocks, compressed plan."""

from __future__ import annotations

import torch

from . import reference
from .backend import use_triton
from .config import PBSConfig


def select_blocks(q: torch.Tensor, k: torch.Tensor, perm: torch.Tensor, config: PBSConfig,
                  scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_num_blocks int32 (B, H_q, N_qb), kv_indices int32 (B, H_q, N_qb, N_kb)).

    q (B, H_q, N, D), k (B, H_kv, N, D) in original order, perm (B, H_perm, N) from
    ``compute_permutation``. Options beyond the published method (``config.uses_reference_selection()``)
    run the PyTorch reference on every device: no GPU kernel implements them yet.
    """
    if use_triton(q) and not config.uses_reference_selection():
        from .triton import select as fast

        return fast.select_blocks(q, k, perm, config, scale)
    return reference.select_blocks(q, reference.permute_keys(k, perm), perm, config, scale, k=k)
