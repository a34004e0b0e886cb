"""GPU block selection: pooled block scores, top-p per query block, forced blocks, packed plan.

Twin of ``reference.select_blocks(q, reference.permute_keys(k, perm), perm, config)``. No host
syncs. Memory: pooled q and k (fp32, N/B rows each), the plan itself, and one fp32 score buffer
for a chunk of query blocks, at most ``_SCORE_BYTES`` (the (B, H, N_qb, N_qb) score matrix never
exists at once). Pooling gathers key rows through ``perm``; the permuted keys exist only when the
caller asks the same pass for them (``pool_and_copy``: the K/V copies the attention kernel reads).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import triton

from .. import plan_rules
from ..config import PBSConfig
from .launching import interpreting, last_dim_contiguous
from .select_kernel import _block_scores_kernel, _pool_kernel, _top_p_kernel
from .tiles import SELECT_TILES, SelectTiles

# Upper bound of the per-chunk fp32 score buffer: 256 MiB (the whole matrix up to 128K tokens with
# 32 heads; 16 chunks at 512K).
_SCORE_BYTES = 256 << 20
# elements of the top-p tile per warp: whole rows per warp up to 1024 blocks (benchmarks/plan_kernels.py on an
# H100: 172 -> 116 us per layer at 128K with the SmolLM2 shape, against 4 warps on 4096; BENCHMARKS.md)
_TOP_P_WARP_ELEMENTS = 1024


def _tile_elements(tiles: SelectTiles) -> int:
    """Elements per program of the pooling and top-p tiles."""
    return 1 << 16 if interpreting() else tiles.tile_elements


def pool_blocks(x: torch.Tensor, block_size: int, perm: torch.Tensor | None = None,
                heads: int | None = None, *, tiles: SelectTiles = SELECT_TILES) -> torch.Tensor:
    """fp32 (B, H_out, N_b, D): mean of each block of ``block_size`` rows (partial last block: its real rows).

    x (B, H_x, N, D). With ``perm`` (int32 (B, H_out, N)) slot s of output head h reads row
    ``perm[b, h, s]`` of input head ``h // (H_out // H_x)`` (pooled permuted keys, no permuted copy).
    Twin of ``reference.pool_blocks`` (on ``reference.permute_keys(x, perm)``).
    """
    return _pool(x, block_size, perm, heads, tiles=tiles)[0]


def pool_and_copy(k: torch.Tensor, v: torch.Tensor, block_size: int, perm: torch.Tensor, *,
                  tiles: SelectTiles = SELECT_TILES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``pool_blocks(k, block_size, perm)`` and the permuted copies of k and v, from one pass over k.

    k, v (B, H_kv, N, D) of one dtype, D a power of two; perm int32 (B, H_perm, N). Returns (k_bar fp32
    (B, H_perm, N_b, D), k_perm, v_perm (B, H_perm, N, D) contiguous in k's dtype): the copies equal
    ``attention.permuted_copies((k, v), perm)`` (twin: ``reference.permute_keys``), made while the
    pooling gathers the keys anyway, so the copy reads K once less and launches no kernel of its own.
    """
    if v.shape != k.shape or v.dtype != k.dtype or k.shape[-1] & (k.shape[-1] - 1):
        raise ValueError(f"pool_and_copy needs k and v of one shape and dtype with a power-of-two head_dim, got "
                         f"{tuple(k.shape)} {k.dtype} and {tuple(v.shape)} {v.dtype}")
    return _pool(k, block_size, perm, values=v, tiles=tiles)


