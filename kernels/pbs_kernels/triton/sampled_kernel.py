"""@triton.jit kernel of the sampled-row block scoring (score="sampled"): per sampled query row, the
log of its softmax mass on every key block, in the layout that the row's query block reads.

Layout read by query block i (diagonal segment starting at key block ds(i)): key blocks j < ds(i) are
read in PERMUTED order (slot s holds original key perm[b, hp, s], gathered through perm, no permuted
copy); key blocks ds(i) <= j <= i hold ORIGINAL keys, masked causally on original positions (key <= row)
and at N (partial last block). Rows are ``reference.sample_rows``: m rows per block, strided or
geometric (``PBSConfig.sample_spacing``), the last row first, clipped to N-1.

One program = the sampled rows of QB consecutive query blocks x one query head (QB * m rows fill
one MMA tile, so each key tile read serves many rows); it streams key tiles of BLOCK_N = block_size
keys once: per tile and row it stores the tile's log-sum-exp ``lse_j = log sum_{keys in j} exp(s)``
(-inf for a tile the row cannot see) and keeps an online log-sum-exp over all tiles, stored per row at
the end. The group may span several segments: a tile inside the group's span is scored in both layouts
and each row keeps the one its query block reads. ``mass_j = exp(lse_j - lse)`` is taken by the
consumer: ``_sampled_top_p_kernel`` (the plan) or the launcher (the masses themselves).

Output layout: OUT fp32 (B * H_q, C, m, N_b) with C = r1 - r0 query blocks of the chunk [r0, r1);
LSE fp32 (B * H_q, C, m).

``_sampled_top_p_kernel`` turns them into plan rows: per query block, the block masses of its sampled
rows averaged, each row's ``row_top`` best off-diagonal blocks forced, then the top-p ranking of the
pooled selection (``select_kernel._keep_top_p``), without a sort and without the (C, m, N_b) masses
ever existing. Launchers and shapes: ``pbs_kernels.triton.sampled``.
"""

import triton
import triton.language as tl

from .select_kernel import _forced_blocks, _keep_top_p, _plan_tile, _store_plan


@triton.jit
def _dot(q, k, IEEE: tl.constexpr):
    """fp32 (R, N) q . k^T (fp32 inputs in IEEE precision, not TF32)."""
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    return s


@triton.jit
def _scores(q, k, scale, IEEE: tl.constexpr):
    """fp32 (R, N) scores q . k^T * scale."""
    return _dot(q, k, IEEE) * scale


@triton.jit
def _online_update(s, m_i, l_i):
    """s fp32 (R, N) scores, -inf where masked -> (this tile's log-sum-exp per row (-inf for a row
    that sees none of its keys), running max, running sum of exponentials)."""
    m_t = tl.max(s, 1)
    seen = m_t != float("-inf")
    m_t_safe = tl.where(seen, m_t, 0.0)
    l_t = tl.sum(tl.exp(s - m_t_safe[:, None]), 1)
    lse_t = tl.where(seen, m_t_safe + tl.log(tl.where(seen, l_t, 1.0)), float("-inf"))
    m_new = tl.maximum(m_i, m_t)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.exp(m_i - m_safe) + l_t * tl.exp(m_t - m_safe)
    return lse_t, m_new, l_i


