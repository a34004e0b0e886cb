"""Consumer side of the persistent Gluon attention kernel (``attention_gluon_kernel``).

Two warp groups per program, each computing 64 of a tile's 128 query rows (with 64-token blocks one
group, all 64 rows of the tile): QKᵀ and P V on the tensor cores (wgmma, asynchronous), the online
softmax in registers (base 2, log2(e)-folded scale). Only the diagonal block (a row's last entry when
kept) takes the token-level causal mask; the other blocks skip it.

Within a tile, block t's QKᵀ is issued before block t-1's P V and block t's softmax runs while that
P V is on the tensor cores (FlashAttention-3's overlap within a warp group, ``_overlapped_block``);
a tile's first block runs alone (``_first_block``), and so does its last P V (``_last_pv``). (A loop
that also overlapped a tile's last P V with the next tile's first QKᵀ and softmax measured slower on
the H100, and FlashAttention-3's ping-pong, the two groups issuing their products in turn, no faster:
BENCHMARKS.md, "Design choices".)

A group releases a K or V slot, or its half of a q buffer, once every warp of the group is done with
it (``tiles.release``): a q buffer after the tile's last QKᵀ. Tiles without kept blocks write zeros
(``_first_kept``).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

from .attention_gluon_tiles import head_origin, received_tile, release, tile_coords


@gluon.jit
def _softmax_step(qk, m_i, l_i, diag, offs_r, offs_c, qk_scale):
    """Online-softmax step for one block of scores qk (ROWS, BLOCK); on the diagonal block (``diag``)
    key c is masked for query row r when c > r (only there: the compare and select cost a quarter of
    the step's instructions). Returns the probabilities, the rescale factor of earlier sums, the new
    max and sum."""
    if diag:
        qk = gl.where(gl.expand_dims(offs_c, 0) <= gl.expand_dims(offs_r, 1), qk, float("-inf"))
    m_ij = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
    p = gl.exp2(qk * qk_scale - gl.expand_dims(m_ij, 1))
    alpha = gl.exp2(m_i - m_ij)
    return p, alpha, m_ij, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _first_block(q, k_smem, k_ready, k_empty, c, m_i, l_i, diag, offs_r, offs_c, qk_scale, zero_s,
                 K_STAGES: gl.constexpr):
    """The block at ring position c with no P V to overlap: its QKᵀ, then its softmax from state
    (m_i, l_i). Returns (p, m_i, l_i)."""
    sk = c % K_STAGES
    mbarrier.wait(k_ready.index(sk), (c // K_STAGES) & 1)
    qk = warpgroup_mma(q, k_smem.index(sk).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk,))
    release(k_empty, sk)
    p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, diag, offs_r, offs_c, qk_scale)
    return p, m_i, l_i


@gluon.jit
def _overlapped_block(q, p_op, acc, m_i, l_i, c, diag, offs_r, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty,
                      offs_c, qk_scale, zero_s, K_STAGES: gl.constexpr, V_STAGES: gl.constexpr):
    """The QKᵀ of the block at ring position c (q: its tile's rows), issued before the P V of the
    block before it (p_op, into acc); block c's softmax from state (m_i, l_i) runs while that P V is
    on the tensor cores. Returns (acc with the P V added, not rescaled; p; alpha; m_i; l_i)."""
    sk = c % K_STAGES
    sv = (c - 1) % V_STAGES
    mbarrier.wait(k_ready.index(sk), (c // K_STAGES) & 1)
    qk = warpgroup_mma(q, k_smem.index(sk).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    mbarrier.wait(v_ready.index(sv), ((c - 1) // V_STAGES) & 1)
    acc = warpgroup_mma(p_op, v_smem.index(sv), acc, is_async=True)
    qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk,))
    release(k_empty, sk)
    p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, diag, offs_r, offs_c, qk_scale)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    release(v_empty, sv)
    return acc, p, alpha, m_i, l_i


@gluon.jit
def _last_pv(p_op, acc, c, v_smem, v_ready, v_empty, V_STAGES: gl.constexpr):
    """The P V of the block at ring position c - 1, with nothing to overlap it."""
    sv = (c - 1) % V_STAGES
    mbarrier.wait(v_ready.index(sv), ((c - 1) // V_STAGES) & 1)
    acc = warpgroup_mma(p_op, v_smem.index(sv), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    release(v_empty, sv)
    return acc


@gluon.jit
def _store_tile(O, acc, l_i, tile, N_CTX, H_Q, H_C, QB0, N_ROWS, N_TILES, HALF: gl.constexpr,
                BLOCK: gl.constexpr, HEAD_DIM: gl.constexpr, HEAD_MAJOR: gl.constexpr, TOKEN_MAJOR: gl.constexpr):
    """Writes a consumer group's 64 output rows of ``tile``: acc (ROWS, HEAD_DIM) / l_i (ROWS); rows
    that saw no key (l_i == 0) write 0. O is laid out as q (``head_origin``)."""
    ROWS: gl.constexpr = 64  # a warp group's rows: a tile's half with 128-token blocks, all of it with 64
    o_rows: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
    o_cols: gl.constexpr = gl.SliceLayout(0, acc.type.layout)
    qb, bh, row = tile_coords(tile, H_Q, H_C, QB0, N_ROWS, N_TILES, HEAD_MAJOR)
    l_o = gl.convert_layout(gl.where(l_i == 0.0, 1.0, l_i), o_rows)
    out = acc / gl.expand_dims(l_o, 1)
    offs_m = qb * BLOCK + HALF * ROWS + gl.arange(0, ROWS, o_rows)
    offs_d = gl.arange(0, HEAD_DIM, o_cols)
    o_row, o_col = head_origin(bh.to(gl.int64), H_Q, N_CTX, HEAD_DIM, TOKEN_MAJOR)
    width = HEAD_DIM  # elements per row of O's 2-D view
    if TOKEN_MAJOR:
        width = HEAD_DIM * H_Q
    o_ptrs = O + gl.expand_dims(o_row + offs_m, 1) * width + o_col + gl.expand_dims(offs_d, 0)
    gl.store(o_ptrs, out.to(O.dtype.element_ty), mask=gl.expand_dims(offs_m, 1) < N_CTX)


@gluon.jit
def _first_kept(tile, num, diag_t, i, tile_smem, q_ready, q_empty, O, N_CTX, H_Q, H_C, QB0, N_ROWS, N_TILES,
                HALF: gl.constexpr, BLOCK: gl.constexpr, HEAD_DIM: gl.constexpr, HEAD_MAJOR: gl.constexpr,
                TOKEN_MAJOR: gl.constexpr, meta_layout: gl.constexpr, o_layout: gl.constexpr):
    """From this program's i-th tile (already received) on: writes zeros for tiles without kept
    blocks, releasing their q buffers; returns (tile, num, diag_t, i) of the first with any (tile =
    N_TILES: none left)."""
    while (tile < N_TILES) & (num == 0):
        release(q_empty, i % 2)
        _store_tile(O, gl.zeros([64, HEAD_DIM], gl.float32, o_layout),
                    gl.zeros([64], gl.float32, gl.SliceLayout(1, o_layout)), tile, N_CTX, H_Q, H_C, QB0,
                    N_ROWS, N_TILES, HALF, BLOCK, HEAD_DIM, HEAD_MAJOR, TOKEN_MAJOR)
        i += 1
        tile, num, diag_t = received_tile(tile_smem, q_ready, i, meta_layout)
    return tile, num, diag_t, i


@gluon.jit
def attend_partition(q_smem, k_smem, v_smem, tile_smem, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty,
                     O, qk_scale, N_CTX, H_Q, H_C, QB0, N_ROWS, N_TILES,
                     HALF: gl.constexpr,  # which 64 query rows of each tile this warp group computes
                     BLOCK: gl.constexpr, HEAD_DIM: gl.constexpr, K_STAGES: gl.constexpr,
                     V_STAGES: gl.constexpr, HEAD_MAJOR: gl.constexpr, TOKEN_MAJOR: gl.constexpr):
    """A consumer group: the tiles of this program, as the q+K loader hands them over."""
    ROWS: gl.constexpr = 64  # a warp group's rows: a tile's half with 128-token blocks, all of it with 64
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    meta_layout: gl.constexpr = gl.BlockedLayout([4], [32], [4], [0])  # each thread holds all 4 words
    dtype: gl.constexpr = q_smem.dtype

    offs_r = HALF * ROWS + gl.arange(0, ROWS, s_rows)  # query row within the plan block
    offs_c = gl.arange(0, BLOCK, gl.SliceLayout(0, s_layout))
    zero_s = gl.zeros([ROWS, BLOCK], gl.float32, s_layout)
    c = 0  # ring position of the next K/V block
    i = gl.to_tensor(0)  # this program's tiles so far (a tensor: it changes in _first_kept's loop)
    tile, num, diag_t = received_tile(tile_smem, q_ready, i, meta_layout)
    tile, num, diag_t, i = _first_kept(tile, num, diag_t, i, tile_smem, q_ready, q_empty, O, N_CTX, H_Q, H_C, QB0,
                                       N_ROWS, N_TILES, HALF, BLOCK, HEAD_DIM, HEAD_MAJOR, TOKEN_MAJOR, meta_layout,
                                       o_layout)
    while tile < N_TILES:
        q = q_smem.index(i % 2).slice(HALF * ROWS, ROWS)
        p, m_i, l_i = _first_block(q, k_smem, k_ready, k_empty, c, gl.full([ROWS], -1.0e30, gl.float32, s_rows),
                                   gl.zeros([ROWS], gl.float32, s_rows), diag_t == 0, offs_r, offs_c, qk_scale,
                                   zero_s, K_STAGES)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
        c += 1
        for t in range(1, num):
            acc, p, alpha, m_i, l_i = _overlapped_block(q, p_op, acc, m_i, l_i, c, t == diag_t, offs_r, k_smem,
                                                        v_smem, k_ready, v_ready, k_empty, v_empty, offs_c,
                                                        qk_scale, zero_s, K_STAGES, V_STAGES)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            c += 1
        release(q_empty, i % 2)  # the tile's last QKᵀ is done: the loader may refill this q buffer
        acc = _last_pv(p_op, acc, c, v_smem, v_ready, v_empty, V_STAGES)
        _store_tile(O, acc, l_i, tile, N_CTX, H_Q, H_C, QB0, N_ROWS, N_TILES, HALF, BLOCK, HEAD_DIM, HEAD_MAJOR,
                    TOKEN_MAJOR)
        i += 1
        tile, num, diag_t = received_tile(tile_smem, q_ready, i, meta_layout)
        tile, num, diag_t, i = _first_kept(tile, num, diag_t, i, tile_smem, q_ready, q_empty, O, N_CTX, H_Q, H_C,
                                           QB0, N_ROWS, N_TILES, HALF, BLOCK, HEAD_DIM, HEAD_MAJOR, TOKEN_MAJOR,
                                           meta_layout, o_layout)
