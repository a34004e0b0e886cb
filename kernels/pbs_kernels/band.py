"""Band plans: sliding-window layers as block-sparse plans.

A sliding-window layer with window W lets query ``q`` see the keys ``q - W < k <= q`` (transformers'
``sliding_window_overlay``: the query itself and the W - 1 keys before it). A band plan keeps, for
every query block, exactly the key blocks that window touches: from the block holding the first
row's earliest visible key up to the query block itself. It is a ``PermutedBlockMask`` with the
identity permutation and no selection, so it is exact at any threshold; the keys outside the window
inside the band's first (edge) blocks are masked token by token by the attention kernels, which take
the window as an argument (``pbs_attention(..., window=W)``), not from the plan.
"""

from __future__ import annotations

import torch

from .block_mask import PermutedBlockMask
from .plan_rules import identity_permutation


def check_window(window: int) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive number of tokens (a layer's sliding_window), got {window!r}")
    return window


def band_rows(seq_len: int, window: int, block_size: int, r0: int = 0, r1: int | None = None,
              device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The band of query blocks r0 .. r1 - 1 (default: all). Returns (kv_num_blocks int32 (R,),
    kv_indices int32 (R, N_kb): kept blocks first, ascending, then the others ascending, as the
    selection packs them)."""
    check_window(window)
    n_b = -(-seq_len // block_size)
    r1 = n_b if r1 is None else r1
    rows = torch.arange(r0, r1, device=device)
    # the first row of query block i is i * B; it sees keys from i * B - W + 1 on
    first = torch.div(rows * block_size - window + 1, block_size, rounding_mode="floor").clamp_min(0)
    cols = torch.arange(n_b, device=device)
    keep = (cols[None, :] >= first[:, None]) & (cols[None, :] <= rows[:, None])
    num = keep.sum(-1, dtype=torch.int32)
    idx = torch.where(keep, cols, cols + n_b).sort(-1).indices.to(torch.int32)
    return num, idx


def band_plan(batch: int, heads: int, kv_heads: int, seq_len: int, window: int, block_size: int,
              segment_size: int, device=None, r0: int = 0, r1: int | None = None) -> PermutedBlockMask:
    """The band plan of a sliding-window layer: q (batch, heads, seq_len, D), k/v (batch, kv_heads,
    seq_len, D), rows r0 .. r1 - 1 of query blocks (default: the whole plan). Identity permutation
    per KV head; every query head keeps the same blocks (``kv_num_blocks`` / ``kv_indices`` are
    expanded views, not copies)."""
    num, idx = band_rows(seq_len, window, block_size, r0, r1, device)
    rows = num.shape[0]
    return PermutedBlockMask(identity_permutation(batch, kv_heads, seq_len, device),
                             num.expand(batch, heads, rows), idx.expand(batch, heads, rows, idx.shape[-1]),
                             block_size, segment_size, seq_len, row_offset=r0)