@triton.jit
def _sampled_lse_kernel(
    Q, K, PERM, OUT, LSE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_pb, stride_ph,
    n_keys, n_b, r0, r1, H_q, G_KV, G_PERM, per_seg, scale,
    M: tl.constexpr, M_POW2: tl.constexpr, STEP: tl.constexpr, GEOMETRIC: tl.constexpr, QB: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_POW2: tl.constexpr, IEEE: tl.constexpr,
):
    # grid: (cdiv(r1 - r0, QB), B * H_q); each program covers query blocks g0 .. g0+QB-1, which may
    # span several segments: each row reads key tile j permuted while j is before its own diagonal
    # segment, and in original order (causal) from there on
    pid_g = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_q).to(tl.int64)  # 64-bit offsets: (B, H, N, D) tensors pass 2**31 elements at 512K
    h = (pid_bh % H_q).to(tl.int64)
    hk = h // G_KV
    hp = h // G_PERM
    # the last query blocks (the longest rows) start first: less tail at the end of the grid
    g0 = r0 + (tl.num_programs(0) - 1 - pid_g) * QB
    ds_first = (g0 // per_seg) * per_seg  # every row of the group reads tiles before it permuted
    hi = tl.minimum(g0 + QB, r1)  # key blocks past the group's last live query block are never causal
    ds_last = ((hi - 1) // per_seg) * per_seg  # tiles from here on are read in original order by every row

    # -- the group's sampled rows: r = local block * M_POW2 + t, t-th sampled row of that block --
    offs_r = tl.arange(0, BLOCK_R)
    qb = g0 + offs_r // M_POW2
    t = offs_r % M_POW2
    row_ok = (t < M) & (offs_r // M_POW2 < QB) & (qb < r1)
    if GEOMETRIC:  # the block's last row, then rows 2**k - 1 from its start
        offs = tl.where(t == 0, BLOCK_N - 1, (1 << tl.maximum(M - 1 - t, 0)) - 1)
    else:  # evenly strided, the last row first
        offs = (BLOCK_N - 1) - STEP * t
    pos = tl.minimum(qb * BLOCK_N + offs, n_keys - 1)  # in bounds for every lane
    ds_row = (qb // per_seg) * per_seg  # first key block of each row's own diagonal segment
    offs_d = tl.arange(0, D_POW2)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + pos[:, None].to(tl.int64) * stride_qn + offs_d[None, :],
                mask=d_ok[None, :], other=0.0)

    k_base = K + b * stride_kb + hk * stride_kh
    p_base = PERM + b * stride_pb + hp * stride_ph
    out_row = ((pid_bh.to(tl.int64) * (r1 - r0) + (qb - r0)) * M + t) * n_b  # OUT[bh, qb - r0, t, :]
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    # -- before every row's diagonal segment: permuted order (slot -> original key through perm);
    #    every slot is before every row of the group, so nothing is masked --
    for j in range(0, ds_first):
        s = _scores(q, _permuted_tile(k_base, p_base, j, offs_n, offs_d, d_ok, stride_kn, BLOCK_N), scale, IEEE)
        lse_t, m_i, l_i = _online_update(s, m_i, l_i)
        tl.store(OUT + out_row + j, lse_t, mask=row_ok)
    # -- the group's own segments: permuted for rows whose segment starts later, else original
    #    order, causal on original positions, keys >= N masked --
    for j in range(ds_first, hi):
        key = j * BLOCK_N + offs_n
        k = tl.load(k_base + key[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
                    mask=(key[:, None] < n_keys) & d_ok[None, :], other=0.0)
        s = _scores(q, k, scale, IEEE)
        s = tl.where((key[None, :] <= pos[:, None]) & (key[None, :] < n_keys), s, float("-inf"))
        if j < ds_last:  # some row of the group still reads this tile permuted
            s_perm = _scores(q, _permuted_tile(k_base, p_base, j, offs_n, offs_d, d_ok, stride_kn, BLOCK_N),
                             scale, IEEE)
            s = tl.where((j < ds_row)[:, None], s_perm, s)
        lse_t, m_i, l_i = _online_update(s, m_i, l_i)
        tl.store(OUT + out_row + j, lse_t, mask=row_ok)
    none = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for j in range(hi, n_b):  # key blocks after the group: not causal for any of its rows
        tl.store(OUT + out_row + j, none, mask=row_ok)
    # key 0 is visible to every row, so l_i >= 1 and m_i is finite
    tl.store(LSE + ((pid_bh.to(tl.int64) * (r1 - r0) + (qb - r0)) * M + t), m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _permuted_tile(k_base, p_base, j, offs_n, offs_d, d_ok, stride_kn, BLOCK_N: tl.constexpr):
    """Key tile j of the permuted layout: slot s holds original key perm[s] (gathered, no copy)."""
    src = tl.load(p_base + j * BLOCK_N + offs_n).to(tl.int64)
    return tl.load(k_base + src[:, None] * stride_kn + offs_d[None, :], mask=d_ok[None, :], other=0.0)


@triton.jit
def _sampled_top_p_kernel(
    OUT, LSE, SINK, NUM, IDX,
    r0, rows, n_blocks, H_q, Q_PER_PERM, blocks_per_seg, local_blocks, threshold,
    M: tl.constexpr, ROW_TOP: tl.constexpr, TOTAL: tl.constexpr, KEEP_ALL: tl.constexpr, USE_SINK: tl.constexpr,
    FORCED_COUNT: tl.constexpr, BLOCK_R: tl.constexpr, NB_POW2: tl.constexpr,
):
    # grid: (cdiv(rows, BLOCK_R), B * H_q); BLOCK_R query blocks i = r0 + r of one (batch, head), each a
    # full row of key blocks j. OUT / LSE as ``_sampled_lse_kernel`` wrote them for query blocks
    # [r0, r0 + rows); NUM (B * H_q, n_blocks) and IDX (B * H_q, n_blocks, n_blocks): the whole plan.
    pid_bh, b, h, r, row_ok, i, j, start, candidate = _plan_tile(r0, rows, H_q, blocks_per_seg, BLOCK_R, NB_POW2)
    causal = (j <= i) & row_ok[:, None]

    # -- block mass averaged over the sampled rows; each row also nominates its best candidates --
    row_base = (pid_bh.to(tl.int64) * rows + r[:, None]) * M  # (BLOCK_R, 1): OUT / LSE row of t = 0
    mass = tl.zeros([BLOCK_R, NB_POW2], tl.float32)
    row_forced = j < 0  # all False, (1, NB_POW2)
    for t in tl.static_range(M):
        lse = tl.load(LSE + row_base + t, mask=row_ok[:, None], other=0.0)
        m_t = tl.exp(tl.load(OUT + (row_base + t) * n_blocks + j, mask=causal, other=float("-inf")) - lse)
        mass += m_t
        best = tl.where(candidate, m_t, -1.0)
        for _ in tl.static_range(ROW_TOP):
            top = j == tl.argmax(best, 1)[:, None]
            row_forced = row_forced | (top & (tl.max(best, 1)[:, None] > 0.0))
            best = tl.where(top, -1.0, best)
    p = mass / M
    if TOTAL:  # tau is a share of all causal mass: the diagonal segment's counts as forced mass
        p = tl.where(causal, p, 0.0)
    else:  # tau is a share of the off-diagonal mass
        p = tl.where(candidate, p, 0.0)
        p = p / tl.maximum(tl.sum(p, 1)[:, None], 1e-30)

    forced = _forced_blocks(SINK, b, h, H_q, Q_PER_PERM, i, j, start, candidate, local_blocks, USE_SINK)
    forced = forced | (row_forced & candidate)
    if KEEP_ALL:
        keep = candidate | forced
    else:
        keep = _keep_top_p(p, forced, candidate, threshold, BLOCK_R, FORCED_COUNT)
    _store_plan(NUM, IDX, keep, j, pid_bh * n_blocks + r0 + r, row_ok, n_blocks)