def _pool(x: torch.Tensor, block_size: int, perm: torch.Tensor | None, heads: int | None = None,
          values: torch.Tensor | None = None, tiles: SelectTiles = SELECT_TILES) -> tuple[torch.Tensor, ...]:
    """The pooling launch: (pooled,), or (pooled, x_perm, values_perm) when ``values`` is given (with ``perm``)."""
    b, h_x, n, d = x.shape
    x = last_dim_contiguous(x)
    h_out = perm.shape[1] if perm is not None else (heads or h_x)
    if h_out % h_x:
        raise ValueError(f"output heads ({h_out}) must be a multiple of input heads ({h_x})")
    n_b = triton.cdiv(n, block_size)
    out = torch.empty(b, h_out, n_b, d, dtype=torch.float32, device=x.device)
    p = perm if perm is not None else out  # unused pointer when not gathering
    copy = values is not None and perm is not None
    y = last_dim_contiguous(values) if copy else x
    x_copy, y_copy = (out, out)  # unused pointers when not copying
    if copy:
        x_copy, y_copy = (torch.empty(b, h_out, n, d, dtype=x.dtype, device=x.device) for _ in range(2))
    d_pow2 = triton.next_power_of_2(d)
    nblk = triton.next_power_of_2(max(1, min(n_b, _tile_elements(tiles) // (block_size * d_pow2))))
    _pool_kernel[(triton.cdiv(n_b, nblk), b * h_out)](
        x, p, out, x_copy, y, y_copy,
        x.stride(0), x.stride(1), x.stride(2),
        y.stride(0), y.stride(1), y.stride(2),
        p.stride(0) if perm is not None else 0, p.stride(1) if perm is not None else 0,
        n, n_b, h_out, h_out // h_x,
        GATHER=perm is not None, COPY=copy, NBLK=nblk, BLOCK=block_size, HEAD_DIM=d, D_POW2=d_pow2,
        num_warps=4,
    )
    return (out, x_copy, y_copy) if copy else (out,)


def sink_block(perm: torch.Tensor, block_size: int) -> torch.Tensor:
    """int32 (B, H_perm): the permuted key block holding original token 0 (``plan_rules.sink_block`` in
    the kernels' int32; device-side, no sync)."""
    return plan_rules.sink_block(perm, block_size).to(torch.int32)


def select_blocks(q: torch.Tensor, k: torch.Tensor, perm: torch.Tensor, config: PBSConfig,
                  scale: float | None = None, score_bytes: int = _SCORE_BYTES,
                  rows: tuple[int, int] | None = None, *, tiles: SelectTiles = SELECT_TILES
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_num_blocks int32 (B, H_q, N_qb), kv_indices int32 (B, H_q, N_qb, N_kb)).

    q (B, H_q, N, D); k (B, H_kv, N, D) in ORIGINAL order; perm int32 (B, H_perm, N) with
    H_perm = H_kv or H_q. Same layout as ``reference.select_blocks``: kept blocks packed left in
    ascending order, then the other blocks ascending (padding, never read).
    rows: (r0, r1) plans only query blocks [r0, r1): the outputs then have R = r1 - r0 rows
    ((B, H_q, R) and (B, H_q, R, N_kb)), equal to those rows of the whole plan. ``tiles``: the launches
    (``pbs_kernels.triton.tiles``).
    """
    pooled = BlockSelection(q, k, perm, config, scale, tiles=tiles)
    return pooled.select(*(rows if rows is not None else (0, pooled.n_b)), score_bytes)


def select_row_chunks(q: torch.Tensor, k: torch.Tensor, perm: torch.Tensor, config: PBSConfig,
                      scale: float | None, rows_per_chunk: int, score_bytes: int = _SCORE_BYTES, *,
                      tiles: SelectTiles = SELECT_TILES) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``select_blocks`` one chunk of query blocks at a time, pooling q and k once: yields (r0,
    kv_num_blocks (B, H_q, R), kv_indices (B, H_q, R, N_kb)) for r0 = 0, rows_per_chunk, ...
    (R = rows_per_chunk, the last chunk shorter). Shapes otherwise as in ``select_blocks``."""
    return BlockSelection(q, k, perm, config, scale, tiles=tiles).row_chunks(rows_per_chunk, score_bytes)


class BlockSelection:
    """Validated inputs and the pooled q / k of one selection; ``select`` plans a range of rows.

    With ``values`` (v, shaped like k, head_dim a power of two), the pooling pass also makes the
    permuted copies of k and v (``pool_and_copy``) and keeps them in ``copies`` for the attention
    kernel; otherwise ``copies`` is None. ``tiles``: the launches (``pbs_kernels.triton.tiles``).
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, perm: torch.Tensor, config: PBSConfig,
                 scale: float | None, values: torch.Tensor | None = None, tiles: SelectTiles = SELECT_TILES) -> None:
        b, h_q, n, d = q.shape
        h_kv = k.shape[1]
        h_perm = perm.shape[1]
        if getattr(config, "beyond_published", lambda: False)():
            raise ValueError("this GPU path implements the published method only; options beyond it run "
                             f"through pbs_kernels.select (the reference), got {config}")
        if h_q % h_perm or h_perm % h_kv:
            raise ValueError(f"heads must nest: H_q={h_q}, H_perm={h_perm}, H_kv={h_kv} "
                             "(expected H_perm = H_kv or H_q, and H_q a multiple of H_kv)")
        if perm.shape != (b, h_perm, n):
            raise ValueError(f"perm has shape {tuple(perm.shape)}, expected ({b}, {h_perm}, {n})")
        self.config, self.device, self.tiles = config, q.device, tiles
        self.b, self.h_q, self.h_perm, self.d = b, h_q, h_perm, d
        bs = config.block_size
        self.scale = scale if scale is not None else 1.0 / math.sqrt(d)
        self.n_b = triton.cdiv(n, bs)
        perm = perm.to(torch.int32).contiguous()
        self.q_bar = pool_blocks(q, bs, tiles=tiles)  # (B, H_q, N_b, D)
        self.copies: tuple[torch.Tensor, torch.Tensor] | None = None
        if values is None:
            self.k_bar = pool_blocks(k, bs, perm, tiles=tiles)  # (B, H_perm, N_b, D), permuted order
        else:
            self.k_bar, *copies = pool_and_copy(k, values, bs, perm, tiles=tiles)
            self.copies = tuple(copies)  # k, v (B, H_perm, N, D) in permuted order
        self.sink = sink_block(perm, bs).contiguous()  # (B, H_perm)

    def row_chunks(self, rows_per_chunk: int, score_bytes: int = _SCORE_BYTES
                   ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(r0, kv_num_blocks, kv_indices) of query blocks [r0, r0 + rows_per_chunk) for r0 = 0,
        rows_per_chunk, ... (the last chunk shorter): ``select`` over the whole plan, a chunk at a time."""
        for r0 in range(0, self.n_b, rows_per_chunk):
            yield (r0, *self.select(r0, min(self.n_b, r0 + rows_per_chunk), score_bytes))

    def select(self, r_begin: int, r_end: int, score_bytes: int = _SCORE_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
        """The plan rows of query blocks [r_begin, r_end)."""
        b, h_q, h_perm, d, n_b, config, tiles = self.b, self.h_q, self.h_perm, self.d, self.n_b, self.config, self.tiles
        if not 0 <= r_begin < r_end <= n_b:
            raise ValueError(f"rows must satisfy 0 <= r0 < r1 <= {n_b} (query blocks), got {(r_begin, r_end)}")
        out_rows = r_end - r_begin
        num = torch.empty(b, h_q, out_rows, dtype=torch.int32, device=self.device)
        idx = torch.empty(b, h_q, out_rows, n_b, dtype=torch.int32, device=self.device)
        per_seg = config.segment_size // config.block_size
        nb_pow2 = max(16, triton.next_power_of_2(n_b))
        # top-p tile: a warp per 1024 blocks of a row, rows packed into 1024 elements per warp, so that up to
        # 128K tokens (1024 blocks of 128) a warp holds whole rows: its sums never cross warps (no barriers in
        # the 31-step search). The interpreter's cost is per operation, not per element: there one program
        # takes many rows.
        top_p_warps = tiles.top_p_warps or max(1, min(16, nb_pow2 // _TOP_P_WARP_ELEMENTS))
        tile = _tile_elements(tiles) if interpreting() else _TOP_P_WARP_ELEMENTS * top_p_warps
        block_r = max(1, min(tile // nb_pow2, triton.next_power_of_2(n_b)))
        d_pow2 = max(16, triton.next_power_of_2(d))
        block_m = block_n = 64 if interpreting() else (tiles.score_block or (64 if d <= 64 else 32))
        # query blocks per chunk: as many as the score buffer holds within score_bytes (a multiple of
        # block_m when more than one tile fits)
        chunk = max(1, min(out_rows, score_bytes // (4 * b * h_q * n_b)))
        if block_m < chunk < out_rows:
            chunk = chunk // block_m * block_m
        scores = torch.empty(b * h_q, chunk, n_b, dtype=torch.float32, device=self.device)
        keep_all = config.threshold >= 1.0
        for row0 in range(r_begin, r_end, chunk):  # fixed host-side chunking: no data-dependent branching
            live = min(chunk, r_end - row0)
            _block_scores_kernel[(triton.cdiv(live, block_m), triton.cdiv(n_b, block_n), b * h_q)](
                self.q_bar, self.k_bar, scores,
                row0, chunk, n_b, h_q, h_perm, h_q // h_perm, per_seg, self.scale,
                HEAD_DIM=d, D_POW2=d_pow2, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
            )
            _top_p_kernel[(triton.cdiv(live, block_r), b * h_q)](
                scores, self.sink, num, idx,
                row0, chunk, live, n_b, r_begin, out_rows, h_q, h_q // h_perm, per_seg, config.local_blocks,
                # the reference compares fp32 masses against fp32(threshold - 1e-6)
                config.threshold - 1e-6,
                KEEP_ALL=keep_all, USE_SINK=config.sink, FORCED_COUNT=config.forced_in_top_p, BLOCK_R=block_r,
                NB_POW2=nb_pow2, num_warps=top_p_warps,
            )
        return num, idx
