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
    forced_in_top_p: True: the forced blocks (diagonal segment, local blocks, sink) rank first and their
                   mass counts towards tau. False (published): top-p runs over the scored blocks alone,
                   the sink block among them, and the forced blocks are added after. False needs
                   threshold_scope "offdiag" (under "total", tau is a share of a mass that includes them).

    Selection options beyond the published method (``beyond_published``). On a GPU the fused
    selection kernel implements the published options; "sampled", "sampled_max", threshold_scope "total"
    and row_top run a second Triton path (sampled rows); the rest the PyTorch reference
    (``needs_reference_selection``):

    score:         how key blocks are scored for top-p selection.
                   "pooled" (published): softmax of mean-pooled queries . mean-pooled keys over the
                   off-diagonal blocks; tau is a share of that pooled off-diagonal attention.
                   "sampled": the exact attention of ``sample_rows`` query rows per block (strided,
                   the block's last row included), summed per key block (an estimate of the true
                   block attention mass, not of a pooled proxy).
                   "sampled_max": like "sampled", each row scoring a key block by its largest logit
                   there: the row's softmax over the block maxima (one exponential per block instead of
                   one per key, and on the tune document as faithful at equal density).
                   "sampled_max_fp8": "sampled_max" on sampled rows and keys rounded to float8 e4m3,
                   each row and each key head scaled by a power of two that brings its largest
                   magnitude near 448 (``plan_rules.float8_scaled``): the GPU kernel's dot products
                   run on float8.
                   "mean_query": like "sampled" with the block's mean query as the only row.
                   "antidiagonal": like "sampled", each of the ``sample_rows`` rows a stripe of
                   block_size / sample_rows queries scored against stripes of as many keys by the mean
                   logit of their antidiagonal (``reference.antidiagonal_block_mass``).
    threshold_scope: what tau is a share of: "offdiag" (the published meaning: the attention over
                   off-diagonal blocks) or "total" (all causal blocks, diagonal segment included; with
                   score="sampled" tau is then an estimate of the attention recall).
    sample_rows:   query rows per block for score="sampled" / "sampled_max".
    sample_spacing: where those rows sit in the block: "strided" (evenly, the block's last row
                   first) or "geometric" (the last row, then rows 2**k - 1 from the block's start:
                   ..., 7, 3, 1, 0). Geometric rows see what the first queries of a segment need: the
                   recent keys of the previous segment, which the permutation scatters over its blocks.
    row_top:       with sampled rows, each sampled row also keeps its ``row_top`` highest-mass
                   off-diagonal blocks (protects needles that one row needs and the mean dilutes).
    importance_rows: which queries score keys for the permutation: "last" (published: the last
                   block of queries) or "strided" (block_size rows spread evenly over the queries
                   after the first segment).
    permute_heads: "all" (published) or "auto": per permutation head, keep the permutation only
                   where it lowers the number of blocks that cover tau of the exact off-diagonal
                   attention of a strided sample of query rows; other heads stay in original order.
    dense_layers:  layer indices that run dense attention (see ``for_layer``).
    """

    block_size: int = 128
    segment_size: int = 256
    threshold: float = 0.9
    permute: bool = True
    per_head_permutation: bool = False
    sink: bool = True
    local_blocks: int = 0
    dense_below: int = 0
    forced_in_top_p: bool = True
    score: str = "pooled"
    sample_rows: int = 4
    sample_spacing: str = "strided"
    importance_rows: str = "last"
    permute_heads: str = "all"
    dense_layers: tuple[int, ...] = ()
    threshold_scope: str = "offdiag"
    row_top: int = 0

    SCORES = ("pooled", "sampled", "sampled_max", "sampled_max_fp8", "mean_query", "antidiagonal")
    BLOCK_MAXIMA = ("sampled_max", "sampled_max_fp8")  # the scores that rank a block by its largest logit
    IMPORTANCE_ROWS = ("last", "strided")
    SAMPLE_SPACINGS = ("strided", "geometric")
    PERMUTE_HEADS = ("all", "auto")

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

        for name, allowed in (("score", self.SCORES), ("importance_rows", self.IMPORTANCE_ROWS),
                              ("permute_heads", self.PERMUTE_HEADS), ("sample_spacing", self.SAMPLE_SPACINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.threshold_scope not in ("offdiag", "total"):
            raise ValueError(f"threshold_scope must be offdiag or total, got {self.threshold_scope!r}")
        if not isinstance(self.forced_in_top_p, bool):
            raise ValueError(f"forced_in_top_p must be true or false, got {self.forced_in_top_p!r}")
        if not self.forced_in_top_p and self.threshold_scope != "offdiag":
            raise ValueError("forced_in_top_p = false needs threshold_scope = \"offdiag\" (with \"total\", tau "
                             "counts the forced diagonal blocks); set forced_in_top_p = true or threshold_scope "
                             "= \"offdiag\"")
        if self.row_top < 0:
            raise ValueError(f"row_top must be >= 0, got {self.row_top}")
        if not (1 <= self.sample_rows <= self.block_size):
            raise ValueError(f"sample_rows must be in [1, block_size={self.block_size}], got {self.sample_rows}")
        if self.score == "antidiagonal" and self.block_size % self.sample_rows:
            raise ValueError(f"score antidiagonal splits a block of {self.block_size} into sample_rows stripes of equal "
                             f"length; sample_rows must divide it, got {self.sample_rows}; try a power of two")
        most = self.block_size.bit_length()  # geometric rows 2**k - 1 stay distinct and inside the block
        if self.sample_spacing == "geometric" and self.sample_rows > most:
            raise ValueError(f"sample_spacing geometric places at most {most} rows in a block of {self.block_size}, "
                             f"got sample_rows = {self.sample_rows}; use sample_rows <= {most} or spacing strided")
        if not isinstance(self.dense_layers, tuple):  # lists from TOML / JSON
            object.__setattr__(self, "dense_layers", tuple(int(i) for i in self.dense_layers))
        if any(i < 0 for i in self.dense_layers):
            raise ValueError(f"dense_layers must be layer indices >= 0, got {list(self.dense_layers)}")

    def beyond_published(self) -> bool:
        """True when an option beyond the published method is on (the fused GPU selection of
        ``pbs_kernels.triton.select`` implements the published options only). Narrower:
        ``needs_reference_selection`` (options with no GPU path at all)."""
        return (self.score != "pooled" or self.importance_rows != "last" or self.permute_heads != "all"
                or self.threshold_scope != "offdiag" or self.row_top != 0)

    def needs_reference_selection(self) -> bool:
        """True when an option has no GPU path at all: score "mean_query", importance_rows "strided",
        permute_heads "auto". The other options beyond the published method (score "sampled" / "sampled_max",
        threshold_scope "total", row_top) run on the GPU through ``pbs_kernels.triton.sampled``."""
        return self.score == "mean_query" or self.importance_rows != "last" or self.permute_heads != "all"

    def for_layer(self, layer: int | None) -> "PBSConfig | None":
        """The config for one decoder layer, or None when that layer runs dense attention."""
        return None if layer is not None and layer in self.dense_layers else self

    def replace(self, **changes) -> "PBSConfig":
        """A copy with some fields changed (None values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        """Plain values; ``dense_layers`` as a list, left out when empty (the default) so writers of
        flat scalar tables (the TOML presets) need not handle lists unless a preset uses it."""
        d = dataclasses.asdict(self)
        d["dense_layers"] = list(self.dense_layers)
        if not d["dense_layers"]:
            del d["dense_layers"]
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "PBSConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown PBS parameter(s) {sorted(unknown)}; known: {sorted(names)}")
        return cls(**data)
