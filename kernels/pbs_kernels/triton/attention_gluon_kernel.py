"""Persistent, warp-specialized block-sparse causal attention forward for Hopper (Gluon): the entry
point and the loaders.

The computation of ``attention_kernel.pbs_attn_fwd`` (q, the compressed plan, K/V: permuted copies
for the blocks of earlier segments, the original K/V for the query's own segment), written in Triton's
Gluon dialect, so that the schedule is written out here instead of left to the compiler:

- **persistent**: one program per SM walks tiles (query block, batch-head) in the order of
  ``attention_gluon_tiles.tile_coords``, latest query blocks (the longest rows) first. Tiles come
  either from an atomic counter (``DYNAMIC``, the launcher's default: a program takes the next tile
  when it is ready for one) or by a fixed stride (pid, pid + programs, ...);
- **warp-specialized**, four partitions: two consumer warp groups (``attention_gluon_attend``: 64
  query rows of each tile each, tensor-core products and online softmax), one warp loading q (two
  buffers) and K (a ring of ``K_STAGES`` slots), one warp loading V (``V_STAGES`` slots), all
  through TMA. With 64-token blocks a tile has 64 rows and one consumer group (three partitions); the
  launcher then runs two programs per SM (half the registers and shared memory each);
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

Shapes: q_desc over Q viewed (B * H_q * N, D); k_desc, v_desc over the permuted copies viewed
(B * H_c * N, D); ko_desc, vo_desc over the original K, V viewed (B * H_kv * N, D); all with
[BLOCK, D] blocks. O (B, H_q, N, D) contiguous. With TOKEN_MAJOR, Q, the original K, V and O are
(B, N, H, D)-contiguous instead (transformers' layout, read and written in place), Q viewed
(B * N, H_q * D) and K, V (B * N, H_kv * D) (``tiles.head_origin``). KV_NUM (B, H_q, R); KV_IDX
(B, H_q, R, N_kb) for plan rows QB0 .. QB0 + R - 1; COUNTER one zeroed int32 (read only with
DYNAMIC). N_TILES = R * B * H_q.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier

from .attention_gluon_attend import attend_partition
from .attention_gluon_tiles import head_origin, received_tile, send_tile, tile_coords, tma_load


@gluon.jit
def _plan_row(tile, N_CTX, H_Q, H_C, H_KV, QB0, N_ROWS, N_TILES, SEG_BLOCKS: gl.constexpr,
              HEAD_MAJOR: gl.constexpr, HEAD_DIM: gl.constexpr, TOKEN_MAJOR: gl.constexpr):
    """For a tile: its query block and batch-head, its plan row, the first block of the query's own
    segment, the first row of its head in the permuted copy, and the row and column of its head's
    token 0 in the original K/V (``head_origin``)."""
    qb, bh, row = tile_coords(tile, H_Q, H_C, QB0, N_ROWS, N_TILES, HEAD_MAJOR)
    diag_start = (qb // SEG_BLOCKS) * SEG_BLOCKS
    c0 = ((bh // H_Q) * H_C + (bh % H_Q) // (H_Q // H_C)) * N_CTX
    o0, o_col = head_origin((bh // H_Q) * H_KV + (bh % H_Q) // (H_Q // H_KV), H_KV, N_CTX, HEAD_DIM, TOKEN_MAJOR)
    return qb, bh, row, diag_start, c0, o0, o_col


@gluon.jit
def _load_row_blocks(desc, orig_desc, smem, ready, empty, c, KV_IDX, row, num, N_KB, diag_start, c0, o0, o_col,
                     BLOCK: gl.constexpr, STAGES: gl.constexpr):
    """TMA-load the ``num`` kept blocks of a plan row into the ring ``smem`` (slot free: ``empty``;
    landed: ``ready``), from ring position ``c``: blocks of earlier segments from the permuted copy
    (``desc``, head rows from c0), blocks of the query's own segment in original order (``orig_desc``,
    head rows from o0, columns from o_col). Returns the next ring position."""
    for t in range(num):
        j = gl.load(KV_IDX + row * N_KB + t)
        s = c % STAGES
        mbarrier.wait(empty.index(s), ((c // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(s), desc.block_type.nbytes)
        if j >= diag_start:
            tma_load(orig_desc, [o0 + j * BLOCK, o_col], ready.index(s), smem.index(s))
        else:
            tma_load(desc, [c0 + j * BLOCK, 0], ready.index(s), smem.index(s))
        c += 1
    return c


@gluon.jit
def _load_q_k_partition(q_desc, k_desc, ko_desc, q_smem, k_smem, tile_smem, q_ready, q_empty, k_ready, k_empty,
                        KV_NUM, KV_IDX, COUNTER, N_CTX, H_Q, H_C, H_KV, QB0, N_ROWS, N_KB, N_TILES,
                        SEG_BLOCKS: gl.constexpr, BLOCK: gl.constexpr, K_STAGES: gl.constexpr,
                        DYNAMIC: gl.constexpr, HEAD_MAJOR: gl.constexpr, HEAD_DIM: gl.constexpr,
                        TOKEN_MAJOR: gl.constexpr):
    """One warp: picks the tiles (a stride, or an atomic counter), reads each tile's plan row length
    and diagonal position once and hands them with the tile index to the other partitions
    (``tile_smem``, beside the q buffer), loads the tile's q and the K tiles of its kept blocks."""
    meta_layout: gl.constexpr = gl.BlockedLayout([4], [32], [1], [0])
    c = 0  # K tiles loaded by this program (ring position)
    i = 0  # tiles started by this program (q buffer)
    tile = gl.program_id(0)
    if DYNAMIC:
        tile = gl.atomic_add(COUNTER, 1)
    while tile < N_TILES:
        qb, bh, row, diag_start, c0, o0, o_col = _plan_row(tile, N_CTX, H_Q, H_C, H_KV, QB0, N_ROWS, N_TILES,
                                                           SEG_BLOCKS, HEAD_MAJOR, HEAD_DIM, TOKEN_MAJOR)
        num = gl.load(KV_NUM + row)
        # a row's entries ascend, so the diagonal block, when kept, is its last one
        diag_t = gl.where(gl.load(KV_IDX + row * N_KB + gl.maximum(num - 1, 0)) == qb, num - 1, -1)
        qbuf = i % 2
        mbarrier.wait(q_empty.index(qbuf), ((i // 2) & 1) ^ 1)
        send_tile(tile_smem, qbuf, tile, num, diag_t, meta_layout)
        mbarrier.expect(q_ready.index(qbuf), q_desc.block_type.nbytes)
        q_row, q_col = head_origin(bh, H_Q, N_CTX, HEAD_DIM, TOKEN_MAJOR)
        tma_load(q_desc, [q_row + qb * BLOCK, q_col], q_ready.index(qbuf), q_smem.index(qbuf))
        c = _load_row_blocks(k_desc, ko_desc, k_smem, k_ready, k_empty, c, KV_IDX, row, num, N_KB, diag_start, c0, o0,
                             o_col, BLOCK, K_STAGES)
        i += 1
        if DYNAMIC:
            tile = gl.atomic_add(COUNTER, 1)
        else:
            tile += gl.num_programs(0)
    # no tile left: hand the other partitions N_TILES, with no q
    qbuf = i % 2
    mbarrier.wait(q_empty.index(qbuf), ((i // 2) & 1) ^ 1)
    send_tile(tile_smem, qbuf, N_TILES, 0, -1, meta_layout)
    mbarrier.arrive(q_ready.index(qbuf), count=1)


@gluon.jit
def _load_v_partition(v_desc, vo_desc, v_smem, tile_smem, q_ready, v_ready, v_empty,
                      KV_IDX, N_CTX, H_Q, H_C, H_KV, QB0, N_ROWS, N_KB, N_TILES,
                      SEG_BLOCKS: gl.constexpr, BLOCK: gl.constexpr, V_STAGES: gl.constexpr,
                      HEAD_MAJOR: gl.constexpr, HEAD_DIM: gl.constexpr, TOKEN_MAJOR: gl.constexpr):
    """One warp: loads the V tiles of each tile's kept blocks, in its own ring, so that K loads run
    ahead of V loads (a V slot frees later than a K slot: after the P V product)."""
    meta_layout: gl.constexpr = gl.BlockedLayout([4], [32], [1], [0])
    c = 0
    i = 0
    tile, num, diag_t = received_tile(tile_smem, q_ready, 0, meta_layout)
    while tile < N_TILES:
        qb, bh, row, diag_start, c0, o0, o_col = _plan_row(tile, N_CTX, H_Q, H_C, H_KV, QB0, N_ROWS, N_TILES,
                                                           SEG_BLOCKS, HEAD_MAJOR, HEAD_DIM, TOKEN_MAJOR)
        c = _load_row_blocks(v_desc, vo_desc, v_smem, v_ready, v_empty, c, KV_IDX, row, num, N_KB, diag_start, c0, o0,
                             o_col, BLOCK, V_STAGES)
        i += 1
        tile, num, diag_t = received_tile(tile_smem, q_ready, i, meta_layout)


@gluon.jit
def pbs_attn_fwd_persistent(q_desc, k_desc, v_desc, ko_desc, vo_desc, O, KV_NUM, KV_IDX, COUNTER,
                            qk_scale, N_CTX, H_Q, H_C, H_KV, QB0, N_ROWS, N_KB, N_TILES,
                            SEG_BLOCKS: gl.constexpr,  # plan blocks per segment
                            BLOCK: gl.constexpr,  # tokens per plan block = query rows and keys per tile
                            HEAD_DIM: gl.constexpr,
                            K_STAGES: gl.constexpr, V_STAGES: gl.constexpr,  # K and V ring slots
                            DYNAMIC: gl.constexpr,  # tiles from an atomic counter (COUNTER, zeroed), else a stride
                            HEAD_MAJOR: gl.constexpr,  # tile order: copy head slowest (tiles.tile_coords)
                            TOKEN_MAJOR: gl.constexpr):  # q, k, v, O laid out (B, N, H, D), else (B, H, N, D)
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
    GROUPS: gl.constexpr = BLOCK // 64  # consumer warp groups of 64 query rows per tile
    for b in gl.static_range(2):
        mbarrier.init(q_ready.index(b), count=1)
        mbarrier.init(q_empty.index(b), count=GROUPS)  # one arrive per consumer warp group
    for s in gl.static_range(K_STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(k_empty.index(s), count=GROUPS)
    for s in gl.static_range(V_STAGES):
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(v_empty.index(s), count=GROUPS)
    fence_async_shared()

    # the partition lists are spelled out in each branch: Gluon takes (function, arguments) pairs written in
    # place, not held in variables
    if GROUPS == 2:  # the default partition (4 warps) and a second consumer group take a tile's halves
        gl.warp_specialize([
            (attend_partition, (q_smem, k_smem, v_smem, tile_smem, q_ready, q_empty, k_ready, v_ready, k_empty,
                                v_empty, O, qk_scale, N_CTX, H_Q, H_C, QB0, N_ROWS, N_TILES, 0, BLOCK, HEAD_DIM,
                                K_STAGES, V_STAGES, HEAD_MAJOR, TOKEN_MAJOR)),
            (attend_partition, (q_smem, k_smem, v_smem, tile_smem, q_ready, q_empty, k_ready, v_ready, k_empty,
                                v_empty, O, qk_scale, N_CTX, H_Q, H_C, QB0, N_ROWS, N_TILES, 1, BLOCK, HEAD_DIM,
                                K_STAGES, V_STAGES, HEAD_MAJOR, TOKEN_MAJOR)),
            (_load_q_k_partition, (q_desc, k_desc, ko_desc, q_smem, k_smem, tile_smem, q_ready, q_empty, k_ready,
                                   k_empty, KV_NUM, KV_IDX, COUNTER, N_CTX, H_Q, H_C, H_KV, QB0, N_ROWS, N_KB, N_TILES,
                                   SEG_BLOCKS, BLOCK, K_STAGES, DYNAMIC, HEAD_MAJOR, HEAD_DIM, TOKEN_MAJOR)),
            (_load_v_partition, (v_desc, vo_desc, v_smem, tile_smem, q_ready, v_ready, v_empty, KV_IDX, N_CTX, H_Q,
                                 H_C, H_KV, QB0, N_ROWS, N_KB, N_TILES, SEG_BLOCKS, BLOCK, V_STAGES, HEAD_MAJOR,
                                 HEAD_DIM, TOKEN_MAJOR)),
        ], [4, 1, 1], [232, 24, 24])
    else:  # 64-token blocks: the default partition takes the whole tile
        gl.warp_specialize([
            (attend_partition, (q_smem, k_smem, v_smem, tile_smem, q_ready, q_empty, k_ready, v_ready, k_empty,
                                v_empty, O, qk_scale, N_CTX, H_Q, H_C, QB0, N_ROWS, N_TILES, 0, BLOCK, HEAD_DIM,
                                K_STAGES, V_STAGES, HEAD_MAJOR, TOKEN_MAJOR)),
            (_load_q_k_partition, (q_desc, k_desc, ko_desc, q_smem, k_smem, tile_smem, q_ready, q_empty, k_ready,
                                   k_empty, KV_NUM, KV_IDX, COUNTER, N_CTX, H_Q, H_C, H_KV, QB0, N_ROWS, N_KB, N_TILES,
                                   SEG_BLOCKS, BLOCK, K_STAGES, DYNAMIC, HEAD_MAJOR, HEAD_DIM, TOKEN_MAJOR)),
            (_load_v_partition, (v_desc, vo_desc, v_smem, tile_smem, q_ready, v_ready, v_empty, KV_IDX, N_CTX, H_Q,
                                 H_C, H_KV, QB0, N_ROWS, N_KB, N_TILES, SEG_BLOCKS, BLOCK, V_STAGES, HEAD_MAJOR,
                                 HEAD_DIM, TOKEN_MAJOR)),
        ], [1, 1], [24, 24])
