"""@triton.jit kernel of the sampled-row block scoring (score="sampled" and "sampled_max"): per sampled
query row, the log of its softmax mass on every key block, in the layout that the row's query block reads.

Layout read by query block i (diagonal segment starting at key block ds(i)): key blocks j < ds(i) are
read in PERMUTED order (slot s holds original key perm[b, hp, s]: gathered through perm, or with COPY
read from a permuted copy KP of K, with TMA through a tensor descriptor); key blocks ds(i) <= j <= i hold
ORIGINAL keys, masked causally on original positions (key <= row) and at N (partial last block). With FP8
(score "sampled_max_fp8") Q holds only the sampled rows, and they, K and KP are float8 e4m3, scaled per row
and per key head; RSCALE undoes the scales in the logits. Rows are ``plan_rules.sample_rows``: m rows per
block, strided or geometric (``PBSConfig.sample_spacing``), the last row first, clipped to N-1.

One program = the sampled rows of QB consecutive query blocks x HP query heads that share a key head and
a permutation (HP * QB * m rows fill one MMA tile, so each key tile read serves many rows); it streams
tiles of KB key blocks (KB * block_size keys) once: per key block j and row it stores the log-sum-exp
``lse_j = log sum_{keys in j} exp(s)`` (-inf for a block the row cannot see; blocks after the group's
last query block are left unwritten) and keeps an online
log-sum-exp over all blocks, stored per row at the end (exponentials in base 2, the results in
natural-log units). The group may span several segments: a tile inside the group's span is scored in
both layouts and each row keeps, block by block, the one its query block reads. With MAX (score
"sampled_max") the block's largest logit takes the place of ``lse_j`` and the row's log-sum-exp runs
over those maxima: one exponential per block, not per key. ``mass_j = exp(lse_j - lse)`` is taken by
the consumer: ``_sampled_top_p_kernel`` (the plan) or the launcher (the masses themselves). With
ROW_TOP > 0 each row also keeps its ROW_TOP best off-diagonal blocks on the way (a few comparisons per
tile), so that the plan needs no arg-max over whole rows. With RESUME the tiles before the group's first
diagonal segment were scored by ``sampled_gluon_kernel`` (block maxima on Hopper): the rows start from the
state it left in LSE (running maximum), LPART (running sum) and TOPV / TOPI.

Output layout: OUT fp32 (B * H_q, C, m, N_b) with C = r1 - r0 query blocks of the chunk [r0, r1);
LSE fp32 (B * H_q, C, m); TOPV fp32 / TOPI int32 (B * H_q, C, m, ROW_TOP): the best blocks' log-sum-exps
and indices (-1 where a row has fewer candidates).

``_sampled_top_p_kernel`` turns them into plan rows: per query block, the block masses of its sampled
rows averaged, each row's listed best blocks forced (when their mass is not 0), then the top-p ranking of the
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
def _tile_blocks(s, scale, BLOCK_R: tl.constexpr, KB: tl.constexpr, KEYS: tl.constexpr, MAX: tl.constexpr):
    """s fp32 (BLOCK_R, KB * KEYS) dot products, -inf where hidden, KEYS consecutive columns per key block;
    scale (a scalar, or (BLOCK_R, 1): one per row) turns them into log2 units -> (m_b, l_t), each
    (BLOCK_R, KB): a block's largest score (-inf where the row sees none of its keys) and, without MAX,
    sum(exp2(s - m_b)) over its keys (with MAX: 1). With MAX the scale is applied to the block maxima
    alone (a positive factor commutes with the maximum, also after rounding)."""
    if MAX:
        m_b = tl.max(tl.reshape(s, (BLOCK_R, KB, KEYS)), 2) * scale
        l_t = tl.full([BLOCK_R, KB], 1.0, tl.float32)
    else:
        s3 = tl.reshape(s * scale, (BLOCK_R, KB, KEYS))
        m_b = tl.max(s3, 2)
        l_t = tl.sum(tl.exp2(s3 - tl.where(m_b != float("-inf"), m_b, 0.0)[:, :, None]), 2)
    return m_b, l_t


@triton.jit
def _fold_blocks(m_b, l_t, m_i, l_i, MAX: tl.constexpr):
    """Key blocks (m_b, l_t) of ``_tile_blocks`` into the row's running max m_i and sum l_i (log2 units) ->
    (each block's log-sum-exp in natural-log units, -inf for a block the row cannot see (BLOCK_R, KB);
    m_i, l_i). With MAX (score "sampled_max") a block's largest score stands for its log-sum-exp: one
    exponential per block, not per key."""
    seen = m_b != float("-inf")
    m_new = tl.maximum(m_i, tl.max(m_b, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    if MAX:
        lse_b = m_b * 0.6931471805599453
    else:
        lse_b = tl.where(seen, (tl.where(seen, m_b, 0.0) + tl.log2(tl.where(seen, l_t, 1.0))) * 0.6931471805599453,
                         float("-inf"))
    l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(l_t * tl.exp2(m_b - m_safe[:, None]), 1)
    return lse_b, m_new, l_i


@triton.jit
def _block_lse(s, scale, m_i, l_i, BLOCK_R: tl.constexpr, KB: tl.constexpr, KEYS: tl.constexpr,
               MAX: tl.constexpr = False):
    """``_tile_blocks`` then ``_fold_blocks``: a tile's block log-sum-exps and the row's running max and sum."""
    m_b, l_t = _tile_blocks(s, scale, BLOCK_R, KB, KEYS, MAX)
    return _fold_blocks(m_b, l_t, m_i, l_i, MAX)


@triton.jit
def _sampled_lse_kernel(
    Q, K, KP, PERM, OUT, LSE, LPART, TOPV, TOPI, RSCALE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pb, stride_ph,
    n_keys, n_b, r0, r1, H_q, G_KV, G_PERM, per_seg, scale_log2,
    M: tl.constexpr, M_POW2: tl.constexpr, STEP: tl.constexpr, GEOMETRIC: tl.constexpr, QB: tl.constexpr,
    HP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, KB: tl.constexpr, MAX: tl.constexpr,
    COPY: tl.constexpr, TMA: tl.constexpr, FP8: tl.constexpr, ROW_TOP: tl.constexpr, RT_POW2: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_POW2: tl.constexpr, IEEE: tl.constexpr, RESUME: tl.constexpr = False,
):
    # grid: (cdiv(r1 - r0, QB), B * H_q / HP); each program covers query blocks g0 .. g0+QB-1 of HP query
    # heads that share their key head and permutation (HP divides G_PERM); the blocks may span several
    # segments: each row reads key block j permuted while j is before its own diagonal segment, and in
    # original order (causal) from there on. Tiles of KB key blocks of BLOCK_N keys; scale_log2 = scale *
    # log2(e)
    TILE: tl.constexpr = KB * BLOCK_N
    pid_g = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // (H_q // HP)).to(tl.int64)  # 64-bit offsets: (B, H, N, D) tensors pass 2**31 elements at 512K
    h0 = (pid_bh % (H_q // HP)).to(tl.int64) * HP
    hk = h0 // G_KV
    hp = h0 // G_PERM
    # the last query blocks (the longest rows) start first: less tail at the end of the grid
    g0 = r0 + (tl.num_programs(0) - 1 - pid_g) * QB
    ds_first = (g0 // per_seg) * per_seg  # every row of the group reads blocks before it permuted
    hi = tl.minimum(g0 + QB, r1)  # key blocks past the group's last live query block are never causal
    ds_last = ((hi - 1) // per_seg) * per_seg  # blocks from here on are read in original order by every row

    # -- the group's sampled rows: r = (head * QB + local block) * M_POW2 + t, t-th sampled row of that
    #    block --
    offs_r = tl.arange(0, BLOCK_R)
    head = offs_r // (QB * M_POW2)
    qb = g0 + (offs_r // M_POW2) % QB
    t = offs_r % M_POW2
    row_ok = (t < M) & (head < HP) & (qb < r1)
    bh = b * H_q + h0 + head  # (BLOCK_R,) int64: each row's (batch, query head)
    if GEOMETRIC:  # the block's last row, then rows 2**k - 1 from its start
        offs = tl.where(t == 0, BLOCK_N - 1, (1 << tl.maximum(M - 1 - t, 0)) - 1)
    else:  # evenly strided, the last row first
        offs = (BLOCK_N - 1) - STEP * t
    pos = tl.minimum(qb * BLOCK_N + offs, n_keys - 1)  # in bounds for every lane
    ds_row = (qb // per_seg) * per_seg  # first key block of each row's own diagonal segment
    offs_d = tl.arange(0, D_POW2)
    d_ok = offs_d < HEAD_DIM
    # padding rows (head >= HP) would point past the last query head: masked
    if FP8:  # Q holds the sampled rows alone (B, H_q, N_b * M, D)
        q_row = qb * M + t
    else:
        q_row = pos
    q = tl.load(Q + b * stride_qb + (h0 + head)[:, None] * stride_qh + q_row[:, None].to(tl.int64) * stride_qn
                + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if FP8:  # float8 rows and keys, a scale per row and key head: RSCALE (B * H_q, N_b * M) = 1 / (their product)
        scale_log2 = scale_log2 * tl.load(RSCALE + bh * (n_b * M) + q_row, mask=row_ok, other=1.0)[:, None]
    k_base = K + b * stride_kb + hk * stride_kh
    p_base = PERM + b * stride_pb + hp * stride_ph
    kp_base = KP + b * stride_pkb + hp * stride_pkh  # with COPY: K in permuted order, a copy per permutation head
    if TMA:  # the copy is contiguous (B * H_perm * N, HEAD_DIM): whole tiles through a tensor descriptor
        perm_rows = (tl.num_programs(1) * HP // H_q) * (H_q // G_PERM) * n_keys
        kp_desc = tl.make_tensor_descriptor(KP, shape=[perm_rows, HEAD_DIM], strides=[HEAD_DIM, 1],
                                            block_shape=[TILE, HEAD_DIM])
        kp_row0 = ((b * (H_q // G_PERM) + hp) * n_keys).to(tl.int32)
    row = (bh * (r1 - r0) + (qb - r0)) * M + t  # LSE[bh, qb - r0, t], and its row of OUT, TOPV, TOPI
    out_row = row * n_b
    offs_n = tl.arange(0, TILE)
    offs_kb = tl.arange(0, KB)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    top_v, top_i = _row_top_init(BLOCK_R, ROW_TOP, RT_POW2)
    first_tile = 0
    if RESUME:  # those tiles were scored by sampled_gluon_kernel: its state (LSE: running max, LPART: sum)
        m_i = tl.load(LSE + row, mask=row_ok, other=float("-inf"))
        l_i = tl.load(LPART + row, mask=row_ok, other=0.0)
        top_v, top_i = _row_top_load(TOPV, TOPI, top_v, top_i, row, row_ok, ROW_TOP, RT_POW2)
        first_tile = ds_first // KB
    # -- tiles wholly before every row's diagonal segment: permuted order (slot -> original key
    #    through perm); every slot is before every row of the group, so nothing is masked --
    for jt in range(first_tile, ds_first // KB):
        slot = jt * TILE + offs_n
        if TMA:  # every slot of these tiles is before N
            kp = kp_desc.load([kp_row0 + jt * TILE, 0])
        else:
            kp = _permuted_keys(k_base, kp_base, p_base, slot, offs_d, d_ok, n_keys, stride_kn, stride_pkn, COPY)
        s = _dot(q, kp, IEEE)
        lse_b, m_i, l_i = _block_lse(s, scale_log2, m_i, l_i, BLOCK_R, KB, BLOCK_N, MAX)
        blk = jt * KB + offs_kb
        tl.store(OUT + out_row[:, None] + blk[None, :], lse_b, mask=row_ok[:, None] & (blk < n_b)[None, :])
        top_v, top_i = _row_top_update(top_v, top_i, lse_b, jt * KB, ds_row, KB, ROW_TOP, RT_POW2)
    # -- the group's own segments: permuted for rows whose segment starts later, else original
    #    order, causal on original positions, keys >= N masked --
    for jt in range(ds_first // KB, tl.cdiv(hi, KB)):
        key = jt * TILE + offs_n
        k = tl.load(k_base + key[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
                    mask=(key[:, None] < n_keys) & d_ok[None, :], other=0.0)
        blk = jt * KB + offs_kb
        permuted = blk[None, :] < ds_row[:, None]  # (BLOCK_R, KB): the row reads this block permuted
        visible = (key[None, :] <= pos[:, None]) & (key[None, :] < n_keys)
        if jt * KB < ds_last:  # some row of the group still reads a block of this tile permuted: each layout
            # reduced to its blocks on its own, so that one score tile is live at a time
            visible &= (key // BLOCK_N)[None, :] >= ds_row[:, None]
        m_b, l_t = _tile_blocks(tl.where(visible, _dot(q, k, IEEE), float("-inf")), scale_log2, BLOCK_R, KB, BLOCK_N,
                                MAX)
        if jt * KB < ds_last:
            kp = _permuted_keys(k_base, kp_base, p_base, key, offs_d, d_ok, n_keys, stride_kn, stride_pkn, COPY)
            s_perm = tl.where((key // BLOCK_N)[None, :] < ds_row[:, None], _dot(q, kp, IEEE), float("-inf"))
            m_p, l_p = _tile_blocks(s_perm, scale_log2, BLOCK_R, KB, BLOCK_N, MAX)
            m_b, l_t = tl.where(permuted, m_p, m_b), tl.where(permuted, l_p, l_t)
        lse_b, m_i, l_i = _fold_blocks(m_b, l_t, m_i, l_i, MAX)
        tl.store(OUT + out_row[:, None] + blk[None, :], lse_b, mask=row_ok[:, None] & (blk < n_b)[None, :])
        top_v, top_i = _row_top_update(top_v, top_i, lse_b, jt * KB, ds_row, KB, ROW_TOP, RT_POW2)
    # key blocks after the group are not written: no row sees them, and their consumers read causal blocks only
    # key 0 is visible to every row, so l_i >= 1 and m_i is finite
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + row, lse, mask=row_ok)
    _row_top_store(TOPV, TOPI, top_v, top_i, row, row_ok, ROW_TOP, RT_POW2)


@triton.jit
def _row_top_init(BLOCK_R: tl.constexpr, ROW_TOP: tl.constexpr, RT_POW2: tl.constexpr):
    """Empty best-blocks lists of BLOCK_R rows: values (BLOCK_R, RT_POW2) -inf in the ROW_TOP live slots
    and +inf in the padding (never the minimum, so never replaced), block indices -1."""
    slot = tl.arange(0, RT_POW2)[None, :]
    top_v = tl.where(slot < ROW_TOP, float("-inf"), float("inf")) + tl.zeros([BLOCK_R, RT_POW2], tl.float32)
    return top_v, tl.full([BLOCK_R, RT_POW2], -1, tl.int32)


@triton.jit
def _row_top_update(top_v, top_i, lse_b, blk0, ds_row, KB: tl.constexpr, ROW_TOP: tl.constexpr,
                    RT_POW2: tl.constexpr):
    """Each row's ROW_TOP best off-diagonal key blocks so far (by block log-sum-exp, unsorted), after the
    tile of key blocks blk0 .. blk0 + KB - 1 (values lse_b (BLOCK_R, KB)); a block replaces a row's
    weakest entry only when strictly larger, so on exact ties the earlier block stays (as an argmax
    would pick). Blocks at or after the row's own segment start ds_row are not candidates."""
    if ROW_TOP > 0:
        offs_kb = tl.arange(0, KB)[None, :]
        slot = tl.arange(0, RT_POW2)[None, :]
        v = tl.where(blk0 + offs_kb < ds_row[:, None], lse_b, float("-inf"))
        for c in tl.static_range(KB):
            v_c = tl.max(tl.where(offs_kb == c, v, float("-inf")), 1)
            swap = (slot == tl.argmin(top_v, 1)[:, None]) & (v_c > tl.min(top_v, 1))[:, None]
            top_v = tl.where(swap, v_c[:, None], top_v)
            top_i = tl.where(swap, blk0 + c, top_i)
    return top_v, top_i


