"""Block selection: block scores, top-p per query block, forced blocks, compressed plan.

Dispatch (``backend.use_triton`` decides GPU or reference): the published pooled options run the
fused ``pbs_kernels.triton.select``; scores "sampled" / "sampled_max" and the other ranking options with a GPU path
(threshold_scope "total", row_top, see ``PBSConfig.needs_reference_selection``) run
``pbs_kernels.triton.sampled``; everything else the PyTorch reference. ``row_selection`` gives the
fused GPU selection of one plan to callers that plan and attend in chunks of query blocks.
"""

from __future__ import annotations

import torch

from . import plan_rules, reference
from .backend import use_triton
from .config import PBSConfig


def select_blocks(q: torch.Tensor, k: torch.Tensor, perm: torch.Tensor, config: PBSConfig,
                  scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_num_blocks int32 (B, H_q, N_qb), kv_indices int32 (B, H_q, N_qb, N_kb)).

    q (B, H_q, N, D), k (B, H_kv, N, D) in original order, perm (B, H_perm, N) from
    ``compute_permutation``. Options with no GPU path (``config.needs_reference_selection()``) run
    the PyTorch reference on every device.
    """
    if use_triton(q):
        if not config.beyond_published():
            from .triton import select as fast

            return fast.select_blocks(q, k, perm, config, scale)
        if not config.needs_reference_selection():
            from .triton import sampled

            return sampled.select_blocks(q, k, perm, config, scale)
    return reference.select_blocks(q, plan_rules.permute_keys(k, perm), perm, config, scale, k=k)


def row_selection(q: torch.Tensor, k: torch.Tensor, perm: torch.Tensor, config: PBSConfig,
                  scale: float | None = None, values: torch.Tensor | None = None):
    """The fused GPU selection of the published options for one plan, pooled once
    (``pbs_kernels.triton.select.BlockSelection``): ``select(r0, r1)`` plans query blocks [r0, r1),
    ``row_chunks(rows)`` all of them a chunk at a time; with ``values`` (v, shaped like k, head_dim a
    power of two) ``copies`` holds k and v in permuted order, made by the same pooling pass.
    Shapes as in ``select_blocks``. Needs the Triton path and ``not config.beyond_published()``.
    """
    if not use_triton(q) or config.beyond_published():
        raise ValueError("row_selection is the GPU selection of the published options; use select_blocks "
                         f"(it dispatches to the reference) for {q.device} tensors or {config}")
    from .triton import select as fast

    return fast.BlockSelection(q, k, perm, config, scale, values=values)
