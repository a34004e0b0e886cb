"""@triton.jit kernel of the antidiagonal block scoring (score="antidiagonal"): per query stripe, the log
of its softmax mass on every key block, in the layout that the stripe's query block reads.

Stripe r of query block i holds queries i*B + r*s .. i*B + r*s + s - 1 (s = B / m, m = sample_rows);
key stripe c holds slots c*s .. c*s + s - 1 of the layout block i reads (permuted before its diagonal
segment, original order inside it, zero past N). Their logit is the mean of the antidiagonal,
sum_t q[i*B + r*s + s-1-t] . k[c*s + t] * scale / s, and a key stripe is visible when its first slot is
at or before the query stripe's first row (clipped to N-1). Twin: ``reference.antidiagonal_block_mass``.

One program = the stripes of QB consecutive query blocks x one query head. It streams tiles of
BLOCK_N key stripes (KB = BLOCK_N / m key blocks); a tile's logits are a sum of s dots of (rows x D) by
(D x stripes), one per antidiagonal offset t, so the kernel is a GEMM with a K dimension of s*D and one
exponential per (stripe, stripe) pair: s times fewer than sampled rows of the same count. Per tile it
stores each key block's log-sum-exp and keeps an online log-sum-exp per stripe; the outputs have the
layout of ``sampled_kernel._sampled_lse_kernel`` (OUT (B*H_q, C, m, N_b), LSE (B*H_q, C, m), and each
stripe's ROW_TOP best off-diagonal blocks TOPV / TOPI), so ``_sampled_top_p_kernel`` plans from them
unchanged.
"""

import triton
import triton.language as tl

from .sampled_kernel import _block_lse, _dot, _row_top_init, _row_top_store, _row_top_update