@triton.jit
def _row_top_slots(row, row_ok, ROW_TOP: tl.constexpr, RT_POW2: tl.constexpr):
    """Where rows' best-blocks lists live in TOPV / TOPI (``row`` (BLOCK_R,) the flat row index, ROW_TOP entries
    a row): offsets (BLOCK_R, RT_POW2) and the mask of live slots of live rows."""
    slot = tl.arange(0, RT_POW2)[None, :]
    return row.to(tl.int64)[:, None] * ROW_TOP + slot, row_ok[:, None] & (slot < ROW_TOP)


@triton.jit
def _row_top_load(TOPV, TOPI, top_v, top_i, row, row_ok, ROW_TOP: tl.constexpr, RT_POW2: tl.constexpr):
    """The rows' best-blocks lists as ``_row_top_store`` (or ``sampled_gluon_kernel``) left them, in the live
    slots of the empty lists top_v, top_i (``_row_top_init``)."""
    if ROW_TOP > 0:
        at, ok = _row_top_slots(row, row_ok, ROW_TOP, RT_POW2)
        top_v = tl.where(ok, tl.load(TOPV + at, mask=ok, other=0.0), top_v)
        top_i = tl.where(ok, tl.load(TOPI + at, mask=ok, other=0), top_i)
    return top_v, top_i


