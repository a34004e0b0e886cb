"""GPU tiles of the plan launchers as frozen, validated values: what each launch of ``permute``,
``select`` and ``sampled`` asks of Triton (tile sizes, warps, pipelining stages).

Each launcher takes ``tiles=`` (default: the instance below, the values measured best on an H100);
``benchmarks/select_bench.py --sweep`` and ``benchmarks/sampled_bench.py --sweep`` time alternatives by
passing other instances. The kernels stay the same; only their launch parameters change. No torch or
Triton here: these are plain values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

MAX_WARPS = 32  # 1024 threads, the most one program may have on NVIDIA GPUs
GLUON_SCORING_ENV = "PBS_GLUON_SCORING"


def _power_of_two(name: str, value: int | None, at_least: int, at_most: int | None = None,
                  optional: bool = False) -> None:
    """Refuse a tile parameter that is not a power of two in [at_least, at_most] (None allowed when optional)."""
    if value is None and optional:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= at_least and value & (value - 1) == 0
    if ok and (at_most is None or value <= at_most):
        return
    span = f"in {at_least}..{at_most}" if at_most is not None else f">= {at_least}"
    nearest = _nearest_power_of_two(value, at_least, at_most)
    hint = f"; try {nearest}" if nearest is not None else ""
    unset = " or None (chosen by shape)" if optional else ""
    raise ValueError(f"{name} must be a power of two {span}{unset}, got {value!r}{hint}")


def _positive(name: str, value: int | None, what: str, hint: int, optional: bool = False) -> None:
    """Refuse a count that is not a positive int (None allowed when optional)."""
    if value is None and optional:
        return
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return
    unset = " or None (Triton's default)" if optional else ""
    raise ValueError(f"{name} must be a positive number of {what}{unset}, got {value!r}; try {hint}")


def _nearest_power_of_two(value, at_least: int, at_most: int | None) -> int | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    power = 1 << max(0, round(max(value, 1)).bit_length() - 1)
    power = max(power, at_least)
    return min(power, at_most) if at_most is not None else power


@dataclass(frozen=True)
class PermuteTiles:
    """Tiles of the key-importance passes (``triton.permute.key_importance``).

    block_m, block_n: query rows x keys per program of both passes (the ``tl.dot`` tile: powers of two >= 16).
    num_warps:        warps per program of both passes.
    span:             keys per program of the row-statistics pass, rounded down to a multiple of block_n
                      (at least one tile): enough programs to fill a GPU at long N while each one still
                      streams many key tiles; the spans are merged with a log-sum-exp.
    """

    block_m: int = 64
    block_n: int = 128
    num_warps: int = 8
    span: int = 4096

    def __post_init__(self) -> None:
        _power_of_two("block_m", self.block_m, 16)
        _power_of_two("block_n", self.block_n, 16)
        _power_of_two("num_warps", self.num_warps, 1, MAX_WARPS)
        _positive("span", self.span, "keys", 4096)


@dataclass(frozen=True)
class SelectTiles:
    """Tiles of the pooled selection (``triton.select``: pooling, block scores, top-p).

    tile_elements: elements per program of the pooling tile (blocks x head_dim); under ``TRITON_INTERPRET``
                   the launchers use 65536 instead (the interpreter's cost is per operation).
    top_p_warps:   warps of the top-p kernel; None: one warp per 1024 blocks of a row (at most 16).
    score_block:   query blocks x key blocks per program of the score kernel; None: by head_dim (64 up
                   to head_dim 64, else 32).
    """

    tile_elements: int = 4096
    top_p_warps: int | None = None
    score_block: int | None = None

    def __post_init__(self) -> None:
        _power_of_two("tile_elements", self.tile_elements, 16)
        _power_of_two("top_p_warps", self.top_p_warps, 1, MAX_WARPS, optional=True)
        _power_of_two("score_block", self.score_block, 16, optional=True)


@dataclass(frozen=True)
class SampledTiles:
    """Tiles of the sampled-row scoring (``triton.sampled``: ``_sampled_lse_kernel``).

    rows:        sampled rows per program (query heads x query blocks x sample_rows, consecutive blocks of
                 any segments); for score "antidiagonal", query stripes per program.
    heads:       score "sampled" / "sampled_max": query heads per program, at most (the launcher takes the
                 largest divisor of the query heads per permutation up to it): heads of one GQA group
                 share every key tile read.
    key_blocks:  score "sampled" / "sampled_max": key blocks per tile (a power of two; more blocks, larger MMA tiles).
    key_stripes: score "antidiagonal": key stripes per tile (a power of two >= 16; at least one block's).
    copy_keys:   score "sampled" / "sampled_max": read keys before a row's own segment from one copy of K
                 in permuted order (B, H_perm, N, D, made per call) instead of gathering them through the
                 permutation.
    tma:         with copy_keys: read that copy through a TMA tensor descriptor (whole tiles; head_dim a
                 power of two), not through pointer loads.
    gluon:       with tma, block maxima and 128 rows on a Hopper GPU: score the key blocks before each program's
                 own segments with the warp-specialized Gluon kernel (``sampled_gluon_kernel``: a block's
                 product on the tensor cores while the previous block is reduced) and the rest with the Triton
                 kernel, which resumes from its state. Not yet timed on a GPU, so off by default.
    num_warps:   warps per program.
    num_stages:  software-pipelining stages; None: Triton's default.
    top_p_warps: warps of the plan's top-p kernel (``_sampled_top_p_kernel``); None: one warp per 512
                 blocks of a row, at least 2 and at most 16.
    top_p_rows:  query blocks per program of that kernel; None: one (many under ``TRITON_INTERPRET``).
    """

    rows: int = 128
    heads: int = 1
    num_warps: int = 8
    num_stages: int | None = 4
    key_blocks: int = 2
    key_stripes: int = 64
    copy_keys: bool = True
    tma: bool = True
    gluon: bool = False
    top_p_warps: int | None = None
    top_p_rows: int | None = None

    def __post_init__(self) -> None:
        _positive("rows", self.rows, "sampled rows", 64)
        _positive("heads", self.heads, "query heads", 4)
        _power_of_two("key_blocks", self.key_blocks, 1, 16)
        _power_of_two("key_stripes", self.key_stripes, 16)
        for name in ("copy_keys", "tma", "gluon"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _power_of_two("num_warps", self.num_warps, 1, MAX_WARPS)
        _positive("num_stages", self.num_stages, "pipelining stages", 3, optional=True)
        _power_of_two("top_p_warps", self.top_p_warps, 1, MAX_WARPS, optional=True)
        _power_of_two("top_p_rows", self.top_p_rows, 1, optional=True)

    def launch_options(self) -> dict[str, int]:
        """The ``num_warps`` / ``num_stages`` keywords of the launch (no ``num_stages``: Triton's default)."""
        return {"num_warps": self.num_warps, **({"num_stages": self.num_stages} if self.num_stages else {})}

    def fitting(self, element_bytes: int) -> SampledTiles:
        """These tiles for inputs of ``element_bytes`` per element: for fp32 (4 bytes) at most 64 rows, 4 warps
        and 2 stages. Compiled for sm_90 (Triton 3.6, head_dim 128, TMA), the default tile asks 320 KiB of
        shared memory with fp32 inputs, more than an H100's 227 KiB (its launch failed), and this one 160 KiB."""
        if element_bytes < 4:
            return self
        return replace(self, rows=min(self.rows, 64), num_warps=min(self.num_warps, 4),
                       num_stages=min(self.num_stages or 2, 2))


# best of 5 tiles on an H100 at 32K and 128K (select_bench --sweep)
PERMUTE_TILES = PermuteTiles()
# score tile None: by head_dim (select_bench --sweep on an H100: 64 for head_dim 64, 0.34 vs 0.45 ms at 32K with
# the SmolLM2 shape; 32 for head_dim 128, where 64 took 2-4x longer)
SELECT_TILES = SelectTiles()
# 128 rows of one head, 8 warps, 4 stages, 2 key blocks per tile, keys from a permuted copy of K through TMA: on an
# H100 (Llama shape, block maxima) the selection took 3.13 / 48.6 ms at 32K / 128K, against 4.88 / 97.8 with 64
# rows, 4 warps and keys gathered through the permutation, 3.62 / 56.3 from the copy by pointer loads, 3.19 /
# 50.1 with Triton's default stages (sampled_bench --sweep, commit 9869a60)
# PBS_GLUON_SCORING=1: the Gluon kernel scores the blocks before each program's segments (``gluon``), for
# measuring it; off otherwise until it is measured
SAMPLED_TILES = SampledTiles(gluon=os.environ.get(GLUON_SCORING_ENV) == "1")
