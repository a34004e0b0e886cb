"""Plain PyTorch twin of every fast path: readable, vectorized, fp32 inside.

These functions define what PBS-Attn computes. The Triton kernels in ``pbs_kernels.triton`` must
match them (see the tolerance rule in the tests); on CPU they *are* the implementation, so they
avoid Python loops over heads or blocks and work on bounded chunks of query blocks. The plan rules
that the GPU paths share (segment layout, permutation order, forced blocks, top-p ranking) live in
``pbs_kernels.plan_rules`` and are imported here (``reference.rank_blocks`` and the others still work).

Shapes: q (B, H_q, N, D); k, v (B, H_kv, N, D); H_q = G * H_kv (GQA group size G).
"""

from __future__ import annotations

import math

import torch

from .block_mask import PermutedBlockMask
from .config import PBSConfig
from .plan_rules import (chunk_blocks, float8_rounded, identity_permutation, permute_keys, pooled_block_probs,
                         rank_blocks, sample_rows, segment_permutation, segment_starts, sink_block)

# Work per chunk of query blocks, in fp32 elements of the (rows x gathered keys) score matrix.
_CHUNK_ELEMENTS = 1 << 25  # 32M floats = 128 MiB


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# -- 1. segmented key permutation -------------------------------------------------------------


def importance_rows(n: int, block_size: int, segment_size: int, how: str = "last", device=None) -> torch.Tensor:
    """int64 (R,): the query rows that score keys for the permutation.

    "last": the last ``block_size`` rows (published). "strided": ``block_size`` rows spread evenly
    over [segment_size, N), the last row included (falls back to "last" when N <= segment_size).
    """
    rows = min(block_size, n)
    if how == "strided" and n > segment_size:
        pos = torch.linspace(segment_size, n - 1, rows, device=device).round().long()
        return torch.unique(pos)
    return torch.arange(n - rows, n, device=device)


