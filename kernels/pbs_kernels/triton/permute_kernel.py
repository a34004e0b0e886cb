"""@triton.jit kernels of the segmented key permutation: key importance seen by the last query block.

importance[b, hp, n] = mean over the last ``rows`` query rows r (of the query heads that share
permutation head hp) of softmax_n(q_r . k_n * scale) under the causal mask. Two passes, so no
(rows x N) score matrix ever exists in memory:

1. ``_row_stats_kernel``: per query row and span of keys, the running max ``m_i`` and sum ``l_i`` of
   the exponentials (online softmax); the launcher merges the spans into one log-sum-exp per row.
2. ``_importance_kernel``: per tile of keys, recompute the scores of every row, turn them into
   probabilities with the row's log-sum-exp and sum them over the rows.

Both work in base 2 (scores times scale · log2 e, ``exp2``: one fused multiply-add and one ``ex2``
per score), and only the key tiles that reach past the first of the last rows (or past the end)
apply the causal mask.

3. ``_segment_sort_kernel``: the permutation itself, a stable descending sort of the importance inside
   each segment of keys (the order ``torch.sort(descending=True, stable=True)`` gives), in one launch.

Launchers and shapes: ``pbs_kernels.triton.permute``.
"""

import triton
import triton.language as tl


@triton.jit
def _stats_step(q, k_base, stride_kn, start_n, hi, q_pos, m_i, l_i, qk_scale,
                HEAD_DIM: tl.constexpr, D_POW2: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                MASKED: tl.constexpr):
    """Online-softmax update of (m_i, l_i) (base 2) with the key tile at start_n. Only a tile that
    reaches past the span's end or past the first row's position (``MASKED``) needs the causal mask
    and the bounds check: for every other tile every key is visible to every row."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_POW2)
    k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
                mask=(offs_n[:, None] < hi) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * qk_scale
    if MASKED:  # key n is visible to the query at q_pos when n <= q_pos
        s = tl.where((offs_n[None, :] < hi) & (offs_n[None, :] <= q_pos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
    return m_new, l_i


@triton.jit
def _row_stats_kernel(
    Q, K, M_OUT, L_OUT,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    n_keys, rows, span, n_spans, H_q, G, qk_scale,
    HEAD_DIM: tl.constexpr, D_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    # grid: (cdiv(rows, BLOCK_M), n_spans, B * H_q); qk_scale = softmax scale * log2(e): M_OUT in base 2
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // H_q).to(tl.int64)  # 64-bit offsets: (B, H, N, D) tensors pass 2**31 elements at 512K
    h = (pid_bh % H_q).to(tl.int64)
    hk = h // G

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row index among the last `rows` queries
    offs_d = tl.arange(0, D_POW2)
    row_ok = offs_m < rows
    q_pos = n_keys - rows + offs_m
    q_ptrs = Q + b * stride_qb + h * stride_qh + q_pos[:, None].to(tl.int64) * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    lo = pid_s * span
    hi = tl.minimum(lo + span, n_keys)
    # whole tiles of keys every row sees (keys 0 .. n_keys - rows), then the rest of the span, masked
    clear = tl.maximum(lo, lo + (tl.minimum(hi, n_keys - rows + 1) - lo) // BLOCK_N * BLOCK_N)
    for start_n in range(lo, clear, BLOCK_N):
        m_i, l_i = _stats_step(q, k_base, stride_kn, start_n, hi, q_pos, m_i, l_i, qk_scale,
                               HEAD_DIM, D_POW2, BLOCK_N, IEEE, False)
    for start_n in range(clear, hi, BLOCK_N):
        m_i, l_i = _stats_step(q, k_base, stride_kn, start_n, hi, q_pos, m_i, l_i, qk_scale,
                               HEAD_DIM, D_POW2, BLOCK_N, IEEE, True)

    out = (pid_bh.to(tl.int64) * n_spans + pid_s) * rows + offs_m
    tl.store(M_OUT + out, m_i, mask=row_ok)
    tl.store(L_OUT + out, l_i, mask=row_ok)


@triton.jit
def _importance_rows(acc, k, Q, LSE, b, hp, stride_qb, stride_qh, stride_qn, offs_n, n_keys, rows, H_q, GP,
                     qk_scale, HEAD_DIM: tl.constexpr, D_POW2: tl.constexpr, BLOCK_M: tl.constexpr,
                     IEEE: tl.constexpr, MASKED: tl.constexpr):
    """acc (BLOCK_N) plus the probabilities the last ``rows`` queries of query heads hp*GP .. hp*GP+GP-1
    give the key tile k; ``MASKED``: the tile reaches past the first row's position or past n_keys."""
    offs_d = tl.arange(0, D_POW2)
    for g in range(0, GP):
        h = hp * GP + g
        q_base = Q + b * stride_qb + h * stride_qh
        lse_base = LSE + (b * H_q + h) * rows
        for start_m in range(0, rows, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < rows
            q_pos = n_keys - rows + offs_m
            q = tl.load(q_base + q_pos[:, None].to(tl.int64) * stride_qn + offs_d[None, :],
                        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))  # rows past `rows`: p = 0
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            p = tl.exp2(s * qk_scale - lse[:, None])  # base 2: lse is too
            if MASKED:
                p = tl.where((offs_n[None, :] < n_keys) & (offs_n[None, :] <= q_pos[:, None]), p, 0.0)
            acc += tl.sum(p, 0)
    return acc


