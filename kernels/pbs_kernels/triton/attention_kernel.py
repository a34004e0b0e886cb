"""Block-sparse causal attention forward over a ``PermutedBlockMask`` (Triton, @triton.jit only).

One program computes BLOCK_M query rows of one query head. Its loop runs over the kept key blocks of
its plan row (``kv_num_blocks`` / ``kv_indices``), never over all earlier blocks (kv_indices are
ascending and causal, j <= i, so the blocks of the query's own segment form the tail of the row):

  0. the diagonal block j == i first: original keys, causal mask on positions, keys >= N masked.
     Its loads need nothing from the plan, so they overlap the plan's own loads; when the plan
     does not keep block i, the mask drops every key of it;
  1. kept blocks of EARLIER segments: permuted keys, no token mask;
  2. kept blocks of the OWN segment before block i: original keys, no token mask.

PERM_MODE says how phase 1 reads permuted keys:
  0  gathered copies KP/VP (keys already in permuted order), contiguous tiles through TMA tensor
     descriptors (CUDA, Hopper);
  1  gathered copies KP/VP, contiguous tiles through plain pointer loads;
  2  original K/V, rows remapped through ``perm`` inside the kernel (no copy); phases 1 and 2
     then share one loop.

Softmax runs in base 2: scores are multiplied by ``qk_scale = scale * log2(e)`` and exponentiated
with exp2, which is what the hardware computes natively.

Three options of some model families, each a constexpr switch (off: the code above, unchanged):
  WINDOWED  a sliding window of WINDOW tokens: query q sees original keys q - WINDOW < k <= q. Every
            tile is masked by its keys' original positions (in phase 1 read from PERM), so any plan
            is exact under the window; band plans (``pbs_kernels.band``) keep only the blocks it touches.
  SOFTCAP   Gemma-2's soft-capping, cap * tanh(scale * q.k / cap), before the mask: the launcher passes
            CAP_IN = scale / cap and qk_scale = cap * log2(e).
  SINKS     gpt-oss's per-head attention sinks: SINK[h], a logit with no value, in every row's softmax
            denominator: the running max starts at it and the running sum at 1.

Shapes: Q, O (B, H_q, N, D); K, V (B, H_kv, N, D); KP, VP (B, H_perm, N, D); PERM (B, H_perm, N);
KV_NUM (B, H_q, R); KV_IDX (B, H_q, R, N_kb): the plan rows of query blocks QB0 .. QB0 + R - 1 (the
whole plan: QB0 = 0, R = N_qb); the grid covers those query blocks only. All contiguous (last stride 1).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # tanh through exp2 (no tanh in tl.math; libdevice's is CUDA only): sign(x) (1 - e) / (1 + e), e = exp(-2|x|)
    e = tl.math.exp2(-2.8853900817779268 * tl.abs(x))  # 2 * log2(e)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _window_mask(offs_m, key_pos, WINDOW):
    # (BLOCK_M, BLOCK_N): key_pos (BLOCK_N,) original positions inside the window of each query row
    return key_pos[None, :] > offs_m[:, None] - WINDOW


@triton.jit
def _unmasked_step(acc, l_i, m_i, q, k, v, qk_scale, offs_m, key_pos, WINDOW, WINDOWED: tl.constexpr,
                   DOT_PREC: tl.constexpr, SOFTCAP: tl.constexpr, CAP_IN):
    # a tile of a kept block before the diagonal (phases 1 and 2): fully causal, so masked only by a window
    if WINDOWED:
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, _window_mask(offs_m, key_pos, WINDOW),
                                             True, DOT_PREC, SOFTCAP, CAP_IN)
    else:
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, None, False, DOT_PREC, SOFTCAP,
                                             CAP_IN)
    return acc, l_i, m_i


@triton.jit
def _online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, mask, MASKED: tl.constexpr,
                         DOT_PREC: tl.constexpr, SOFTCAP: tl.constexpr = False, CAP_IN=1.0):
    # q (BLOCK_M, D), k/v (BLOCK_N, D); acc (BLOCK_M, D) fp32; l_i, m_i (BLOCK_M,) fp32, m_i in log2 units
    # -- scores (raw; the log2e-folded scale enters through one multiply-add below) --
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N)
    if SOFTCAP:
        qk = _tanh(qk * CAP_IN)  # capped before the mask: tanh(-inf) would not stay -inf
    if MASKED:
        qk = tl.where(mask, qk, float("-inf"))
    # -- online softmax update --
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    # -- accumulate P V --
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_ij


@triton.jit
def pbs_attn_fwd(
    Q, K, V, KP, VP, PERM, O, KV_NUM, KV_IDX, SINK,  # SINK (H_q,) fp32 (SINKS)
    qk_scale, CAP_IN, WINDOW,  # CAP_IN: scale / softcap (SOFTCAP); WINDOW: tokens (WINDOWED)
    N_CTX, H_Q, H_KV, H_PERM, QB0, N_QB, N_KB,  # N_QB: plan rows held (R)
    PLAN_BLOCK: tl.constexpr,  # tokens per plan block (selection granularity)
    SEG_BLOCKS: tl.constexpr,  # plan blocks per segment
    SEG_POW2: tl.constexpr,  # next power of two >= SEG_BLOCKS (tl.arange needs one)
    BLOCK_M: tl.constexpr,  # query rows per program; divides PLAN_BLOCK
    BLOCK_N: tl.constexpr,  # key rows per tile; divides PLAN_BLOCK
    HEAD_DIM: tl.constexpr,
    PERM_MODE: tl.constexpr,
    DOT_PREC: tl.constexpr,  # "ieee" for fp32 inputs, else the default "tf32" (ignored for 16-bit)
    WINDOWED: tl.constexpr = False,  # mask keys outside a sliding window of WINDOW tokens
    SOFTCAP: tl.constexpr = False,  # soft-cap the scores
    SINKS: tl.constexpr = False,  # add SINK[h] to every row's softmax denominator
):
    SUB_M: tl.constexpr = PLAN_BLOCK // BLOCK_M
    SUB_N: tl.constexpr = PLAN_BLOCK // BLOCK_N
    GROUP = H_Q // H_KV
    # grid: (tiles * GROUP, B * H_kv). The query heads of one GQA group are neighbours in launch
    # order, so the K/V blocks they share are read from L2; longest rows first (causal rows late
    # in the sequence hold the most blocks).
    tile = QB0 * SUB_M + tl.num_programs(0) // GROUP - 1 - tl.program_id(0) // GROUP
    b = tl.program_id(1) // H_KV
    h_kv = tl.program_id(1) % H_KV
    h = h_kv * GROUP + tl.program_id(0) % GROUP
    bh = b * H_Q + h
    qb = tile // SUB_M  # plan row
    h_perm = h // (H_Q // H_PERM)

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    # int64 bases: B * H * N * D overflows int32 at 128K tokens
    q_base = (bh.to(tl.int64) * N_CTX) * HEAD_DIM
    kv_row0 = (b.to(tl.int64) * H_KV + h_kv) * N_CTX  # first row of this kv head in (B*H_kv*N, D)
    kp_row0 = (b.to(tl.int64) * H_PERM + h_perm) * N_CTX
    row = bh.to(tl.int64) * N_QB + qb - QB0
    idx_row = KV_IDX + row * N_KB

    q = tl.load(Q + q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=offs_m[:, None] < N_CTX, other=0.0)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a fully masked row stays NaN-free
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if SINKS:  # the sink's term exp2(m - m) = 1, in log2 units
        m_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32) * (tl.load(SINK + h) * 1.4426950408889634)
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # -- split the row: count kept blocks inside the own segment (they are the tail) --
    num = tl.load(KV_NUM + row)
    diag_start = (qb // SEG_BLOCKS) * SEG_BLOCKS
    back = tl.arange(0, SEG_POW2)
    tail_ok = (back < SEG_BLOCKS) & (back < num)
    tail = tl.load(idx_row + num - 1 - back, mask=tail_ok, other=-1)
    n_diag = tl.sum(((tail >= diag_start) & tail_ok).to(tl.int32), 0)
    n_off = num - n_diag
    has_diag = tl.sum(((tail == qb) & tail_ok).to(tl.int32), 0)  # 1 when block qb is kept (last entry)

    # -- phase 0: the diagonal block, original keys, causal mask on positions --
    for s in tl.static_range(0, SUB_N):
        offs_k = qb * PLAN_BLOCK + s * BLOCK_N + offs_n
        kv_off = (kv_row0 + offs_k)[:, None] * HEAD_DIM + offs_d[None, :]
        in_seq = offs_k[:, None] < N_CTX
        k = tl.load(K + kv_off, mask=in_seq, other=0.0)
        v = tl.load(V + kv_off, mask=in_seq, other=0.0)
        mask = (offs_k[None, :] <= offs_m[:, None]) & (offs_k[None, :] < N_CTX) & (has_diag > 0)
        if WINDOWED:
            mask = mask & _window_mask(offs_m, offs_k, WINDOW)
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, mask, True, DOT_PREC, SOFTCAP,
                                             CAP_IN)

    if PERM_MODE == 0:
        total_rows = tl.num_programs(1) * N_CTX  # B * H_kv * N
        k_desc = tl.make_tensor_descriptor(K, shape=[total_rows, HEAD_DIM], strides=[HEAD_DIM, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(V, shape=[total_rows, HEAD_DIM], strides=[HEAD_DIM, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        perm_rows = tl.num_programs(1) // H_KV * H_PERM * N_CTX
        kp_desc = tl.make_tensor_descriptor(KP, shape=[perm_rows, HEAD_DIM], strides=[HEAD_DIM, 1],
                                            block_shape=[BLOCK_N, HEAD_DIM])
        vp_desc = tl.make_tensor_descriptor(VP, shape=[perm_rows, HEAD_DIM], strides=[HEAD_DIM, 1],
                                            block_shape=[BLOCK_N, HEAD_DIM])

    last = num - has_diag  # every kept block but qb: fully visible to every row of this tile
    if PERM_MODE == 2:
        # -- phases 1 and 2 in one pipelined loop: rows remapped through perm before the own
        #    segment, read in original order inside it; no mask --
        for t in range(0, last * SUB_N):
            j = tl.load(idx_row + t // SUB_N)
            slot = j * PLAN_BLOCK + (t % SUB_N) * BLOCK_N + offs_n
            src = tl.load(PERM + kp_row0 + slot)  # original positions of these slots
            src = tl.where(t < n_off * SUB_N, src, slot)
            kv_off = (kv_row0 + src)[:, None] * HEAD_DIM + offs_d[None, :]
            k = tl.load(K + kv_off)
            v = tl.load(V + kv_off)
            acc, l_i, m_i = _unmasked_step(acc, l_i, m_i, q, k, v, qk_scale, offs_m, src, WINDOW, WINDOWED, DOT_PREC,
                                           SOFTCAP, CAP_IN)
    else:
        # -- phase 1: earlier segments, permuted copies, no causal mask --
        for t in range(0, n_off * SUB_N):
            j = tl.load(idx_row + t // SUB_N)
            start = j * PLAN_BLOCK + (t % SUB_N) * BLOCK_N
            if PERM_MODE == 0:
                k = kp_desc.load([(kp_row0 + start).to(tl.int32), 0])
                v = vp_desc.load([(kp_row0 + start).to(tl.int32), 0])
            else:
                kv_off = (kp_row0 + start + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
                k = tl.load(KP + kv_off)
                v = tl.load(VP + kv_off)
            if WINDOWED:  # the original positions of these permuted slots
                pos = tl.load(PERM + kp_row0 + start + offs_n)
            else:
                pos = offs_n  # not read
            acc, l_i, m_i = _unmasked_step(acc, l_i, m_i, q, k, v, qk_scale, offs_m, pos, WINDOW, WINDOWED, DOT_PREC,
                                           SOFTCAP, CAP_IN)
        # -- phase 2: own segment before the last kept block, original keys, no causal mask --
        for t in range(n_off * SUB_N, last * SUB_N):
            j = tl.load(idx_row + t // SUB_N)
            start = j * PLAN_BLOCK + (t % SUB_N) * BLOCK_N
            if PERM_MODE == 0:
                k = k_desc.load([(kv_row0 + start).to(tl.int32), 0])
                v = v_desc.load([(kv_row0 + start).to(tl.int32), 0])
            else:
                kv_off = (kv_row0 + start + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
                k = tl.load(K + kv_off)
                v = tl.load(V + kv_off)
            acc, l_i, m_i = _unmasked_step(acc, l_i, m_i, q, k, v, qk_scale, offs_m, start + offs_n, WINDOW,
                                           WINDOWED, DOT_PREC, SOFTCAP, CAP_IN)

    # -- epilogue: normalize; rows that saw no key (only rows >= N) write 0 (with sinks acc is 0 there) --
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(O + q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=offs_m[:, None] < N_CTX)
