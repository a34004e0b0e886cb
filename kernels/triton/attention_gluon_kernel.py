"""Persistent, warp-specialized block-sparse causal attention forward for Hopper (Gluon, kernel only).

The computation of ``attention_ws_kernel.pbs_attn_fwd_ws`` (same inputs: q, the K/V copies with
original-order halves, the compressed plan), written in Triton's Gluon dialect, so that the schedule
is written out here instead of left to the compiler's automatic warp specialization:

- **persistent**: one program per SM walks tiles (query block, batch-head), latest query blocks (the
  longest rows) first. Tiles come either from an atomic counter (``DYNAMIC``, the launcher's default:
  a program takes the next tile when it is ready for one) or by a fixed stride (pid, pid + programs, ...);
- **warp-specialized**, four partitions: two consumer warp groups (64 query rows of each tile each:
  tensor-core products and online softmax), one warp loading q (two buffers) and K (a ring of
  ``K_STAGES`` slots), one warp loading V (``V_STAGES`` slots), all through TMA;
- **overlap inside a consumer** (as in FlashAttention-3): block t's QKᵀ is issued before block t-1's PV
  and the softmax of block t runs while that PV is on the tensor cores;
- **overlap across tiles**: the loaders fetch the next tile's q and first blocks while the consumers
  finish a tile and write its output, the fixed per-tile cost that weighs on rows with few kept blocks.

Synchronisation: mbarriers with phase parity. ``*_ready`` barriers complete when a TMA load lands
(expect-tx); ``*_empty`` barriers complete when both consumer groups have finished reading a buffer
(one arrive per group, after a barrier over the group's warps, since an arrive comes from one thread).
Loaders wait on an ``empty`` barrier with the opposite parity first, so fresh buffers count as free.
The q+K loader alone picks tiles and reads the plan's row lengths: it writes each tile's index, kept-
block count and diagonal position into ``tile_smem`` beside the q buffer, and the other partitions
read them once that q buffer is ready (no global load on the consumers' path); the index N_TILES
(with no q) ends them.

Softmax in base 2 with the log2(e)-folded scale; the diagonal block (j == qb, a row's last entry when
kept) gets the token-level causal mask, as in ``attention_ws_kernel``.

Shapes: q_desc over Q viewed (B * H_q * N, D); k_desc, v_desc over KC, VC viewed (B * H_c * 2N, D);
all with [BLOCK, D] blocks. O (B, H_q, N, D) contiguous; KV_NUM (B, H_q, R); KV_IDX (B, H_q, R, N_kb)
for plan rows QB0 .. QB0 + R - 1; COUNTER one zeroed int32 (read only with DYNAMIC).
N_TILES = R * B * H_q.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

# Names that changed between Triton releases (3.6 on the GPU machine, 3.9 in CI): a barrier over the
# calling partition's warps, and a TMA load into shared memory.
_partition_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


@gluon.jit
def _tile_coords(tile, N_CTX, H_Q, H_C, QB0, N_ROWS, N_TILES, HEAD_MAJOR: gl.constexpr):
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
def _plan_row(tile, N_CTX, H_Q, H_C, QB0, N_ROWS, N_TILES, SEG_BLOCKS: gl.constexpr, HEAD_MAJOR: gl.constexpr):
    """For a tile: its query block and batch-head, its plan row (index, kept-block count), the first
    block of the query's own segment and the first K/V copy row of its head."""
    qb, bh, row = _tile_coords(tile, N_CTX, H_Q, H_C, QB0, N_ROWS, N_TILES, HEAD_MAJOR)
    diag_start = (qb // SEG_BLOCKS) * SEG_BLOCKS
    c0 = ((bh // H_Q) * H_C + (bh % H_Q) // (H_Q // H_C)) * 2 * N_CTX
    return qb, bh, row, diag_start, c0


@gluon.jit
def _copy_row(KV_IDX, row, t, N_KB, diag_start, c0, N_CTX, BLOCK: gl.constexpr):
    """First K/V copy row of the row's t-th kept block: the permuted half for earlier segments, the
    original half inside the query's own segment."""
    j = gl.load(KV_IDX + row * N_KB + t)
    return c0 + j * BLOCK + (j >= diag_start).to(gl.int32) * N_CTX


@gluon.jit
def _load_row_blocks(desc, smem, ready, empty, c, KV_IDX, row, num, N_KB, diag_start, c0, N_CTX,
                     BLOCK: gl.constexpr, STAGES: gl.constexpr):
    """TMA-load the ``num`` kept blocks of a plan row through ``desc`` into the ring ``smem`` (slot
    free: ``empty``; landed: ``ready``), from ring position ``c``; returns the next position."""
    for t in range(num):
        r = _copy_row(KV_IDX, row, t, N_KB, diag_start, c0, N_CTX, BLOCK)
        s = c % STAGES
        mbarrier.wait(empty.index(s), ((c // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(s), desc.block_type.nbytes)
        _tma_load(desc, [r, 0], ready.index(s), smem.index(s))
        c += 1
    return c


@gluon.jit
def _send_tile(tile_smem, qbuf, tile, num, diag_t, layout: gl.constexpr):
    """The q+K loader's word to the other partitions about the tile in q buffer ``qbuf``: its index
    (N_TILES: no tile left), its kept-block count and the position of its diagonal block (-1: none)."""
    k = gl.arange(0, 4, layout)
    tile_smem.index(qbuf).store(gl.where(k == 0, tile, gl.where(k == 1, num, diag_t)))


@gluon.jit
def _received_tile(tile_smem, q_ready, i, layout: gl.constexpr):
    """(tile, num, diag_t) of this program's i-th tile, read once its q buffer is ready."""
    mbarrier.wait(q_ready.index(i % 2), (i // 2) & 1)
    meta = tile_smem.index(i % 2).load(layout)
    k = gl.arange(0, 4, layout)
    return (gl.sum(gl.where(k == 0, meta, 0), 0), gl.sum(gl.where(k == 1, meta, 0), 0),
            gl.sum(gl.where(k == 2, meta, 0), 0))


@gluon.jit
def _load_q_k_partition(q_desc, k_desc, q_smem, k_smem, tile_smem, q_ready, q_empty, k_ready, k_empty,
                        KV_NUM, KV_IDX, COUNTER, N_CTX, H_Q, H_C, QB0, N_ROWS, N_KB, N_TILES,
                        SEG_BLOCKS: gl.constexpr, BLOCK: gl.constexpr, K_STAGES: gl.constexpr,
                        DYNAMIC: gl.constexpr, HEAD_MAJOR: gl.constexpr):
    """One warp: picks the tiles (a stride, or an atomic counter), reads each tile's plan row length
    and diagonal position once and hands them with the tile index to the other partitions
    (``tile_smem``, beside the q buffer), loads the tile's q and the K tiles of its kept blocks."""
    meta_layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    c = 0  # K tiles loaded by this program (ring position)
    i = 0  # tiles started by this program (q buffer)
    tile = gl.program_id(0)
    if DYNAMIC:
        tile = gl.atomic_add(COUNTER, 1)
    while tile < N_TILES:
        qb, bh, row, diag_start, c0 = _plan_row(tile, N_CTX, H_Q, H_C, QB0, N_ROWS, N_TILES, SEG_BLOCKS, HEAD_MAJOR)
        num = gl.load(KV_NUM + row)
        # a row's entries ascend, so the diagonal block, when kept, is its last one
        diag_t = gl.where(gl.load(KV_IDX + row * N_KB + gl.maximum(num - 1, 0)) == qb, num - 1, -1)
        qbuf = i % 2
        mbarrier.wait(q_empty.index(qbuf), ((i // 2) & 1) ^ 1)
        _send_tile(tile_smem, qbuf, tile, num, diag_t, meta_layout)
        mbarrier.expect(q_ready.index(qbuf), q_desc.block_type.nbytes)
        _tma_load(q_desc, [bh * N_CTX + qb * BLOCK, 0], q_ready.index(qbuf), q_smem.index(qbuf))
        c = _load_row_blocks(k_desc, k_smem, k_ready, k_empty, c, KV_IDX, row, num, N_KB,
                             diag_start, c0, N_CTX, BLOCK, K_STAGES)
        i += 1
        if DYNAMIC:
            tile = gl.atomic_add(COUNTER, 1)
        else:
            tile += gl.num_programs(0)
    # no tile left: hand the other partitions N_TILES, with no q
    qbuf = i % 2
    mbarrier.wait(q_empty.index(qbuf), ((i // 2) & 1) ^ 1)
    _send_tile(tile_smem, qbuf, N_TILES, 0, -1, meta_layout)
    mbarrier.arrive(q_ready.index(qbuf), count=1)


@gluon.jit
def _load_v_partition(v_desc, v_smem, tile_smem, q_ready, v_ready, v_empty,
                      KV_IDX, N_CTX, H_Q, H_C, QB0, N_ROWS, N_KB, N_TILES,
                      SEG_BLOCKS: gl.constexpr, BLOCK: gl.constexpr, V_STAGES: gl.constexpr,
                      HEAD_MAJOR: gl.constexpr):
    """One warp: loads the V tiles of each tile's kept blocks, in its own ring, so that K loads run
    ahead of V loads (a V slot frees later than a K slot: after the P V product)."""
    meta_layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    c = 0
    i = 0
    tile, num, diag_t = _received_tile(tile_smem, q_ready, 0, meta_layout)
    while tile < N_TILES:
        qb, bh, row, diag_start, c0 = _plan_row(tile, N_CTX, H_Q, H_C, QB0, N_ROWS, N_TILES, SEG_BLOCKS, HEAD_MAJOR)
        c = _load_row_blocks(v_desc, v_smem, v_ready, v_empty, c, KV_IDX, row, num, N_KB,
                             diag_start, c0, N_CTX, BLOCK, V_STAGES)
        i += 1
        tile, num, diag_t = _received_tile(tile_smem, q_ready, i, meta_layout)


@gluon.jit
def _softmax_step(qk, m_i, l_i, lim, offs_c, qk_scale):
    """Online-softmax step for one block of scores qk (ROWS, BLOCK); keys past ``lim`` (per row) are
    masked. Returns the probabilities, the rescale factor of earlier sums, the new max and sum."""
    qk = gl.where(gl.expand_dims(offs_c, 0) <= gl.expand_dims(lim, 1), qk, float("-inf"))
    m_ij = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
    p = gl.exp2(qk * qk_scale - gl.expand_dims(m_ij, 1))
    alpha = gl.exp2(m_i - m_ij)
    return p, alpha, m_ij, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _attend_partition(q_smem, k_smem, v_smem, tile_smem, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty,
                      O, qk_scale, N_CTX, H_Q, H_C, QB0, N_ROWS, N_TILES,
                      HALF: gl.constexpr,  # which 64 query rows of each tile this warp group computes
                      BLOCK: gl.constexpr, HEAD_DIM: gl.constexpr, K_STAGES: gl.constexpr,
                      V_STAGES: gl.constexpr, HEAD_MAJOR: gl.constexpr):
    ROWS: gl.constexpr = BLOCK // 2
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    s_cols: gl.constexpr = gl.SliceLayout(0, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    o_cols: gl.constexpr = gl.SliceLayout(0, o_layout)
    dtype: gl.constexpr = q_smem.dtype

    offs_r = HALF * ROWS + gl.arange(0, ROWS, s_rows)  # query row within the plan block
    offs_c = gl.arange(0, BLOCK, s_cols)
    offs_d = gl.arange(0, HEAD_DIM, o_cols)
    zero_s = gl.zeros([ROWS, BLOCK], gl.float32, s_layout)
    meta_layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    c = 0
    i = 0
    tile, num, diag_t = _received_tile(tile_smem, q_ready, 0, meta_layout)  # q of the tile is ready too
    while tile < N_TILES:
        qb, bh, row = _tile_coords(tile, N_CTX, H_Q, H_C, QB0, N_ROWS, N_TILES, HEAD_MAJOR)
        qbuf = i % 2
        q = q_smem.index(qbuf).slice(HALF * ROWS, ROWS)

        m_i = gl.full([ROWS], -1.0e30, gl.float32, s_rows)
        l_i = gl.zeros([ROWS], gl.float32, s_rows)
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
        if num > 0:
            # Block t's scores are computed while block t-1's P V product runs on the tensor cores
            # (FlashAttention-3's overlap within a warp group): QK of block 0 first, then per block t
            # issue QK_t, issue PV_{t-1}, wait for QK_t only, softmax of block t, wait for PV_{t-1}.
            sk = c % K_STAGES
            mbarrier.wait(k_ready.index(sk), (c // K_STAGES) & 1)
            qk = warpgroup_mma(q, k_smem.index(sk).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk,))
            _partition_barrier()  # every warp of this group is done with K slot sk
            mbarrier.arrive(k_empty.index(sk), count=1)
            p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, gl.where(diag_t == 0, offs_r, BLOCK), offs_c,
                                               qk_scale)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            c += 1
            for t in range(1, num):
                sk = c % K_STAGES
                sv = (c - 1) % V_STAGES  # V of the previous block
                mbarrier.wait(k_ready.index(sk), (c // K_STAGES) & 1)
                qk = warpgroup_mma(q, k_smem.index(sk).permute((1, 0)), zero_s, use_acc=False, is_async=True)
                mbarrier.wait(v_ready.index(sv), ((c - 1) // V_STAGES) & 1)
                acc = warpgroup_mma(p_op, v_smem.index(sv), acc, is_async=True)
                qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk,))
                _partition_barrier()  # every warp of this group is done with K slot sk
                mbarrier.arrive(k_empty.index(sk), count=1)
                p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, gl.where(t == diag_t, offs_r, BLOCK), offs_c,
                                                   qk_scale)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                _partition_barrier()  # ... and with V slot sv
                mbarrier.arrive(v_empty.index(sv), count=1)
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)
                p_op = gl.convert_layout(p.to(dtype), p_layout)
                c += 1
            sv = (c - 1) % V_STAGES
            mbarrier.wait(v_ready.index(sv), ((c - 1) // V_STAGES) & 1)
            acc = warpgroup_mma(p_op, v_smem.index(sv), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            _partition_barrier()
            mbarrier.arrive(v_empty.index(sv), count=1)
        _partition_barrier()  # ... and with its half of this q buffer
        mbarrier.arrive(q_empty.index(qbuf), count=1)

        # rows that saw no key (an empty plan row) write 0
        l_o = gl.convert_layout(gl.where(l_i == 0.0, 1.0, l_i), o_rows)
        out = acc / gl.expand_dims(l_o, 1)
        offs_m = qb * BLOCK + HALF * ROWS + gl.arange(0, ROWS, o_rows)
        o_ptrs = O + gl.expand_dims(bh.to(gl.int64) * N_CTX + offs_m, 1) * HEAD_DIM + gl.expand_dims(offs_d, 0)
        gl.store(o_ptrs, out.to(dtype), mask=gl.expand_dims(offs_m, 1) < N_CTX)
        i += 1
        tile, num, diag_t = _received_tile(tile_smem, q_ready, i, meta_layout)


@gluon.jit
def _store_tile(O, acc, l_i, tile, N_CTX, H_Q, H_C, QB0, N_ROWS, N_TILES, HALF: gl.constexpr,
                BLOCK: gl.constexpr, HEAD_DIM: gl.constexpr, HEAD_MAJOR: gl.constexpr):
    """Writes a consumer group's 64 output rows of ``tile``: acc (ROWS, HEAD_DIM) / l_i (ROWS); rows
    that saw no key (l_i == 0) write 0."""
    ROWS: gl.constexpr = BLOCK // 2
    o_rows: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
    o_cols: gl.constexpr = gl.SliceLayout(0, acc.type.layout)
    qb, bh, row = _tile_coords(tile, N_CTX, H_Q, H_C, QB0, N_ROWS, N_TILES, HEAD_MAJOR)
    l_o = gl.convert_layout(gl.where(l_i == 0.0, 1.0, l_i), o_rows)
    out = acc / gl.expand_dims(l_o, 1)
    offs_m = qb * BLOCK + HALF * ROWS + gl.arange(0, ROWS, o_rows)
    offs_d = gl.arange(0, HEAD_DIM, o_cols)
    o_ptrs = O + gl.expand_dims(bh.to(gl.int64) * N_CTX + offs_m, 1) * HEAD_DIM + gl.expand_dims(offs_d, 0)
    gl.store(o_ptrs, out.to(O.dtype.element_ty), mask=gl.expand_dims(offs_m, 1) < N_CTX)


@gluon.jit
def _release(empty, s):
    """This consumer group's arrive on ``empty[s]``, once every warp of the group is done with it."""
    _partition_barrier()
    mbarrier.arrive(empty.index(s), count=1)


@gluon.jit
def _first_kept(tile, num, diag_t, i, tile_smem, q_ready, q_empty, O, N_CTX, H_Q, H_C, QB0,
                N_ROWS, N_TILES, HALF: gl.constexpr, BLOCK: gl.constexpr, HEAD_DIM: gl.constexpr,
                HEAD_MAJOR: gl.constexpr, meta_layout: gl.constexpr, o_layout: gl.constexpr):
    """From this program's i-th tile (already received) on: writes zeros for tiles without kept blocks,
    releasing their q buffers, and returns (tile, num, diag_t, i) of the first with any (N_TILES: none)."""
    while (tile < N_TILES) & (num == 0):
        _release(q_empty, i % 2)
        _store_tile(O, gl.zeros([BLOCK // 2, HEAD_DIM], gl.float32, o_layout),
                    gl.zeros([BLOCK // 2], gl.float32, gl.SliceLayout(1, o_layout)), tile, N_CTX, H_Q, H_C, QB0, N_ROWS, N_TILES, HALF, BLOCK, HEAD_DIM,
                    HEAD_MAJOR)
        i += 1
        tile, num, diag_t = _received_tile(tile_smem, q_ready, i, meta_layout)
    return tile, num, diag_t, i


@gluon.jit
def _attend_flat_partition(q_smem, k_smem, v_smem, tile_smem, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty,
                           O, qk_scale, N_CTX, H_Q, H_C, QB0, N_ROWS, N_TILES,
                           HALF: gl.constexpr,  # which 64 query rows of each tile this warp group computes
                           BLOCK: gl.constexpr, HEAD_DIM: gl.constexpr, K_STAGES: gl.constexpr,
                           V_STAGES: gl.constexpr, HEAD_MAJOR: gl.constexpr):
    """The consumer loop over one stream of kept blocks, across tiles: each step issues the next block's
    QKᵀ (of this tile, or block 0 of the next tile), then the current block's P V, and runs the next
    block's softmax while that P V is on the tensor cores; at a tile's end the output is written then.
    So a tile's first QKᵀ and softmax overlap the previous tile's last P V, as within a tile."""
    ROWS: gl.constexpr = BLOCK // 2
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    s_cols: gl.constexpr = gl.SliceLayout(0, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    dtype: gl.constexpr = q_smem.dtype
    meta_layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])

    offs_r = HALF * ROWS + gl.arange(0, ROWS, s_rows)  # query row within the plan block
    offs_c = gl.arange(0, BLOCK, s_cols)
    zero_s = gl.zeros([ROWS, BLOCK], gl.float32, s_layout)

    i = gl.to_tensor(0)  # tiles of this program so far (a tensor: it changes in _first_kept's loop)
    tile, num, diag_t = _received_tile(tile_smem, q_ready, i, meta_layout)
    tile, num, diag_t, i = _first_kept(tile, num, diag_t, i, tile_smem, q_ready, q_empty, O, N_CTX,
                                       H_Q, H_C, QB0, N_ROWS, N_TILES, HALF, BLOCK, HEAD_DIM, HEAD_MAJOR, meta_layout, o_layout)
    if tile < N_TILES:
        # block 0 of the first tile, alone
        mbarrier.wait(k_ready.index(0), 0)
        qk0 = warpgroup_mma(q_smem.index(i % 2).slice(HALF * ROWS, ROWS), k_smem.index(0).permute((1, 0)), zero_s,
                            use_acc=False, is_async=True)
        qk0 = warpgroup_mma_wait(num_outstanding=0, deps=(qk0,))
        _release(k_empty, 0)
        p0, alpha0, m_i, l_i = _softmax_step(qk0, gl.full([ROWS], -1.0e30, gl.float32, s_rows), gl.zeros([ROWS], gl.float32, s_rows), gl.where(diag_t == 0, offs_r, BLOCK), offs_c,
                                             qk_scale)
        p_op = gl.convert_layout(p0.to(dtype), p_layout)
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
        c = 1  # ring position of the next block
        while tile < N_TILES:
            # blocks 1 .. num - 1 of this tile: the loop of _attend_partition
            q = q_smem.index(i % 2).slice(HALF * ROWS, ROWS)
            for t in range(1, num):
                sk = c % K_STAGES
                sv = (c - 1) % V_STAGES
                mbarrier.wait(k_ready.index(sk), (c // K_STAGES) & 1)
                qk = warpgroup_mma(q, k_smem.index(sk).permute((1, 0)), zero_s, use_acc=False, is_async=True)
                mbarrier.wait(v_ready.index(sv), ((c - 1) // V_STAGES) & 1)
                acc = warpgroup_mma(p_op, v_smem.index(sv), acc, is_async=True)
                qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk,))
                _release(k_empty, sk)
                p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, gl.where(t == diag_t, offs_r, BLOCK), offs_c,
                                                   qk_scale)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                _release(v_empty, sv)
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)
                p_op = gl.convert_layout(p.to(dtype), p_layout)
                c += 1
            # the tile's last P V, overlapped with the next tile's first QKᵀ and softmax
            _release(q_empty, i % 2)  # the tile's last QKᵀ is done
            n_tile, n_num, n_diag = _received_tile(tile_smem, q_ready, i + 1, meta_layout)
            n_tile, n_num, n_diag, n_i = _first_kept(n_tile, n_num, n_diag, i + 1, tile_smem, q_ready, q_empty, O,
                                                     N_CTX, H_Q, H_C, QB0, N_ROWS, N_TILES, HALF,
                                                     BLOCK, HEAD_DIM, HEAD_MAJOR, meta_layout, o_layout)
            sv = (c - 1) % V_STAGES
            if n_tile < N_TILES:
                sk = c % K_STAGES
                mbarrier.wait(k_ready.index(sk), (c // K_STAGES) & 1)
                qk = warpgroup_mma(q_smem.index(n_i % 2).slice(HALF * ROWS, ROWS), k_smem.index(sk).permute((1, 0)),
                                   zero_s, use_acc=False, is_async=True)
                mbarrier.wait(v_ready.index(sv), ((c - 1) // V_STAGES) & 1)
                acc = warpgroup_mma(p_op, v_smem.index(sv), acc, is_async=True)
                qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk,))
                _release(k_empty, sk)
                l_done = l_i
                p, alpha, m_i, l_i = _softmax_step(qk, gl.full([ROWS], -1.0e30, gl.float32, s_rows), gl.zeros([ROWS], gl.float32, s_rows), gl.where(n_diag == 0, offs_r, BLOCK), offs_c,
                                                   qk_scale)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                _release(v_empty, sv)
                _store_tile(O, acc, l_done, tile, N_CTX, H_Q, H_C, QB0, N_ROWS, N_TILES, HALF, BLOCK, HEAD_DIM,
                            HEAD_MAJOR)
                acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
                p_op = gl.convert_layout(p.to(dtype), p_layout)
                c += 1
            else:  # the program's last tile
                mbarrier.wait(v_ready.index(sv), ((c - 1) // V_STAGES) & 1)
                acc = warpgroup_mma(p_op, v_smem.index(sv), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                _release(v_empty, sv)
                _store_tile(O, acc, l_i, tile, N_CTX, H_Q, H_C, QB0, N_ROWS, N_TILES, HALF, BLOCK, HEAD_DIM,
                            HEAD_MAJOR)
            tile = n_tile
            num = n_num
            diag_t = n_diag
            i = n_i


@gluon.jit
def pbs_attn_fwd_persistent(q_desc, k_desc, v_desc, O, KV_NUM, KV_IDX, COUNTER,
                            qk_scale, N_CTX, H_Q, H_C, QB0, N_ROWS, N_KB, N_TILES,
                            SEG_BLOCKS: gl.constexpr,  # plan blocks per segment
                            BLOCK: gl.constexpr,  # tokens per plan block = query rows and keys per tile
                            HEAD_DIM: gl.constexpr,
                            K_STAGES: gl.constexpr, V_STAGES: gl.constexpr,  # K and V ring slots
                            DYNAMIC: gl.constexpr,  # tiles from an atomic counter (COUNTER, zeroed), else a stride
                            HEAD_MAJOR: gl.constexpr,  # tile order: copy head slowest (see _tile_coords)
                            FLAT: gl.constexpr):  # consumers: one block stream across tiles (_attend_flat_partition)
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [2, BLOCK, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [K_STAGES, BLOCK, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [V_STAGES, BLOCK, HEAD_DIM], v_desc.layout)
    tile_smem = gl.allocate_shared_memory(gl.int32, [2, 4], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(2):
        mbarrier.init(q_ready.index(b), count=1)
        mbarrier.init(q_empty.index(b), count=2)  # one arrive per consumer warp group
    for s in gl.static_range(K_STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(k_empty.index(s), count=2)
    for s in gl.static_range(V_STAGES):
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(v_empty.index(s), count=2)
    fence_async_shared()

    if FLAT:
        gl.warp_specialize([
            (_attend_flat_partition, (q_smem, k_smem, v_smem, tile_smem, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty,  # default: 4 warps
                                 O, qk_scale, N_CTX, H_Q, H_C, QB0, N_ROWS, N_TILES, 0, BLOCK, HEAD_DIM, K_STAGES,
                                 V_STAGES, HEAD_MAJOR)),
            (_attend_flat_partition, (q_smem, k_smem, v_smem, tile_smem, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty,
                                 O, qk_scale, N_CTX, H_Q, H_C, QB0, N_ROWS, N_TILES, 1, BLOCK, HEAD_DIM, K_STAGES,
                                 V_STAGES, HEAD_MAJOR)),
            (_load_q_k_partition, (q_desc, k_desc, q_smem, k_smem, tile_smem, q_ready, q_empty, k_ready, k_empty,
                                   KV_NUM, KV_IDX, COUNTER, N_CTX, H_Q, H_C, QB0, N_ROWS, N_KB, N_TILES,
                                   SEG_BLOCKS, BLOCK, K_STAGES, DYNAMIC, HEAD_MAJOR)),
            (_load_v_partition, (v_desc, v_smem, tile_smem, q_ready, v_ready, v_empty,
                                 KV_IDX, N_CTX, H_Q, H_C, QB0, N_ROWS, N_KB, N_TILES,
                                 SEG_BLOCKS, BLOCK, V_STAGES, HEAD_MAJOR)),
        ], [4, 1, 1], [232, 24, 24])
    else:
        gl.warp_specialize([
            (_attend_partition, (q_smem, k_smem, v_smem, tile_smem, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty,  # default: 4 warps
                                 O, qk_scale, N_CTX, H_Q, H_C, QB0, N_ROWS, N_TILES, 0, BLOCK, HEAD_DIM, K_STAGES,
                                 V_STAGES, HEAD_MAJOR)),
            (_attend_partition, (q_smem, k_smem, v_smem, tile_smem, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty,
                                 O, qk_scale, N_CTX, H_Q, H_C, QB0, N_ROWS, N_TILES, 1, BLOCK, HEAD_DIM, K_STAGES,
                                 V_STAGES, HEAD_MAJOR)),
            (_load_q_k_partition, (q_desc, k_desc, q_smem, k_smem, tile_smem, q_ready, q_empty, k_ready, k_empty,
                                   KV_NUM, KV_IDX, COUNTER, N_CTX, H_Q, H_C, QB0, N_ROWS, N_KB, N_TILES,
                                   SEG_BLOCKS, BLOCK, K_STAGES, DYNAMIC, HEAD_MAJOR)),
            (_load_v_partition, (v_desc, v_smem, tile_smem, q_ready, v_ready, v_empty,
                                 KV_IDX, N_CTX, H_Q, H_C, QB0, N_ROWS, N_KB, N_TILES,
                                 SEG_BLOCKS, BLOCK, V_STAGES, HEAD_MAJOR)),
        ], [4, 1, 1], [232, 24, 24])