@triton.jit
def _stripe_keys(k_base, p_base, c, t, offs_d, d_ok, n_keys, stride_kn, S: tl.constexpr, PERMUTED: tl.constexpr):
    """(BLOCK_N, D_POW2) keys at slots c*S + t of key stripes c: through the permutation or in place,
    zero past N."""
    slot = c * S + t
    ok = slot < n_keys
    if PERMUTED:
        src = tl.load(p_base + slot, mask=ok, other=0).to(tl.int64)
    else:
        src = slot.to(tl.int64)
    return tl.load(k_base + src[:, None] * stride_kn + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _stripe_logits(q_base, k_base, p_base, qrow, c, offs_d, d_ok, n_keys, stride_qn, stride_kn,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, S: tl.constexpr, PERMUTED: tl.constexpr,
                   IEEE: tl.constexpr):
    """fp32 (BLOCK_R, BLOCK_N) antidiagonal sums sum_t q[qrow + S-1-t] . k[c*S + t] (unscaled); qrow: the
    first row of each query stripe."""
    acc = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    for t in range(S):
        pos = tl.minimum(qrow + (S - 1 - t), n_keys - 1)
        q = tl.load(q_base + pos[:, None].to(tl.int64) * stride_qn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        acc += _dot(q, _stripe_keys(k_base, p_base, c, t, offs_d, d_ok, n_keys, stride_kn, S, PERMUTED), IEEE)
    return acc


@triton.jit
def _antidiagonal_lse_kernel(
    Q, K, PERM, OUT, LSE, TOPV, TOPI,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_pb, stride_ph,
    n_keys, n_b, r0, r1, H_q, G_KV, G_PERM, per_seg, scale_log2,
    M: tl.constexpr, S: tl.constexpr, QB: tl.constexpr, BLOCK_R: tl.constexpr, KB: tl.constexpr,
    ROW_TOP: tl.constexpr, RT_POW2: tl.constexpr, HEAD_DIM: tl.constexpr, D_POW2: tl.constexpr, IEEE: tl.constexpr,
):
    # grid: (cdiv(r1 - r0, QB), B * H_q); scale_log2 = scale / S * log2(e)
    BLOCK_N: tl.constexpr = KB * M
    BS: tl.constexpr = M * S
    pid_g = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_q).to(tl.int64)
    h = (pid_bh % H_q).to(tl.int64)
    # the last query blocks (the longest rows) start first: less tail at the end of the grid
    g0 = r0 + (tl.num_programs(0) - 1 - pid_g) * QB
    hi = tl.minimum(g0 + QB, r1)  # key blocks from hi on are never causal for the group
    ds_first = (g0 // per_seg) * per_seg  # key blocks before this are read permuted by every stripe
    ds_last = ((hi - 1) // per_seg) * per_seg  # key blocks from here on are read in original order by every stripe

    offs_r = tl.arange(0, BLOCK_R)
    qb = g0 + offs_r // M
    row_ok = (offs_r // M < QB) & (qb < r1)
    qrow = qb * BS + (offs_r % M) * S  # first query of each stripe
    first = tl.minimum(qrow, n_keys - 1)
    ds_row = (qb // per_seg) * per_seg
    offs_d = tl.arange(0, D_POW2)
    d_ok = offs_d < HEAD_DIM
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + (h // G_KV) * stride_kh
    p_base = PERM + b * stride_pb + (h // G_PERM) * stride_ph
    out_row = ((pid_bh.to(tl.int64) * (r1 - r0) + (qb - r0)) * M + offs_r % M) * n_b  # OUT[bh, qb - r0, r, :]
    offs_c = tl.arange(0, BLOCK_N)
    offs_kb = tl.arange(0, KB)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    top_v, top_i = _row_top_init(BLOCK_R, ROW_TOP, RT_POW2)
    # -- tiles wholly before every stripe's diagonal segment: permuted, nothing masked --
    for jt in range(0, ds_first // KB):
        c = jt * BLOCK_N + offs_c
        s = _stripe_logits(q_base, k_base, p_base, qrow, c, offs_d, d_ok, n_keys, stride_qn, stride_kn,
                           BLOCK_R, BLOCK_N, S, True, IEEE) * scale_log2
        lse_b, m_i, l_i = _block_lse(s, 1.0, m_i, l_i, BLOCK_R, KB, M)
        blk = jt * KB + offs_kb
        tl.store(OUT + out_row[:, None] + blk[None, :], lse_b, mask=row_ok[:, None] & (blk < n_b)[None, :])
        top_v, top_i = _row_top_update(top_v, top_i, lse_b, jt * KB, ds_row, KB, ROW_TOP, RT_POW2)
    # -- the rest up to the group's last block: each stripe takes the layout its block reads, causal --
    for jt in range(ds_first // KB, tl.cdiv(hi, KB)):
        c = jt * BLOCK_N + offs_c
        s = _stripe_logits(q_base, k_base, p_base, qrow, c, offs_d, d_ok, n_keys, stride_qn, stride_kn,
                           BLOCK_R, BLOCK_N, S, False, IEEE)
        if jt * KB < ds_last:  # some stripe of the group still reads a block of this tile permuted
            s_perm = _stripe_logits(q_base, k_base, p_base, qrow, c, offs_d, d_ok, n_keys, stride_qn, stride_kn,
                                    BLOCK_R, BLOCK_N, S, True, IEEE)
            s = tl.where((c // M)[None, :] < ds_row[:, None], s_perm, s)
        s = s * scale_log2
        s = tl.where(c[None, :] * S <= first[:, None], s, float("-inf"))
        lse_b, m_i, l_i = _block_lse(s, 1.0, m_i, l_i, BLOCK_R, KB, M)
        blk = jt * KB + offs_kb
        tl.store(OUT + out_row[:, None] + blk[None, :], lse_b, mask=row_ok[:, None] & (blk < n_b)[None, :])
        top_v, top_i = _row_top_update(top_v, top_i, lse_b, jt * KB, ds_row, KB, ROW_TOP, RT_POW2)
    # key blocks after the group are not written: no row sees them, and their consumers read causal blocks only
    # key stripe 0 is visible to every stripe, so l_i >= 1 and m_i is finite
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    row = (pid_bh.to(tl.int64) * (r1 - r0) + (qb - r0)) * M + offs_r % M
    tl.store(LSE + row, lse, mask=row_ok)
    _row_top_store(TOPV, TOPI, top_v, top_i, row, row_ok, ROW_TOP, RT_POW2)
