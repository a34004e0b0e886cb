"""Tiles of the persistent Gluon attention kernel, shared by its partitions: the tile order, the q+K
loader's word to the others about each tile (index, kept-block count, diagonal position, handed over
in shared memory beside the tile's q buffer), and the consumer groups' buffer release.

Also two Gluon names that changed between Triton releases (3.6 on the GPU machine, 3.9 in CI): a
barrier over the calling partition's warps, and a TMA load into shared memory.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

partition_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


@gluon.jit
def tile_coords(tile, H_Q, H_C, QB0, N_ROWS, N_TILES, HEAD_MAJOR: gl.constexpr):
    """Query block, batch-head and plan row of ``tile``, latest query blocks (longest rows) first.
    HEAD_MAJOR: the tiles of one copy head (its H_q / H_c query heads, all query blocks) run together,
    so the programs working at one time read one copy head's K/V, and scattered kept blocks come from
    L2 more often; else each query block's tiles of every batch-head run together."""
    if HEAD_MAJOR:
        group = H_Q // H_C
        per_head = N_ROWS * group
        r = tile % per_head
        qb = QB0 + N_ROWS - 1 - r // group
        bh = (tile // per_head) * group + r % group
    else:
        bh_count = N_TILES // N_ROWS
        qb = QB0 + N_ROWS - 1 - tile // bh_count
        bh = tile % bh_count
    return qb, bh, bh.to(gl.int64) * N_ROWS + (qb - QB0)


@gluon.jit
def head_origin(bh, H, N_CTX, HEAD_DIM: gl.constexpr, TOKEN_MAJOR: gl.constexpr):
    """Row and column of token 0 of batch-head ``bh`` (of H heads) in a tensor's 2-D view: rows of
    (B·H·N, D) for a (B, H, N, D)-contiguous tensor; with TOKEN_MAJOR, rows of (B·N, H·D) for a
    (B, N, H, D)-contiguous one, the layout transformers' projections leave q, k and v in."""
    row = bh * N_CTX
    col = bh * 0
    if TOKEN_MAJOR:
        row = (bh // H) * N_CTX
        col = (bh % H) * HEAD_DIM
    return row, col


@gluon.jit
def send_tile(tile_smem, qbuf, tile, num, diag_t, layout: gl.constexpr):
    """The q+K loader's word to the other partitions about the tile in q buffer ``qbuf``: its index
    (N_TILES: no tile left), its kept-block count and the position of its diagonal block (-1: none)."""
    k = gl.arange(0, 4, layout)
    tile_smem.index(qbuf).store(gl.where(k == 0, tile, gl.where(k == 1, num, diag_t)))


@gluon.jit
def received_tile(tile_smem, q_ready, i, layout: gl.constexpr):
    """(tile, num, diag_t) of this program's i-th tile, read once its q buffer is ready."""
    mbarrier.wait(q_ready.index(i % 2), (i // 2) & 1)
    meta = tile_smem.index(i % 2).load(layout)
    k = gl.arange(0, 4, layout)
    return (gl.sum(gl.where(k == 0, meta, 0), 0), gl.sum(gl.where(k == 1, meta, 0), 0),
            gl.sum(gl.where(k == 2, meta, 0), 0))


@gluon.jit
def release(empty, s):
    """This consumer group's arrive on ``empty[s]``, once every warp of the group is done with it."""
    partition_barrier()
    mbarrier.arrive(empty.index(s), count=1)
