"""@triton.jit kernels of block selection (launchers and shapes: ``pbs_kernels.triton.select``).

1. ``_pool_kernel``: mean of each block of rows, optionally gathering the rows through the
   permutation first (pooled permuted keys), and then optionally storing the gathered keys and the
   values gathered alike (the permuted K/V copies the attention kernel reads, in the same pass).
2. ``_block_scores_kernel``: pooled scores q_bar . k_bar^T * scale for a chunk of query blocks, one tile per program,
   only the key tiles left of the tile's last diagonal segment (the candidates).
3. ``_top_p_kernel``: per (batch, head) and tile of query blocks, per row: softmax over the candidate
   blocks, rank (forced blocks first unless forced_in_top_p is off, then descending probability,
   ties by block index), keep blocks while the mass before them is below the threshold, write the
   packed plan row. The kept prefix of the ranking is found by bisection over the probability bits
   (31 masked sums of a row), not by sorting: no sort network, the same result as a stable sort +
   cumsum (``_plan_tile``, ``_forced_blocks``, ``_keep_top_p`` and ``_store_plan``, shared with the
   sampled selection's top-p kernel).
"""

import triton
import triton.language as tl

# fp32 probabilities in [0, 1] have bit patterns in [0, 2**30) that order like the values: the
# top-p boundary is searched over those 30 bits.
_VALUE_BITS = tl.constexpr(30)
_BITS_END = tl.constexpr(1 << 30)


