"""PBS-Attn parameters as one frozen, validated value."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class PBSConfig:
    """Parameters of Permuted Block-Sparse Attention.

    block_size:    B, tokens per query/key block (the kernel tile and the selection unit).
    segment_size:  S, keys are permuted only inside segments of S tokens; a multiple of B.
    threshold:     tau in (0, 1]; per query block keep the best key blocks until their share of the
                   pooled attention reaches tau. 1.0 keeps every causal block (= dense attention).
    permute:       sort keys inside segments by last-query-block importance (False = plain
                   block selection, no permutation).
    per_head_permutation: one permutation per query head instead of one per KV head (GQA group).
    sink:          always keep the key block that holds original token 0 (the attention sink).
    local_blocks:  key blocks just before the diagonal segment that are always kept.
    dense_below:   sequences shorter than this run dense attention (the measured break-even length).
    """

    block_size: int = 128
    segment_size: int = 256
    threshold: float = 0.9
    permute: bool = True
    per_head_permutation: bool = False
    sink: bool = True
    local_blocks: int = 0
    dense_below: int = 0

    def __post_init__(self) -> None:
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.segment_size < self.block_size or self.segment_size % self.block_size:
            raise ValueError(
                f"segment_size must be a positive multiple of block_size ({self.block_size}), "
                f"got {self.segment_size}; try {max(1, self.segment_size // self.block_size) * self.block_size}"
            )
        if not (0.0 < self.threshold <= 1.0):
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.local_blocks < 0 or self.dense_below < 0:
            raise ValueError(
                f"local_blocks and dense_below must be >= 0, got {self.local_blocks} and {self.dense_below}"
            )

    def replace(self, **changes) -> "PBSConfig":
        """A copy with some fields changed (None values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PBSConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown PBS parameter(s) {sorted(unknown)}; known: {sorted(names)}")
        return cls(**data)