def key_importance(q: torch.Tensor, k: torch.Tensor, block_size: int, per_head: bool = False,
                   scale: float | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of every key as seen by a set of query rows (by default the last block of queries).

    s[b, h, n] = mean over the query ``rows`` (default: the last ``block_size`` rows) and over the
    query heads of the GQA group unless ``per_head``, of softmax(q_row k^T * scale) under the causal mask.

    Returns fp32 (B, H_kv, N), or (B, H_q, N) when ``per_head``.
    """
    b, h_q, n, d = q.shape
    h_kv = k.shape[1]
    g = h_q // h_kv
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    if rows is None:
        rows = torch.arange(n - min(block_size, n), n, device=q.device)
    r = rows.numel()
    q_rows = q[:, :, rows].float().reshape(b, h_kv, g * r, d)
    scores = torch.matmul(q_rows, k.float().transpose(-1, -2)) * scale  # (B, H_kv, G*R, N)
    q_pos = rows.repeat(g)
    causal = torch.arange(n, device=q.device)[None, :] <= q_pos[:, None]
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    if per_head:
        return probs.reshape(b, h_kv, g, r, n).mean(3).reshape(b, h_q, n)
    return probs.mean(2)


def blocks_to_cover(mass: torch.Tensor, threshold: float) -> torch.Tensor:
    """Fewest blocks whose mass reaches ``threshold`` of each row's total. mass (..., N_b) -> fp32 (...)."""
    m = torch.sort(mass, dim=-1, descending=True).values
    total = m.sum(-1, keepdim=True).clamp_min(1e-30)
    before = (torch.cumsum(m, -1) - m) / total
    return (before < threshold - 1e-6).float().sum(-1)


def permutation_helps(q: torch.Tensor, k: torch.Tensor, perm: torch.Tensor, config: PBSConfig,
                      scale: float | None = None, n_rows: int = 64) -> torch.Tensor:
    """Bool (B, H_perm): where the permutation lowers the oracle top-p block count.

    For ``n_rows`` query rows spread evenly over the queries after the first segment, take their exact
    attention over the keys of *earlier* segments, sum it per key block once in original and once in
    permuted order, and count the fewest blocks that cover ``config.threshold`` of it. A head keeps its
    permutation when that count, averaged over the rows (and the query heads sharing the permutation),
    is lower than without permutation. Returns all True when N is too short to sample.
    """
    b, h_q, n, d = q.shape
    h_perm = perm.shape[1]
    bs, seg = config.block_size, config.segment_size
    if n < 2 * seg:
        return torch.ones(b, h_perm, dtype=torch.bool, device=q.device)
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    rows = torch.unique(torch.linspace(seg, n - 1, n_rows, device=q.device).round().long())
    r = rows.numel()
    kq = k.float().repeat_interleave(h_q // k.shape[1], dim=1)
    s = torch.matmul(q[:, :, rows].float() * scale, kq.transpose(-1, -2))  # (B, H_q, R, N)
    seg_start = torch.div(rows, seg, rounding_mode="floor") * seg  # earlier segments end here
    earlier = torch.arange(n, device=q.device)[None, :] < seg_start[:, None]  # (R, N)
    causal = torch.arange(n, device=q.device)[None, :] <= rows[:, None]
    p = s.masked_fill(~causal, float("-inf")).softmax(-1) * earlier  # mass on earlier segments only
    n_b = _cdiv(n, bs)
    pad = n_b * bs - n

    def count(p_slots: torch.Tensor) -> torch.Tensor:
        blocks = torch.nn.functional.pad(p_slots, (0, pad)).reshape(b, h_q, r, n_b, bs).sum(-1)
        return blocks_to_cover(blocks, config.threshold).mean(-1)  # (B, H_q)

    permq = perm.long().repeat_interleave(h_q // h_perm, dim=1)  # (B, H_q, N)
    permuted = torch.gather(p, -1, permq[:, :, None, :].expand(-1, -1, r, -1))  # slot s holds key perm[s]
    gain = count(p) - count(permuted)  # (B, H_q): blocks saved by permuting
    return gain.reshape(b, h_perm, h_q // h_perm).mean(-1) > 0


def compute_permutation(q: torch.Tensor, k: torch.Tensor, config: PBSConfig, scale: float | None = None) -> torch.Tensor:
    """int32 (B, H_perm, N): the segment permutation with every option of ``config`` (plain PyTorch)."""
    b, h_q, n, _ = q.shape
    h_perm = h_q if config.per_head_permutation else k.shape[1]
    if not config.permute or n < config.segment_size:
        return identity_permutation(b, h_perm, n, q.device)
    rows = importance_rows(n, config.block_size, config.segment_size, config.importance_rows, q.device)
    imp = key_importance(q, k, config.block_size, config.per_head_permutation, scale, rows)
    perm = segment_permutation(imp, config.segment_size)
    if config.permute_heads == "auto":
        keep = permutation_helps(q, k, perm, config, scale)  # (B, H_perm)
        perm = torch.where(keep[..., None], perm, identity_permutation(b, h_perm, n, q.device))
    return perm


# -- 2. block selection -----------------------------------------------------------------------


def pool_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean over each block of rows (the partial last block averages its real rows). (.., N, D) -> (.., N_b, D) fp32."""
    n, d = x.shape[-2:]
    n_b = _cdiv(n, block_size)
    pad = n_b * block_size - n
    xf = torch.nn.functional.pad(x.float(), (0, 0, 0, pad))
    sums = xf.reshape(*x.shape[:-2], n_b, block_size, d).sum(-2)
    counts = torch.full((n_b,), float(block_size), device=x.device)
    counts[-1] = block_size - pad
    return sums / counts[:, None]


def sampled_block_mass(q: torch.Tensor, k: torch.Tensor, k_perm: torch.Tensor, config: PBSConfig,
                       r0: int, r1: int, scale: float, per_row: bool = False) -> torch.Tensor:
    """Estimated attention mass of every key block, for query blocks [r0, r1). fp32 (B, H_q, C, N_b),
    or (B, H_q, C, rows, N_b) for each sampled row with ``per_row``.

    Each query block's sampled rows (``config.sample_rows`` strided rows, or its mean query for
    score="mean_query") attend exactly to all causal keys in the layout that block reads: permuted slots
    before its diagonal segment, original order inside it. The softmax mass is summed per key block and
    averaged over the rows; each row of the result sums to 1 over the causal blocks. With
    score="sampled_max" a row's "mass" is its softmax over the largest logit of each key block instead
    (one exponential per block, not per key).
    k (B, H_q, N, D) and k_perm (B, H_q, N, D) are already expanded to the query heads.
    """
    if config.score == "antidiagonal":
        return antidiagonal_block_mass(q, k, k_perm, config, r0, r1, scale, per_row)
    b, h_q, n, d = q.shape
    bs = config.block_size
    n_b = _cdiv(n, bs)
    c = r1 - r0
    if config.score == "mean_query":
        m = 1
        qs = pool_blocks(q, bs)[:, :, r0:r1]  # (B, H_q, C, D)
        pos = (torch.arange(r0, r1, device=q.device) * bs + bs - 1).clamp_max(n - 1)[:, None]  # (C, 1)
    else:
        m = config.sample_rows
        pos = sample_rows(n, bs, m, q.device, config.sample_spacing)[r0:r1]  # (C, m)
        qs = q[:, :, pos.reshape(-1)].float()
        if config.score == "sampled_max_fp8":  # rows rounded to float8 one scale each, keys one per head
            qs, k, k_perm = float8_rounded(qs, dims=(-1,)), float8_rounded(k), float8_rounded(k_perm)
    qs = qs.reshape(b, h_q, c * m, d) * scale
    pos = pos.reshape(-1)  # (C*m,)
    diag = (segment_starts(n_b, bs, config.segment_size, q.device)[r0:r1] * bs).repeat_interleave(m)  # (C*m,)
    # keys past the chunk's last row are never causal: score only the first n_k slots
    n_k = min(n, r1 * bs)
    slot = torch.arange(n_k, device=q.device)
    s = torch.matmul(qs, k_perm[:, :, :n_k].transpose(-1, -2))  # (B, H_q, C*m, n_k), permuted layout
    # each row's own segment is read in original order: rescore those <= S slots with the original keys
    seg = (diag[::m, None] + torch.arange(config.segment_size, device=q.device)).clamp_max(n_k - 1)  # (C, S)
    k_seg = k[:, :, seg]  # (B, H_q, C, S, D): one segment per query block, shared by its m rows
    own = torch.matmul(qs.reshape(b, h_q, c, m, d), k_seg.transpose(-1, -2))  # (B, H_q, C, m, S)
    s.scatter_(-1, seg.repeat_interleave(m, 0).expand(b, h_q, -1, -1), own.reshape(b, h_q, c * m, -1))
    s = s.masked_fill_(slot[None, :] > pos[:, None], float("-inf"))
    if config.score in PBSConfig.BLOCK_MAXIMA:  # softmax over each key block's largest logit
        s = torch.nn.functional.pad(s, (0, n_b * bs - n_k), value=float("-inf"))
        p = s.reshape(b, h_q, c, m, n_b, bs).amax(-1).softmax(-1)
    else:  # softmax over keys, summed per key block
        p = torch.nn.functional.pad(s.softmax(-1), (0, n_b * bs - n_k)).reshape(b, h_q, c, m, n_b, bs).sum(-1)
    return p if per_row else p.mean(3)


def _stripes(x: torch.Tensor, stride: int, reverse: bool) -> torch.Tensor:
    """(..., L, D) -> (..., L / stride, stride * D): each run of ``stride`` consecutive rows concatenated,
    in reverse order inside the run with ``reverse`` (L a multiple of stride)."""
    *lead, length, d = x.shape
    x = x.reshape(*lead, length // stride, stride, d)
    return (x.flip(-2) if reverse else x).reshape(*lead, length // stride, stride * d)


def antidiagonal_block_mass(q: torch.Tensor, k: torch.Tensor, k_perm: torch.Tensor, config: PBSConfig,
                            r0: int, r1: int, scale: float, per_row: bool = False) -> torch.Tensor:
    """score="antidiagonal": like ``sampled_block_mass`` (same shapes and layouts), with each of a block's
    m = ``config.sample_rows`` rows standing for a stripe of s = block_size / m consecutive queries.

    Stripe r of query block i holds queries i*B + r*s .. i*B + r*s + s - 1; key stripe c holds slots
    c*s .. c*s + s - 1 of the layout the block reads. Their score is the mean of the s logits on the
    antidiagonal, sum_t q[r*s + s-1-t] . k[c*s + t] * scale / s: one dot of length s*D, so a block costs
    m rows against N/s key stripes (s times fewer exponentials than m sampled rows). A key stripe is
    visible when its first slot is at or before the query stripe's first row. The softmax over the
    visible key stripes is summed per key block, as the sampled rows' masses are.
    """
    b, h_q, n, d = q.shape
    bs, m = config.block_size, config.sample_rows
    s = bs // m
    n_b = _cdiv(n, bs)
    c = r1 - r0
    rows = torch.arange(r0 * bs, r1 * bs, device=q.device).clamp_max(n - 1)
    qs = _stripes(q[:, :, rows].float(), s, reverse=True) * (scale / s)  # (B, H_q, C*m, s*D)
    n_k = min(n, r1 * bs)  # keys past the chunk's last row are never causal

    def striped(keys: torch.Tensor) -> torch.Tensor:  # (B, H_q, n_k, D) -> (B, H_q, n_b*m, s*D), zero padded
        return _stripes(torch.nn.functional.pad(keys[:, :, :n_k].float(), (0, 0, 0, n_b * bs - n_k)), s, False)

    permuted = torch.matmul(qs, striped(k_perm).transpose(-1, -2))  # (B, H_q, C*m, n_b*m)
    original = torch.matmul(qs, striped(k).transpose(-1, -2))
    # a block reads key blocks before its own segment permuted, the segment itself in original order
    diag = segment_starts(n_b, bs, config.segment_size, q.device)[r0:r1].repeat_interleave(m)  # (C*m,)
    stripe_block = torch.arange(n_b * m, device=q.device) // m
    scores = torch.where(stripe_block[None, :] < diag[:, None], permuted, original)
    first_row = (torch.arange(r0 * bs, r1 * bs, s, device=q.device)).clamp_max(n - 1)  # (C*m,)
    stripe = torch.arange(n_b * m, device=q.device) * s
    p = scores.masked_fill_(stripe[None, :] > first_row[:, None], float("-inf")).softmax(-1)
    p = p.reshape(b, h_q, c, m, n_b, m).sum(-1)
    return p if per_row else p.mean(3)


def select_blocks(q: torch.Tensor, k_perm: torch.Tensor, perm: torch.Tensor, config: PBSConfig,
                  scale: float | None = None, k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p block selection over permuted keys (scores per ``config.score``).

    q (B, H_q, N, D); k_perm (B, H_k, N, D) and perm (B, H_k, N) with H_k = H_kv or H_q;
    k (B, H_kv, N, D): the original keys, needed for sampled scores / "mean_query" and for
    threshold_scope="total" (the diagonal segment is scored in original order).
    Returns (kv_num_blocks int32 (B, H_q, N_qb), kv_indices int32 (B, H_q, N_qb, N_kb)).
    """
    b, h_q, n, d = q.shape
    bs = config.block_size
    g = h_q // k_perm.shape[1]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    n_b = _cdiv(n, bs)
    sink = sink_block(perm, bs).repeat_interleave(g, dim=1)  # (B, H_q)
    sampled = config.score != "pooled"
    if sampled:
        if k is None:
            raise ValueError(f"score={config.score!r} needs the original keys: pass k=")
        k_all = k.float().repeat_interleave(h_q // k.shape[1], dim=1)  # (B, H_q, N, D)
        kp_all = k_perm.float().repeat_interleave(g, dim=1)
        m = 1 if config.score == "mean_query" else config.sample_rows
        rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, 2 * b * h_q * m * n))
    else:
        q_bar = pool_blocks(q, bs)  # (B, H_q, N_b, D)
        k_bar = pool_blocks(k_perm, bs).repeat_interleave(g, dim=1)  # (B, H_q, N_b, D)
        k_bar_orig = None
        if config.threshold_scope == "total":  # the diagonal segment is read in original order
            if k is None:
                raise ValueError("score='pooled' with threshold_scope='total' needs the original keys: pass k=")
            k_bar_orig = pool_blocks(k, bs).repeat_interleave(h_q // k.shape[1], dim=1)
        rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, b * h_q * n_b))

    num = torch.empty(b, h_q, n_b, dtype=torch.int32, device=q.device)
    idx = torch.empty(b, h_q, n_b, n_b, dtype=torch.int32, device=q.device)
    for r0 in range(0, n_b, rows_per_chunk):  # bounded memory: chunks of query blocks
        r1 = min(n_b, r0 + rows_per_chunk)
        candidate, causal, forced = chunk_blocks(n_b, r0, r1, config, sink, q.device)
        if sampled:
            per_row = sampled_block_mass(q, k_all, kp_all, config, r0, r1, scale, per_row=True)
            num[:, :, r0:r1], idx[:, :, r0:r1] = rank_blocks(None, candidate, forced, config, per_row=per_row)
        else:
            probs = pooled_block_probs(q_bar[:, :, r0:r1], k_bar, k_bar_orig, candidate, causal, config, scale)
            num[:, :, r0:r1], idx[:, :, r0:r1] = rank_blocks(probs, candidate, forced, config)
    return num, idx


def build_plan(q: torch.Tensor, k: torch.Tensor, config: PBSConfig, scale: float | None = None) -> PermutedBlockMask:
    """Permutation and block selection in plain PyTorch. q (B, H_q, N, D), k (B, H_kv, N, D)."""
    n = q.shape[2]
    perm = compute_permutation(q, k, config, scale)
    num, idx = select_blocks(q, permute_keys(k, perm), perm, config, scale, k=k)
    return PermutedBlockMask(perm, num, idx, config.block_size, config.segment_size, n)


# -- 3. block-sparse attention ----------------------------------------------------------------


def soft_cap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``softcap * tanh(scores / softcap)`` (Gemma-2's logit soft-capping); scores unchanged when None."""
    return scores if softcap is None else softcap * torch.tanh(scores / softcap)


def check_softcap(softcap: float | None) -> float | None:
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number (a layer's attn_logit_softcapping) or None, got {softcap}")
    return softcap


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PermutedBlockMask,
                           scale: float | None = None, window: int | None = None,
                           softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention over the kept key blocks of ``plan`` only. Returns (B, H_q, N, D) in q's dtype.

    window: sliding window W: query q sees only original keys q - W < k <= q (inside the kept blocks).
    softcap: scores (scaled q . k) become ``softcap * tanh(scores / softcap)`` before masking and softmax.
    sinks: (H_q,) learned per-head attention sinks (gpt-oss): one extra logit per head in every row's
    softmax denominator, with no value (the row's weights then sum to less than 1).

    Each chunk of query blocks gathers its kept key blocks from a virtual key array
    [permuted keys ; original keys], right-aligned so that query block i's own block comes last:
    then the only mask is a bottom-right-aligned causal one, which SDPA applies without a dense
    mask tensor. Rows with fewer kept blocks than the chunk's longest are padded on the left with
    keys whose extra bias column is -inf (q carries a matching column of ones). The work is
    proportional to the density, not to N^2. With a window or a softcap, which SDPA cannot apply, each
    chunk computes its scores explicitly and masks them by the keys' original positions.
    """
    from torch.nn.attention.bias import causal_lower_right

    check_softcap(softcap)
    explicit = window is not None or softcap is not None or sinks is not None
    if sinks is not None and tuple(sinks.shape) != (q.shape[1],):
        raise ValueError(f"sinks must hold one logit per query head, shape ({q.shape[1]},), got {tuple(sinks.shape)}")

    b, h_q, n, d = q.shape
    bs = plan.block_size
    h_perm = plan.perm.shape[1]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    n_b = _cdiv(n, bs)
    if plan.row_offset or plan.kv_num_blocks.shape[-1] != n_b or plan.kv_indices is None:
        raise ValueError(f"the reference attends whole plans ({n_b} rows from 0); got {plan!r}")
    n_pad = n_b * bs
    g_perm = h_q // h_perm
    dev = q.device

    # virtual arrays per permutation head, rows [0, N_pad) permuted, [N_pad, 2 N_pad) original,
    # with one extra column: keys carry a bias (0 real key, -inf past N), values a 0
    perm_pad = torch.nn.functional.pad(plan.perm.long(), (0, n_b * bs - n), value=n)  # (B, H_perm, N_pad)
    orig_pos = torch.cat([perm_pad, torch.arange(n_pad, device=dev).expand_as(perm_pad)], -1)  # (B, H_perm, 2 N_pad)

    def virtual(x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        xp = permute_keys(x, plan.perm)
        xo = x if h_perm == x.shape[1] else x.repeat_interleave(h_perm // x.shape[1], dim=1)
        pad = (0, 0, 0, n_pad - n)
        both = torch.cat([torch.nn.functional.pad(xp.float(), pad), torch.nn.functional.pad(xo.float(), pad)], 2)
        return torch.cat([both, extra[..., None]], -1).reshape(-1, bs, d + 1)  # (blocks, bs, D+1)

    bias = torch.zeros(orig_pos.shape, device=dev).masked_fill_(orig_pos >= n, float("-inf"))
    pos_virt = orig_pos.reshape(-1, bs)  # original position of every virtual key, (blocks, bs)
    k_virt = virtual(k, bias)
    v_virt = virtual(v, torch.zeros_like(bias))
    head_base = ((torch.arange(b, device=dev)[:, None] * h_perm
                  + torch.arange(h_q, device=dev)[None, :] // g_perm) * (2 * n_b))  # (B, H_q), in blocks
    diag_start = segment_starts(n_b, bs, plan.segment_size, dev)
    q_aug = torch.cat([torch.nn.functional.pad(q.float() * scale, (0, 0, 0, n_pad - n)),
                       torch.ones(b, h_q, n_pad, 1, device=dev)], -1)  # (B, H_q, N_pad, D+1)
    out = torch.empty(b, h_q, n_pad, d, dtype=torch.float32, device=dev)

    # is the query block's own block among the kept ones? (kept blocks are ascending, so it is last)
    num = plan.kv_num_blocks.long()
    last = torch.gather(plan.kv_indices, -1, (num - 1).clamp(min=0)[..., None])[..., 0]
    has_own = (num > 0) & (last == torch.arange(n_b, device=dev))
    others = num - has_own.long()  # kept blocks strictly before the query block, (B, H_q, N_qb)

    max_slots = int(others.max().item()) + 1
    chunk = max(1, _CHUNK_ELEMENTS // max(1, b * h_q * bs * max_slots * bs))
    for r0 in range(0, n_b, chunk):
        r1 = min(n_b, r0 + chunk)
        c = r1 - r0
        cnt = others[:, :, r0:r1]  # (B, H_q, C)
        m = int(cnt.max().item()) + 1  # slots: the others, right-aligned, then the own block
        src = torch.arange(m - 1, device=dev) - (m - 1 - cnt[..., None])  # (B, H_q, C, m-1)
        blocks = torch.gather(plan.kv_indices[:, :, r0:r1].long(), -1, src.clamp(min=0))
        own = torch.arange(r0, r1, device=dev).expand(b, h_q, c)[..., None]
        blocks = torch.cat([blocks, own], -1)  # (B, H_q, C, m)
        slot_ok = torch.cat([src >= 0, has_own[:, :, r0:r1, None]], -1)
        in_diag = blocks >= diag_start[r0:r1, None]
        flat = (head_base[:, :, None, None] + blocks + torch.where(in_diag, n_b, 0)).reshape(-1)
        keys = k_virt.index_select(0, flat).reshape(b * h_q * c, 1, m * bs, d + 1)  # whole blocks at once
        vals = v_virt.index_select(0, flat).reshape(b * h_q * c, 1, m * bs, d + 1)
        keys[..., d].masked_fill_(~slot_ok.repeat_interleave(bs, -1).reshape(b * h_q * c, 1, m * bs), float("-inf"))
        qc = q_aug[:, :, r0 * bs : r1 * bs].reshape(b * h_q * c, 1, bs, d + 1)
        if explicit:
            key_pos = pos_virt.index_select(0, flat).reshape(b * h_q * c, 1, 1, m * bs)
            q_pos = torch.arange(r0 * bs, r1 * bs, device=dev).reshape(1, 1, c, bs).expand(b, h_q, c, bs)
            sink = None if sinks is None else sinks.float().reshape(1, h_q, 1).expand(b, h_q, c).reshape(-1, 1, 1, 1)
            o = _masked_chunk(qc, keys, vals, key_pos, q_pos.reshape(b * h_q * c, 1, bs, 1), window, softcap, sink)
        else:
            o = torch.nn.functional.scaled_dot_product_attention(
                qc, keys, vals, attn_mask=causal_lower_right(bs, m * bs), scale=1.0)
        out[:, :, r0 * bs : r1 * bs] = o[..., :d].reshape(b, h_q, c * bs, d)
    return out[:, :, :n].to(q.dtype)


def _masked_chunk(qc: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, key_pos: torch.Tensor,
                  q_pos: torch.Tensor, window: int | None, softcap: float | None,
                  sink: torch.Tensor | None = None) -> torch.Tensor:
    """One chunk of ``block_sparse_attention`` with explicit scores: qc (X, 1, bs, D+1) scaled queries and a
    column of ones; keys, vals (X, 1, M, D+1), the keys' last column their bias (0, or -inf for padding);
    key_pos (X, 1, 1, M) and q_pos (X, 1, bs, 1) original positions; sink (X, 1, 1, 1) each row's sink
    logit, or None. Returns (X, 1, bs, D+1)."""
    d = qc.shape[-1] - 1
    s = soft_cap(torch.matmul(qc[..., :d], keys[..., :d].transpose(-1, -2)), softcap)
    s = s + keys[..., d].unsqueeze(-2)  # after the cap: tanh would turn a -inf bias into -softcap
    visible = key_pos <= q_pos
    if window is not None:
        visible = visible & (key_pos > q_pos - window)
    s = s.masked_fill(~visible, float("-inf"))
    if sink is not None:  # a column that takes softmax mass and gives no value
        s = torch.cat([s, sink.expand(*s.shape[:-1], 1)], -1)
    p = s.softmax(-1).nan_to_num(0.0)  # a row that sees nothing: 0
    return torch.matmul(p[..., : keys.shape[-2]], vals)


def attention_recall(q: torch.Tensor, k: torch.Tensor, plan: PermutedBlockMask, rows: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """Share of each sampled query row's full causal attention mass that the kept blocks cover.

    rows: int64 (R,) query positions. Returns fp32 (B, H_q, R) in [0, 1].
    """
    b, h_q, n, d = q.shape
    h_kv = k.shape[1]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    bs = plan.block_size
    kf = k.float().repeat_interleave(h_q // h_kv, dim=1)
    s = torch.matmul(q[:, :, rows].float(), kf.transpose(-1, -2)) * scale  # (B, H_q, R, N)
    causal = torch.arange(n, device=q.device)[None, :] <= rows[:, None]
    p = s.masked_fill(~causal, float("-inf")).softmax(-1)
    # which original keys each row keeps: kept blocks of its query block, mapped through perm
    qb = torch.div(rows, bs, rounding_mode="floor")
    valid = torch.arange(plan.num_blocks, device=q.device) < plan.kv_num_blocks[:, :, qb, None]  # (B, H_q, R, N_kb)
    dense = torch.zeros(valid.shape, dtype=torch.uint8, device=q.device)  # uint8: CUDA has no bool scatter_reduce
    dense = dense.scatter_reduce(-1, plan.kv_indices[:, :, qb].long(), valid.to(torch.uint8), "amax")
    kept_slot = dense.repeat_interleave(bs, -1)[..., :n]  # per slot
    diag_start = segment_starts(plan.kv_num_blocks.shape[-1], bs, plan.segment_size, q.device)[qb] * bs
    slot = torch.arange(n, device=q.device)
    perm = plan.perm.long().repeat_interleave(h_q // plan.perm.shape[1], dim=1)  # (B, H_q, N)
    # slot -> original key: permuted before the diagonal segment, identity inside it (a bijection)
    key_of_slot = torch.where(slot[None, None, None, :] < diag_start[None, None, :, None],
                              perm[:, :, None, :], slot.expand(1, 1, 1, n))
    kept = torch.zeros_like(kept_slot).scatter(-1, key_of_slot.expand_as(kept_slot), kept_slot)
    return (p * kept).sum(-1)