@triton.jit
def _pool_kernel(
    X, PERM, OUT, X_COPY, Y, Y_COPY,
    stride_xb, stride_xh, stride_xn,
    stride_yb, stride_yh, stride_yn,
    stride_pb, stride_ph,
    n, n_blocks, H_out, OUT_PER_X,
    GATHER: tl.constexpr, COPY: tl.constexpr, NBLK: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
    D_POW2: tl.constexpr,
):
    # grid: (cdiv(n_blocks, NBLK), B * H_out); NBLK blocks of BLOCK rows per program;
    # output head h reads input head h // OUT_PER_X. With COPY (GATHER, HEAD_DIM a power of two), the
    # gathered rows are also stored in permuted order into X_COPY, and the rows of Y (values) gathered
    # with the same indices into Y_COPY: both (B, H_out, n, HEAD_DIM) contiguous, what the attention
    # kernel reads, made by this pass over X instead of a second one.
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_out).to(tl.int64)  # 64-bit offsets: (B, H, N, D) tensors pass 2**31 elements at 512K
    h = (pid_bh % H_out).to(tl.int64)
    hx = h // OUT_PER_X

    slots = pid * NBLK * BLOCK + tl.arange(0, NBLK * BLOCK)
    offs_d = tl.arange(0, D_POW2)
    ok = slots < n
    if GATHER:
        src = tl.load(PERM + b * stride_pb + h * stride_ph + slots, mask=ok, other=0)
    else:
        src = slots
    x = tl.load(X + b * stride_xb + hx * stride_xh + src[:, None].to(tl.int64) * stride_xn + offs_d[None, :],
                mask=ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if COPY:
        dst = (pid_bh.to(tl.int64) * n + slots[:, None]) * HEAD_DIM + offs_d[None, :]
        tl.store(X_COPY + dst, x, mask=ok[:, None])
        y = tl.load(Y + b * stride_yb + hx * stride_yh + src[:, None].to(tl.int64) * stride_yn + offs_d[None, :],
                    mask=ok[:, None])
        tl.store(Y_COPY + dst, y, mask=ok[:, None])
    sums = tl.sum(tl.reshape(x.to(tl.float32), [NBLK, BLOCK, D_POW2]), 1)  # (NBLK, D_POW2)
    blk = pid * NBLK + tl.arange(0, NBLK)
    count = tl.minimum(BLOCK, n - blk * BLOCK).to(tl.float32)  # the partial last block: its real rows
    tl.store(OUT + (pid_bh.to(tl.int64) * n_blocks + blk[:, None]) * HEAD_DIM + offs_d[None, :], sums / count[:, None],
             mask=(blk[:, None] < n_blocks) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _block_scores_kernel(
    QBAR, KBAR, S,
    row0, rows, n_blocks, H_q, H_k, Q_PER_K, blocks_per_seg, scale,
    HEAD_DIM: tl.constexpr, D_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (cdiv(rows, BLOCK_M), cdiv(n_blocks, BLOCK_N), B * H_q): one BLOCK_M x BLOCK_N tile of S, which
    # is (B * H_q, rows, n_blocks) for query blocks row0 ..; one tile per program spreads the work over
    # the whole GPU (a loop over the key tiles left the long rows' programs running alone)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2)
    # candidates of query block i are the key blocks before its segment: j < (i // per_seg) * per_seg
    last = tl.minimum(row0 + (pid_m + 1) * BLOCK_M, tl.minimum(row0 + rows, n_blocks)) - 1
    hi = (last // blocks_per_seg) * blocks_per_seg
    start_n = pid_n * BLOCK_N
    if start_n < hi:  # key tiles right of every row's candidates: nothing to score
        b = pid_bh // H_q
        h = pid_bh % H_q
        hk = h // Q_PER_K
        offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row of the chunk
        offs_d = tl.arange(0, D_POW2)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        row_ok = (offs_r < rows) & (row0 + offs_r < n_blocks)
        qbar = tl.load(QBAR + (pid_bh * n_blocks + row0 + offs_r[:, None]) * HEAD_DIM + offs_d[None, :],
                       mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        kbar = tl.load(KBAR + ((b * H_k + hk) * n_blocks + offs_n[:, None]) * HEAD_DIM + offs_d[None, :],
                       mask=(offs_n[:, None] < hi) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        s = tl.dot(qbar, tl.trans(kbar), input_precision="ieee") * scale
        tl.store(S + (pid_bh * rows + offs_r[:, None]).to(tl.int64) * n_blocks + offs_n[None, :], s,
                 mask=row_ok[:, None] & (offs_n[None, :] < hi))


@triton.jit
def _top_p_kernel(
    S, SINK, NUM, IDX,
    row0, rows, live, n_blocks, out_row0, out_rows, H_q, Q_PER_PERM, blocks_per_seg, local_blocks, threshold,
    KEEP_ALL: tl.constexpr, USE_SINK: tl.constexpr, FORCED_COUNT: tl.constexpr, BLOCK_R: tl.constexpr,
    NB_POW2: tl.constexpr,
):
    # grid: (cdiv(live, BLOCK_R), B * H_q); BLOCK_R query blocks i = row0 + r of one (batch, head),
    # each row of the tile a full row of key blocks j. NUM / IDX hold out_rows query blocks per
    # (batch, head), from query block out_row0 on (the whole plan: 0 and n_blocks).
    pid_bh, b, h, r, row_ok, i, j, start, candidate = _plan_tile(row0, live, H_q, blocks_per_seg, BLOCK_R, NB_POW2)

    # -- softmax over the candidate (off-diagonal causal) blocks --
    s = tl.load(S + (pid_bh * rows + r[:, None]).to(tl.int64) * n_blocks + j, mask=candidate, other=float("-inf"))
    m = tl.max(s, 1)[:, None]
    e = tl.where(candidate, tl.exp(s - tl.where(m == float("-inf"), 0.0, m)), 0.0)
    total = tl.sum(e, 1)[:, None]
    p = tl.where(candidate, e / tl.where(total == 0.0, 1.0, total), 0.0)

    forced = _forced_blocks(SINK, b, h, H_q, Q_PER_PERM, i, j, start, candidate, local_blocks, USE_SINK)
    if KEEP_ALL:
        keep = candidate | forced
    else:
        keep = _keep_top_p(p, forced, candidate, threshold, BLOCK_R, FORCED_COUNT)
    _store_plan(NUM, IDX, keep, j, pid_bh * out_rows + row0 - out_row0 + r, row_ok, n_blocks)


@triton.jit
def _plan_tile(row0, live, H_q, blocks_per_seg, BLOCK_R: tl.constexpr, NB_POW2: tl.constexpr):
    """This program's plan rows, for a grid (cdiv(live, BLOCK_R), B * H_q): (pid_bh, b, h, r (BLOCK_R,)
    rows of the tile, row_ok, i (BLOCK_R, 1) query blocks row0 + r, j (1, NB_POW2) key blocks, start
    (BLOCK_R, 1) first block of i's own (diagonal) segment, candidate: the off-diagonal causal blocks)."""
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < live
    i = (row0 + r)[:, None]
    j = tl.arange(0, NB_POW2)[None, :]
    start = (i // blocks_per_seg) * blocks_per_seg
    candidate = (j < start) & row_ok[:, None]
    return pid_bh, pid_bh // H_q, pid_bh % H_q, r, row_ok, i, j, start, candidate


@triton.jit
def _forced_blocks(SINK, b, h, H_q, Q_PER_PERM, i, j, start, candidate, local_blocks, USE_SINK: tl.constexpr):
    """Bool (BLOCK_R, NB): the blocks every plan row keeps: the diagonal segment up to i, the
    ``local_blocks`` before it and, with USE_SINK, the block holding original token 0 (SINK
    (B, H_perm) int32, read for query head h of batch b)."""
    forced = (j >= start) & (j <= i)
    forced = forced | (candidate & (j >= start - local_blocks))
    if USE_SINK:
        sink = tl.load(SINK + b * (H_q // Q_PER_PERM) + h // Q_PER_PERM)
        forced = forced | (candidate & (j == sink))
    return forced


@triton.jit
def _keep_top_p(p, forced, candidate, threshold, BLOCK_R: tl.constexpr, FORCED_COUNT: tl.constexpr):
    """Bool (BLOCK_R, NB): the kept blocks of top-p over rows of block probabilities ``p`` (fp32 in
    [0, 1], 0 outside the scope), the ``forced`` blocks always among them. With FORCED_COUNT the
    forced blocks rank first and their mass counts, then the other candidates by descending
    probability; without it every candidate ranks by probability and the forced blocks are added
    after. Ties by ascending block index; a ranked block is kept while the mass before it is below
    ``threshold`` (a scalar, or (BLOCK_R,): one per row).

    With G(t) = F + sum(p_k : bits(p_k) > t) (F = mass of the forced blocks; fp32 bits of p >= 0 order
    like the values), the boundary value is the smallest t with G(t) < threshold, found by bisection
    per row (no sort): blocks above it are kept, blocks below it are not, and blocks exactly at it
    (ties) are kept in index order while G(t) + (earlier ties) * p stays below the threshold."""
    bits = p.to(tl.int32, bitcast=True)
    threshold = threshold + tl.zeros([BLOCK_R], tl.float32)  # one per row: a scalar, or rows' own thresholds
    if FORCED_COUNT:
        free = candidate & ~forced
        mass_forced = tl.sum(tl.where(forced, p, 0.0), 1)
    else:
        free = candidate
        mass_forced = tl.zeros([BLOCK_R], tl.float32)
    # the loop's operands, masked once: other blocks get bits -1, below every probe (mid >= -1)
    p_free = tl.where(free, p, 0.0)
    bits_free = tl.where(free, bits, -1)
    lo = tl.full([BLOCK_R], -1, tl.int32)  # G(lo) >= threshold (or never evaluated)
    hi = tl.full([BLOCK_R], _BITS_END, tl.int32)  # G(hi) = F: below the threshold, or keep none
    for _ in range(_VALUE_BITS + 1):
        mid = (lo + hi) // 2
        g_mid = mass_forced + tl.sum(tl.where(bits_free > mid[:, None], p_free, 0.0), 1)
        ok = g_mid < threshold
        hi = tl.where(ok, mid, hi)
        lo = tl.where(ok, lo, mid)
    above = bits_free > hi[:, None]
    g_hi = mass_forced + tl.sum(tl.where(above, p_free, 0.0), 1)
    tie = free & (bits == hi[:, None])
    tie_i = tie.to(tl.int32)
    if tl.max(tl.sum(tie_i, 1), 0) > 1:  # several blocks at the boundary value: they go in index order
        ties_before = (tl.cumsum(tie_i, 1) - tie_i).to(tl.float32)
        keep_tie = tie & (g_hi[:, None] + ties_before * p < threshold[:, None])
    else:  # the usual case, the boundary block alone: no scan over the row
        keep_tie = tie & (g_hi < threshold)[:, None]
    return above | keep_tie | forced


@triton.jit
def _store_plan(NUM, IDX, keep, j, plan_row, row_ok, n_blocks):
    """Pack rows of the plan: kept blocks ascending, then the others ascending (padding, never read).
    keep bool (BLOCK_R, NB), j (1, NB) block indices, plan_row (BLOCK_R,) rows of NUM / IDX."""
    keep_i = keep.to(tl.int32)
    kept_upto = tl.cumsum(keep_i, 1)  # kept blocks <= j
    n_kept = tl.sum(keep_i, 1)
    pos = tl.where(keep, kept_upto - 1, n_kept[:, None] + j - kept_upto)
    tl.store(IDX + plan_row[:, None].to(tl.int64) * n_blocks + pos, j.to(tl.int32) + 0 * pos,
             mask=row_ok[:, None] & (j < n_blocks))
    tl.store(NUM + plan_row, n_kept, mask=row_ok)