@triton.jit
def _row_top_store(TOPV, TOPI, top_v, top_i, row, row_ok, ROW_TOP: tl.constexpr, RT_POW2: tl.constexpr):
    """Store the rows' best-blocks lists at TOPV / TOPI (rows of ROW_TOP entries; ``row`` (BLOCK_R,) the
    flat row index)."""
    if ROW_TOP > 0:
        at, ok = _row_top_slots(row, row_ok, ROW_TOP, RT_POW2)
        tl.store(TOPV + at, top_v, mask=ok)
        tl.store(TOPI + at, top_i, mask=ok)


@triton.jit
def _permuted_keys(k_base, kp_base, p_base, slot, offs_d, d_ok, n_keys, stride_kn, stride_pkn, COPY: tl.constexpr):
    """Keys at ``slot`` of the permuted layout: slot s holds original key perm[s]; read from the permuted
    copy with COPY, else gathered from the original keys through perm. Zero past N."""
    ok = slot < n_keys
    if COPY:
        return tl.load(kp_base + slot[:, None].to(tl.int64) * stride_pkn + offs_d[None, :],
                       mask=ok[:, None] & d_ok[None, :], other=0.0)
    src = tl.load(p_base + slot, mask=ok, other=0).to(tl.int64)
    return tl.load(k_base + src[:, None] * stride_kn + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _sampled_top_p_kernel(
    OUT, LSE, TOPV, TOPI, SINK, NUM, IDX,
    r0, sub0, live, rows, n_blocks, H_q, Q_PER_PERM, blocks_per_seg, local_blocks, threshold,
    M: tl.constexpr, ROW_TOP: tl.constexpr, TOTAL: tl.constexpr, KEEP_ALL: tl.constexpr, USE_SINK: tl.constexpr,
    FORCED_COUNT: tl.constexpr, BLOCK_R: tl.constexpr, NB_POW2: tl.constexpr,
):
    # grid: (cdiv(live, BLOCK_R), B * H_q); BLOCK_R query blocks i = r0 + sub0 + r (r < live) of one (batch,
    # head), each a row of key blocks j < NB_POW2 (at least i + 1: every causal block; IDX keeps its
    # entries from NB_POW2 on, which are those blocks themselves). OUT / LSE / TOPV / TOPI as
    # ``_sampled_lse_kernel`` wrote them for the chunk of query blocks [r0, r0 + rows); NUM (B * H_q, n_blocks)
    # and IDX (B * H_q, n_blocks, n_blocks): the whole plan.
    pid_bh, b, h, r, row_ok, i, j, start, candidate = _plan_tile(r0 + sub0, live, H_q, blocks_per_seg, BLOCK_R,
                                                                 NB_POW2)
    causal = (j <= i) & row_ok[:, None]

    # -- block mass averaged over the sampled rows; each row also nominates its best candidates --
    row_base = (pid_bh.to(tl.int64) * rows + sub0 + r[:, None]) * M  # (BLOCK_R, 1): OUT / LSE row of t = 0
    mass = tl.zeros([BLOCK_R, NB_POW2], tl.float32)
    row_forced = j < 0  # all False, (1, NB_POW2)
    for t in tl.static_range(M):
        lse = tl.load(LSE + row_base + t, mask=row_ok[:, None], other=0.0)
        m_t = tl.exp(tl.load(OUT + (row_base + t) * n_blocks + j, mask=causal, other=float("-inf")) - lse)
        mass += m_t
        for s in tl.static_range(ROW_TOP):  # the row's best blocks, listed by the scoring kernel
            at = (row_base + t) * ROW_TOP + s
            top_i = tl.load(TOPI + at, mask=row_ok[:, None], other=-1)
            top_v = tl.load(TOPV + at, mask=row_ok[:, None], other=float("-inf"))
            row_forced = row_forced | ((j == top_i) & (tl.exp(top_v - lse) > 0.0))
    p = mass / M
    if TOTAL:  # tau is a share of all causal mass: the diagonal segment's counts as forced mass
        p = tl.where(causal, p, 0.0)
        tau = threshold
    else:  # tau is a share of the off-diagonal mass: the masses against tau times that mass, not divided by it
        p = tl.where(candidate, p, 0.0)
        tau = threshold * tl.maximum(tl.sum(p, 1), 1e-30)

    forced = _forced_blocks(SINK, b, h, H_q, Q_PER_PERM, i, j, start, candidate, local_blocks, USE_SINK)
    forced = forced | (row_forced & candidate)
    if KEEP_ALL:
        keep = candidate | forced
    else:
        keep = _keep_top_p(p, forced, candidate, tau, BLOCK_R, FORCED_COUNT)
    _store_plan(NUM, IDX, keep, j, pid_bh * n_blocks + r0 + sub0 + r, row_ok, n_blocks)