@triton.jit
def _importance_kernel(
    Q, K, LSE, OUT,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    n_keys, rows, H_q, H_perm, GP, PERM_PER_KV, qk_scale, inv_count,
    HEAD_DIM: tl.constexpr, D_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    # grid: (cdiv(n_keys, BLOCK_N), B * H_perm); permutation head hp serves query heads hp*GP .. hp*GP+GP-1;
    # qk_scale = softmax scale * log2(e), LSE in base 2 (as _row_stats_kernel's)
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_perm).to(tl.int64)  # 64-bit offsets, as above
    hp = (pid_bh % H_perm).to(tl.int64)
    hk = hp // PERM_PER_KV

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_POW2)
    key_ok = offs_n < n_keys
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
                mask=key_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)

    acc = tl.zeros([BLOCK_N], tl.float32)
    if (pid_n + 1) * BLOCK_N > n_keys - rows + 1:  # keys some row does not see, or past the end
        acc = _importance_rows(acc, k, Q, LSE, b, hp, stride_qb, stride_qh, stride_qn, offs_n, n_keys, rows, H_q,
                               GP, qk_scale, HEAD_DIM, D_POW2, BLOCK_M, IEEE, True)
    else:
        acc = _importance_rows(acc, k, Q, LSE, b, hp, stride_qb, stride_qh, stride_qn, offs_n, n_keys, rows, H_q,
                               GP, qk_scale, HEAD_DIM, D_POW2, BLOCK_M, IEEE, False)

    tl.store(OUT + pid_bh.to(tl.int64) * n_keys + offs_n, acc * inv_count, mask=key_ok)


@triton.jit
def _gather_head_rows(x_head, stride_xn, OUT, out_row0, src, offs, ok, HEAD_DIM: tl.constexpr):
    # OUT rows out_row0 + offs <- x_head rows src
    offs_d = tl.arange(0, HEAD_DIM)
    rows = tl.load(x_head + src[:, None] * stride_xn + offs_d[None, :], mask=ok[:, None])
    tl.store(OUT + (out_row0 + offs)[:, None] * HEAD_DIM + offs_d[None, :], rows, mask=ok[:, None])


@triton.jit
def _gather_rows_kernel(
    X, Y, PERM, OUT_X, OUT_Y,
    n, H_x, H_perm,
    stride_xb, stride_xh, stride_xn,
    stride_yb, stride_yh, stride_yn,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, PAIR: tl.constexpr,
):
    # grid: (cdiv(n, BLOCK), B * H_perm); OUT_X[b, hp, s] = X[b, hp // (H_perm // H_x), PERM[b, hp, s]]:
    # keys copied into permuted order, one tile of BLOCK slots per program; with PAIR, the values Y
    # too (into OUT_Y), with the same permutation indices, in the same launch. X, Y may be strided views (last dim contiguous); PERM and the outputs are contiguous.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: (B, H, N, D) tensors pass 2**31 elements at 512K
    b = pid_bh // H_perm
    hx = (pid_bh % H_perm) // (H_perm // H_x)
    offs = pid_n * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    out_row0 = pid_bh * n
    src = tl.load(PERM + pid_bh * n + offs, mask=ok, other=0).to(tl.int64)
    _gather_head_rows(X + b * stride_xb + hx * stride_xh, stride_xn, OUT_X, out_row0, src, offs, ok, HEAD_DIM)
    if PAIR:
        _gather_head_rows(Y + b * stride_yb + hx * stride_yh, stride_yn, OUT_Y, out_row0, src, offs, ok, HEAD_DIM)


@triton.jit
def _segment_sort_kernel(SCORES, OUT, n_keys, SEG: tl.constexpr):
    # grid: (cdiv(n_keys, SEG), B * H); SCORES fp32 (B, H, n_keys) and OUT int32 (B, H, n_keys), contiguous.
    # OUT[.., s0 + i] = s0 + (position inside the segment of the key with the i-th highest score), ties in
    # original order: torch.sort(descending=True, stable=True) of each segment of SEG keys, s0 = its start.
    # A trailing partial segment (its program is the last along axis 0) gets the identity.
    #
    # Why one int64 sort: every key gets a distinct composite (~ordered score) << 32 | index, so one
    # ascending tl.sort (a bitonic network in registers, O(SEG log^2 SEG) compare-and-swaps) orders by
    # descending score, then ascending index -- the stable order, exact, with no tie left to the network.
    # Counting ranks would be exact too, but takes SEG^2 compares to the network's ~SEG/4 * log2(SEG)^2.
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B * H * N passes 2**31 at 512K keys, 64 heads
    start = pid_s * SEG
    offs = tl.arange(0, SEG)
    row = pid_bh * n_keys + start
    if start + SEG <= n_keys:
        bits = tl.load(SCORES + row + offs).to(tl.int32, bitcast=True)
        # torch.sort's order in integers: -0.0 ties with +0.0 (both 0); every NaN ties (0x7fffffff) above
        # +inf (0x7f800000), as descending sorts put NaN first; flipping the 31 low bits of negative
        # floats makes signed-integer order equal float order (more negative = larger magnitude bits)
        bits = tl.where(bits == -2147483648, 0, bits)
        bits = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FFFFFFF, bits)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # arithmetic shift: all ones for negatives, else 0
        # ~key reverses the order (descending score); index in the low 32 bits breaks ties ascending
        comp = ((~key).to(tl.int64) << 32) | offs.to(tl.int64)
        comp = tl.sort(comp, 0)
        tl.store(OUT + row + offs, start + (comp & (SEG - 1)).to(tl.int32))
    else:
        tl.store(OUT + row + offs, start + offs, mask=start + offs < n_keys)
