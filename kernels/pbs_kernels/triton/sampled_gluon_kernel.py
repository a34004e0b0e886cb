"""Block maxima of the sampled rows over the key blocks of earlier segments, for Hopper (Gluon): the
first part of ``sampled_kernel._sampled_lse_kernel`` with block maxima (score "sampled_max" and
"sampled_max_fp8"), the part that holds nearly all of its dot products at long contexts.

The Triton kernel waits for each tile's dot products before it reduces them (Triton 3.6 on sm_90 emits
``warp_group_dot_wait {pendings = 0}``), so a warp group's tensor-core work and its reductions take
turns. Here the schedule is written out: a group issues the products of two key blocks, reduces the
first while the second runs, then reduces the second while the other group's products run.

One program = the same 128 sampled rows as the Triton program it precedes (HP query heads x QB query
blocks x M rows, ``sampled._block_lse``), warp-specialized:

- one warp loads the rows (TMA, once) and the key blocks, one 64-key block at a time from the permuted
  copy of K, into a ring of STAGES slots;
- two consumer warp groups, 64 rows each: per key block one asynchronous wgmma (64 rows x BLOCK keys),
  then the row maxima of its products (the block maximum, scaled), their store to OUT, the row's online
  log-sum-exp over block maxima (one exponential per block) and its ROW_TOP best blocks (at most 2, kept
  in order: on ties the earlier block stays, as in the Triton kernel). No product stays in flight from
  one two-block step to the next: ptxas serializes every wgmma of the kernel (warning C7514) when a
  pending accumulator passes through a loop's register moves.

The key blocks are 0 .. N_PERM - 1 of the permuted layout with N_PERM = (ds_first // KB) * KB: exactly
the tiles of the Triton kernel's first loop (ds_first: the group's first diagonal segment), so every
slot is before every row and before N, and nothing is masked. The state after them goes to LSE (the
running maximum, log2 units), LPART (the running sum) and TOPV / TOPI (natural-log units, -inf / -1 where
empty); the Triton kernel, launched with RESUME, starts from it.

Shapes as ``_sampled_lse_kernel``'s: q_desc over sampled rows (B * H_q * q_blocks * M, D), [QB * M, D]
tiles: the rows of query blocks q_block0 .. q_block0 + q_blocks - 1 of each head; k_desc over the
permuted copy (B * H_perm * N, D), [BLOCK, D] tiles; OUT fp32 (B * H_q, C, M, N_b);
LSE, LPART fp32 (B * H_q, C, M); TOPV fp32 / TOPI int32 (B * H_q, C, M, ROW_TOP); RSCALE fp32
(B * H_q, N_b * M) (FP8: 1 / (row scale x key scale)).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, warpgroup_mma, \
    warpgroup_mma_wait

from .attention_gluon_tiles import release, tma_load

_LN2 = gl.constexpr(0.6931471805599453)


@gluon.jit
def _group(n_b, r0, r1, H_q, HP: gl.constexpr, QB: gl.constexpr, KB: gl.constexpr, per_seg):
    """The program's batch, first query head and first query block (latest groups first, as the Triton
    kernel), and N_PERM, the key blocks it scores here."""
    b = gl.program_id(1) // (H_q // HP)
    h0 = (gl.program_id(1) % (H_q // HP)) * HP
    g0 = r0 + (gl.num_programs(0) - 1 - gl.program_id(0)) * QB
    ds_first = (g0 // per_seg) * per_seg
    return b, h0, g0, (ds_first // KB) * KB


@gluon.jit
def _load_partition(q_desc, k_desc, q_smem, k_smem, q_ready, k_ready, k_empty, n_b, r0, r1, H_q, G_PERM, n_keys,
                    per_seg, q_blocks, q_block0, HP: gl.constexpr, QB: gl.constexpr, M: gl.constexpr,
                    KB: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr):
    """One warp: the group's sampled rows (one TMA load per query head), then its key blocks, in order,
    through the ring."""
    b, h0, g0, n_perm = _group(n_b, r0, r1, H_q, HP, QB, KB, per_seg)
    mbarrier.expect(q_ready, HP * q_desc.block_type.nbytes)
    for h in gl.static_range(HP):
        row = ((b * H_q + h0 + h).to(gl.int64) * q_blocks + g0 - q_block0) * M
        tma_load(q_desc, [row.to(gl.int32), 0], q_ready, q_smem.slice(h * QB * M, QB * M))
    k_row0 = ((b * (H_q // G_PERM) + h0 // G_PERM) * n_keys).to(gl.int32)
    for t in range(n_perm):
        s = t % STAGES
        mbarrier.wait(k_empty.index(s), ((t // STAGES) & 1) ^ 1)
        mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
        tma_load(k_desc, [k_row0 + t * BLOCK, 0], k_ready.index(s), k_smem.index(s))


@gluon.jit
def _issue(q, k_smem, k_ready, t, zero, STAGES: gl.constexpr):
    """Block t's product q k^T on the tensor cores, asynchronously, once its keys have landed."""
    s = t % STAGES
    mbarrier.wait(k_ready.index(s), (t // STAGES) & 1)
    return warpgroup_mma(q, k_smem.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)


@gluon.jit
def _finish(acc, pending: gl.constexpr, t, k_empty, scale, m_i, l_i, v1, i1, v2, i2, OUT, out_row, row_ok,
            STAGES: gl.constexpr, ROW_TOP: gl.constexpr):
    """Waits for block t's product (``pending`` later products may stay in flight), frees its ring slot
    and folds it into the rows' state (``_fold``)."""
    acc = warpgroup_mma_wait(num_outstanding=pending, deps=(acc,))
    release(k_empty, t % STAGES)
    return _fold(acc, t, scale, m_i, l_i, v1, i1, v2, i2, OUT, out_row, row_ok, ROW_TOP)


@gluon.jit
def _fold(s, t, scale, m_i, l_i, v1, i1, v2, i2, OUT, out_row, row_ok, ROW_TOP: gl.constexpr):
    """Key block t's products s (64, BLOCK) into the rows' state: its maximum (scale: log2 units) stored
    to OUT in natural-log units, the running maximum m_i and sum l_i over block maxima, and the best
    blocks (v1, i1) >= (v2, i2) so far (a later block displaces an entry only when strictly larger)."""
    m_b = gl.max(s, 1) * scale
    m_new = gl.maximum(m_i, m_b)
    l_i = l_i * gl.exp2(m_i - m_new) + gl.exp2(m_b - m_new)
    lse_b = m_b * _LN2
    gl.store(OUT + out_row + t, lse_b, mask=row_ok)
    if ROW_TOP > 0:
        first = lse_b > v1
        second = lse_b > v2
        if ROW_TOP > 1:
            v2, i2 = gl.where(first, v1, gl.where(second, lse_b, v2)), gl.where(first, i1, gl.where(second, t, i2))
        v1, i1 = gl.where(first, lse_b, v1), gl.where(first, t, i1)
    return m_new, l_i, v1, i1, v2, i2


@gluon.jit
def _rows(n_b, r0, r1, H_q, HP: gl.constexpr, QB: gl.constexpr, M: gl.constexpr, HALF: gl.constexpr,
          per_seg, KB: gl.constexpr, layout: gl.constexpr):
    """This group's 64 rows: (flat row index into LSE etc., row_ok, row of RSCALE, key blocks to score)."""
    b, h0, g0, n_perm = _group(n_b, r0, r1, H_q, HP, QB, KB, per_seg)
    r = HALF * 64 + gl.arange(0, 64, layout)
    head = r // (QB * M)
    qb = g0 + (r // M) % QB
    t = r % M
    row_ok = (head < HP) & (qb < r1)
    bh = (b * H_q + h0 + head).to(gl.int64)
    row = (bh * (r1 - r0) + (qb - r0)) * M + t
    return row, row_ok, bh * (n_b * M) + qb * M + t, n_perm


@gluon.jit
def _score_partition(q_smem, k_smem, q_ready, k_ready, k_empty, OUT, LSE, LPART, TOPV, TOPI, RSCALE, scale_log2,
                     n_b, r0, r1, H_q, per_seg, HP: gl.constexpr, QB: gl.constexpr, M: gl.constexpr,
                     KB: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr, HALF: gl.constexpr,
                     FP8: gl.constexpr, ROW_TOP: gl.constexpr):
    """A consumer group: rows HALF * 64 .. HALF * 64 + 63 of the program against every key block."""
    INSTR_K: gl.constexpr = 256 // q_smem.dtype.primitive_bitwidth  # 16 for 16-bit inputs, 32 for float8
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK, INSTR_K])
    r_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    row, row_ok, q_row, n_perm = _rows(n_b, r0, r1, H_q, HP, QB, M, HALF, per_seg, KB, r_layout)
    scale = scale_log2 + gl.zeros([64], gl.float32, r_layout)
    if FP8:
        scale = scale * gl.load(RSCALE + q_row, mask=row_ok, other=1.0)
    out_row = row * n_b
    zero = gl.zeros([64, BLOCK], gl.float32, s_layout)
    m_i = gl.full([64], float("-inf"), gl.float32, r_layout)
    l_i = gl.zeros([64], gl.float32, r_layout)
    v1 = m_i
    v2 = m_i
    i1 = gl.full([64], -1, gl.int32, r_layout)
    i2 = i1
    mbarrier.wait(q_ready, 0)
    q = q_smem.slice(HALF * 64, 64)
    # two key blocks per step: block 2p + 1's product runs while block 2p is reduced (module docstring)
    for p in range(0, n_perm // 2):
        a0 = _issue(q, k_smem, k_ready, 2 * p, zero, STAGES)
        a1 = _issue(q, k_smem, k_ready, 2 * p + 1, zero, STAGES)
        m_i, l_i, v1, i1, v2, i2 = _finish(a0, 1, 2 * p, k_empty, scale, m_i, l_i, v1, i1, v2, i2, OUT, out_row,
                                           row_ok, STAGES, ROW_TOP)
        m_i, l_i, v1, i1, v2, i2 = _finish(a1, 0, 2 * p + 1, k_empty, scale, m_i, l_i, v1, i1, v2, i2, OUT, out_row,
                                           row_ok, STAGES, ROW_TOP)
    if n_perm % 2 == 1:
        a0 = _issue(q, k_smem, k_ready, n_perm - 1, zero, STAGES)
        m_i, l_i, v1, i1, v2, i2 = _finish(a0, 0, n_perm - 1, k_empty, scale, m_i, l_i, v1, i1, v2, i2, OUT,
                                           out_row, row_ok, STAGES, ROW_TOP)
    gl.store(LSE + row, m_i, mask=row_ok)
    gl.store(LPART + row, l_i, mask=row_ok)
    if ROW_TOP > 0:
        gl.store(TOPV + row * ROW_TOP, v1, mask=row_ok)
        gl.store(TOPI + row * ROW_TOP, i1, mask=row_ok)
    if ROW_TOP > 1:
        gl.store(TOPV + row * ROW_TOP + 1, v2, mask=row_ok)
        gl.store(TOPI + row * ROW_TOP + 1, i2, mask=row_ok)


@gluon.jit
def sampled_max_permuted_fwd(q_desc, k_desc, OUT, LSE, LPART, TOPV, TOPI, RSCALE, scale_log2,
                             n_keys, n_b, r0, r1, H_q, G_PERM, per_seg, q_blocks, q_block0,
                             HP: gl.constexpr,  # query heads per program (they share the permutation)
                             QB: gl.constexpr,  # query blocks per program; HP * QB * M = 128 rows
                             M: gl.constexpr,  # sampled rows per query block (a power of two)
                             KB: gl.constexpr,  # key blocks per tile of the Triton kernel that resumes
                             BLOCK: gl.constexpr,  # tokens per block
                             HEAD_DIM: gl.constexpr,
                             STAGES: gl.constexpr,  # key-block ring slots
                             FP8: gl.constexpr,  # float8 rows and keys, RSCALE undoes their scales
                             ROW_TOP: gl.constexpr):  # best off-diagonal blocks listed per row, 0-2
    # grid: (cdiv(r1 - r0, QB), B * H_q / HP), as _sampled_lse_kernel's
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [128, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, HEAD_DIM], k_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_ready, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(k_empty.index(s), count=2)  # one arrive per consumer group
    fence_async_shared()

    gl.warp_specialize([
        (_score_partition, (q_smem, k_smem, q_ready, k_ready, k_empty, OUT, LSE, LPART, TOPV, TOPI, RSCALE,
                            scale_log2, n_b, r0, r1, H_q, per_seg, HP, QB, M, KB, BLOCK, STAGES, 0, FP8,
                            ROW_TOP)),  # default partition: 4 warps
        (_score_partition, (q_smem, k_smem, q_ready, k_ready, k_empty, OUT, LSE, LPART, TOPV, TOPI, RSCALE,
                            scale_log2, n_b, r0, r1, H_q, per_seg, HP, QB, M, KB, BLOCK, STAGES, 1, FP8,
                            ROW_TOP)),
        (_load_partition, (q_desc, k_desc, q_smem, k_smem, q_ready, k_ready, k_empty, n_b, r0, r1, H_q, G_PERM,
                           n_keys, per_seg, q_blocks, q_block0, HP, QB, M, KB, BLOCK, STAGES)),
    ], [4, 1], [232, 24])
