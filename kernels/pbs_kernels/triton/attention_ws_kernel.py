"""Warp-specialized block-sparse causal attention forward for Hopper (Triton, @triton.jit only).

The same computation as ``attention_kernel.pbs_attn_fwd`` for 128-token plans, shaped so that
Triton's Hopper warp specialization (``tl.range(..., warp_specialize=True)``) applies: one loop over
every kept block of the plan row, all tiles read through tensor descriptors (TMA), nothing but
descriptors captured by the loop. Triton then splits the program into a producer warp group that
issues the TMA loads and two consumer warp groups of 64 query rows each that run the tensor-core
math and the softmax, overlapping loads with compute (the FlashAttention-3 structure).

To make every kept block one descriptor load, K and V come as one buffer per head holding the keys
twice (``KC``/``VC``, built by ``attention.copies_for("ws", ...)``): rows [0, N) in permuted
order (read for blocks of earlier segments), rows [N, 2N) in original order (read inside the query's
own segment, where the causal rule needs original positions). The diagonal block j == qb, the last
entry of a row that keeps it, gets the token-level causal mask; no other block needs one.

Softmax in base 2 with the log2(e)-folded scale, as in ``attention_kernel``.

Shapes: Q, O (B, H_q, N, D); KC, VC (B, H_c, 2N, D) with H_c a multiple of H_kv, query head h
reading copy head h // (H_q // H_c); KV_NUM (B, H_q, R); KV_IDX (B, H_q, R, N_kb) (rows QB0 ..
QB0 + R - 1, as in ``attention_kernel``). All contiguous.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pbs_attn_fwd_ws(
    Q, KC, VC, O, KV_NUM, KV_IDX,
    qk_scale,
    N_CTX, H_Q, H_C, QB0, N_QB, N_KB,
    SEG_BLOCKS: tl.constexpr,  # plan blocks per segment
    BLOCK: tl.constexpr,  # tokens per plan block = query rows per program
    BLOCK_N: tl.constexpr,  # key rows per tile: BLOCK, or BLOCK // 2 (two tiles per plan block)
    HEAD_DIM: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,  # False in the interpreter and for comparison runs
):
    # grid: (R * GROUP, B * H_c), GROUP = H_q // H_c; query heads sharing a copy head are neighbours
    # in launch order (their key tiles come from L2); longest rows (latest query blocks) first.
    GROUP = H_Q // H_C
    qb = QB0 + tl.num_programs(0) // GROUP - 1 - tl.program_id(0) // GROUP
    b = tl.program_id(1) // H_C
    h_c = tl.program_id(1) % H_C
    h = h_c * GROUP + tl.program_id(0) % GROUP
    bh = b * H_Q + h

    q_rows = tl.num_programs(1) // H_C * H_Q * N_CTX  # B * H_q * N
    c_rows = tl.num_programs(1) * 2 * N_CTX  # B * H_c * 2N
    q_desc = tl.make_tensor_descriptor(Q, shape=[q_rows, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(KC, shape=[c_rows, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(VC, shape=[c_rows, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])

    row = bh.to(tl.int64) * N_QB + qb - QB0
    idx_row = KV_IDX + row * N_KB
    num = tl.load(KV_NUM + row)
    diag_start = (qb // SEG_BLOCKS) * SEG_BLOCKS  # first block of the query's own segment

    q0 = (bh * N_CTX + qb * BLOCK).to(tl.int32)  # rows past N read the next head's rows: never stored
    c0 = (tl.program_id(1) * 2 * N_CTX).to(tl.int32)  # first row of this copy head
    q = q_desc.load([q0, 0])
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK_N)
    TILES: tl.constexpr = BLOCK // BLOCK_N  # key tiles per plan block

    m_i = tl.full([BLOCK], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    for t in tl.range(0, num * TILES, warp_specialize=WARP_SPECIALIZE):
        j = tl.load(idx_row + t // TILES)
        part = (t % TILES) * BLOCK_N  # first key of this tile within plan block j
        # permuted half for earlier segments, original half inside the own segment
        r = c0 + j * BLOCK + part + tl.where(j < diag_start, 0, N_CTX)
        k = k_desc.load([r, 0])
        v = v_desc.load([r, 0])
        # The online-softmax step is written out here, not taken from attention_kernel's
        # _online_softmax_step: computing the mask before the dot (as passing it to that helper does)
        # changed Triton's warp-specialized schedule and made the kernel ~20% slower on the H100
        # (BENCHMARKS.md, "Design choices").
        qk = tl.dot(q, tl.trans(k))
        # causal mask on the diagonal block only (keys past N are later than every stored row):
        # (key i of the diagonal block is visible to row r when i <= r; other blocks are fully visible)
        lim = tl.where(j == qb, tl.arange(0, BLOCK) - part, BLOCK_N)  # last visible key of the tile, per row
        keep = offs_n[None, :] <= lim[:, None]
        qk = tl.where(keep, qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij

    # rows that saw no key (an empty plan row) write 0
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    offs_d = tl.arange(0, HEAD_DIM)
    o_ptrs = O + (bh.to(tl.int64) * N_CTX + offs_m)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < N_CTX)
