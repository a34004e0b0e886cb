"""Segmented key permutation: score keys by the last query block, sort inside segments.

``compute_permutation`` dispatches: CUDA tensors use the GPU path of ``pbs_kernels.triton`` when it
is importable, everything else the plain PyTorch twin in ``pbs_kernels.reference``.
"""

from __future__ import annotations

import torch

from . import plan_rules, reference
from .backend import use_triton
from .config import PBSConfig


def compute_permutation(q: torch.Tensor, k: torch.Tensor, config: PBSConfig, scale: float | None = None) -> torch.Tensor:
    """int32 (B, H_perm, N): original key position at each permuted slot.

    q (B, H_q, N, D), k (B, H_kv, N, D); H_perm = H_kv, or H_q with ``config.per_head_permutation``.
    Identity when ``config.permute`` is off or N is shorter than one segment. importance_rows
    "strided" and permute_heads "auto" run the PyTorch reference on every device; the selection
    options (score, threshold_scope, row_top) do not affect the permutation.
    """
    b, h_q, n, _ = q.shape
    h_perm = h_q if config.per_head_permutation else k.shape[1]
    if not config.permute or n < config.segment_size:
        return plan_rules.identity_permutation(b, h_perm, n, q.device)
    if config.importance_rows != "last" or config.permute_heads != "all":
        return reference.compute_permutation(q, k, config, scale)
    # the block scoring options (score, threshold_scope, row_top) do not change the permutation
    if use_triton(q):
        from .triton import permute as fast

        imp = fast.key_importance(q, k, config.block_size, config.per_head_permutation, scale)
    else:
        imp = reference.key_importance(q, k, config.block_size, config.per_head_permutation, scale)
    return plan_rules.segment_permutation(imp, config.segment_size)
