"""`PermutedBlockMask`: the plan that block selection hands to attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PermutedBlockMask:
    """Compressed block-sparse plan over permuted keys, modeled on FlexAttention's ``BlockMask``.

    Key layout seen by query block ``i``: key blocks of *earlier* segments are read in permuted
    order (slot ``s`` holds original key ``perm[..., s]``); key blocks of ``i``'s own (diagonal)
    segment are read in original order. The permutation is a bijection inside each segment, so
    keeping every block of the diagonal segment keeps the same key set either way, and the only
    token-level mask needed is the usual causal one on the diagonal block ``j == i``. A sliding window
    is not part of the plan: attention takes it as an argument (``pbs_attention(..., window=W)``) and
    masks by original key positions; a band plan (``band.band_plan``: identity permutation) keeps just
    the blocks the window touches.

    Fields (int32, on the device of the inputs):
        perm:          (B, H_perm, N)      original position of the key at each permuted slot;
                                           H_perm = H_kv (shared per GQA group) or H_q.
        kv_num_blocks: (B, H_q, N_qb)      number of kept key blocks per query block.
        kv_indices:    (B, H_q, N_qb, N_kb) kept key-block indices, packed left, ascending.
        row_offset:    0 for a whole plan. A plan of R rows (``kv_num_blocks`` (B, H_q, R),
                       ``kv_indices`` (B, H_q, R, N_kb)) covers query blocks row_offset ..
                       row_offset + R - 1: long sequences are planned and attended in such row
                       chunks, so the (N_qb x N_kb) index table never exists at once.
                       ``kv_indices`` is None in the summary ``pbs_prefill_attention`` returns
                       then (counts of every row, indices consumed chunk by chunk).

    Rebuild the dense block mask::

        dense = torch.zeros(B, H_q, N_qb, N_kb, dtype=torch.bool)
        for b, h, i in itertools.product(range(B), range(H_q), range(N_qb)):
            n = kv_num_blocks[b, h, i]
            dense[b, h, i, kv_indices[b, h, i, :n]] = True
    """

    perm: torch.Tensor
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor | None
    block_size: int
    segment_size: int
    seq_len: int
    row_offset: int = 0

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H_q, rows, N_kb); rows = N_qb for a whole plan."""
        return (*self.kv_num_blocks.shape, self.num_blocks)  # type: ignore[return-value]

    @property
    def num_blocks(self) -> int:
        """N_kb, key blocks per row."""
        return -(-self.seq_len // self.block_size)

    def _row_lengths(self) -> torch.Tensor:
        """int64 (rows,): causal blocks of each row of this plan (query block i has i + 1)."""
        rows = self.kv_num_blocks.shape[-1]
        return torch.arange(self.row_offset + 1, self.row_offset + rows + 1, device=self.kv_num_blocks.device)

    def to_dense(self) -> torch.Tensor:
        """Bool (B, H_q, rows, N_kb): True where query block i visits key block j."""
        if self.kv_indices is None:
            raise ValueError("this plan summary has no kv_indices: the sequence was planned and attended in row "
                             "chunks; call build_plan for the whole plan")
        n_kb = self.num_blocks
        slot = torch.arange(n_kb, device=self.kv_indices.device)
        valid = slot < self.kv_num_blocks.unsqueeze(-1)
        # padding slots may repeat a kept index: "amax" keeps True wherever any slot wrote it
        # (uint8: CUDA has no bool scatter_reduce)
        dense = torch.zeros(self.kv_indices.shape, dtype=torch.uint8, device=self.kv_indices.device)
        return dense.scatter_reduce(-1, self.kv_indices.long(), valid.to(torch.uint8), "amax").bool()

    def causal_blocks(self) -> int:
        """Number of (query block, key block) pairs a dense causal attention visits over this
        plan's rows, all heads."""
        rows = self.kv_num_blocks.shape[-1]
        b, h = self.kv_num_blocks.shape[:2]
        return b * h * (rows * self.row_offset + rows * (rows + 1) // 2)

    def density(self) -> float:
        """Kept causal blocks / all causal blocks (1.0 = dense)."""
        return float(self.kv_num_blocks.sum().item()) / max(1, self.causal_blocks())

    def density_per_head(self) -> torch.Tensor:
        """fp32 (B, H_q): density of each head."""
        return self.kv_num_blocks.float().sum(-1) / self._row_lengths().sum().float()

    def __repr__(self) -> str:
        b, h_q, rows, n_kb = self.shape
        where = f"rows {self.row_offset}..{self.row_offset + rows - 1} of " if self.row_offset or rows != n_kb else ""
        return (
            f"PermutedBlockMask(batch={b}, heads={h_q}, perm_heads={self.perm.shape[1]}, "
            f"seq_len={self.seq_len}, block_size={self.block_size}, segment_size={self.segment_size}, "
            f"blocks={where}{rows}x{n_kb}, density={self.density():.2%})"
        )

    def to_string(self, batch: int = 0, heads: int | None = 2, max_blocks: int = 32) -> str:
        """A small grid per head: '█' kept, '░' skipped causal block, ' ' above the diagonal."""
        dense = self.to_dense()[batch].cpu()
        n_qb = dense.shape[-2]
        step = max(1, -(-n_qb // max_blocks))
        lines = [repr(self)]
        for h in range(dense.shape[0] if heads is None else min(heads, dense.shape[0])):
            lines.append(f"head {h}: density {self.density_per_head()[batch, h].item():.2%}")
            for i in range(0, n_qb, step):
                row = []
                for j in range(0, n_qb, step):
                    if j > i:
                        row.append(" ")
                    else:
                        row.append("█" if dense[h, i : i + step, j : j + step].any() else "░")
                lines.append("".join(row).rstrip())
        return "\n".join(lines)
