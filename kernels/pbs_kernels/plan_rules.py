"""Plan rules that the PyTorch reference and the Triton launchers both follow.

Which query block reads which segment (``segment_starts``), how keys are ordered inside segments
(``segment_permutation``, ``identity_permutation``, ``permute_keys``), which query rows score the key
blocks (``sample_rows``) and how score "sampled_max_fp8" rounds them and the keys to float8
(``float8_scaled``, ``float8_rounded``), which key blocks a query block must keep (``sink_block``,
``chunk_blocks``) and how the rest are ranked and cut at the threshold
(``pooled_block_probs``, ``rank_order``, ``rank_blocks``). Plain torch with no host synchronization:
``pbs_kernels.reference`` builds its plans from them on every device, and the GPU paths
(``pbs_kernels.permute``, ``pbs_kernels.select``, ``pbs_kernels.triton``) call them for the steps they do
not fuse into a kernel, so both paths define the plan the same way.

Shapes: q (B, H_q, N, D); k, v (B, H_kv, N, D); H_q = G * H_kv (GQA group size G).
"""

from __future__ import annotations

import torch

from .config import PBSConfig


def segment_starts(n_qb: int, block_size: int, segment_size: int, device=None) -> torch.Tensor:
    """int64 (N_qb,): first key block of each query block's own (diagonal) segment."""
    per_seg = segment_size // block_size
    return torch.div(torch.arange(n_qb, device=device), per_seg, rounding_mode="floor") * per_seg


# -- segmented key permutation -----------------------------------------------------------------


def segment_permutation(scores: torch.Tensor, segment_size: int) -> torch.Tensor:
    """Sort keys by descending score inside each complete segment of ``segment_size`` tokens.

    scores: (B, H, N). Returns int32 (B, H, N): original position of the key stored at each slot;
    identity over the trailing partial segment.
    """
    b, h, n = scores.shape
    full = (n // segment_size) * segment_size
    perm = torch.arange(n, device=scores.device, dtype=torch.int64).expand(b, h, n).clone()
    if full:
        seg = scores[..., :full].reshape(b, h, full // segment_size, segment_size)
        order = torch.sort(seg, dim=-1, descending=True, stable=True).indices
        base = torch.arange(0, full, segment_size, device=scores.device)[:, None]
        perm[..., :full] = (order + base).reshape(b, h, full)
    return perm.to(torch.int32)


def identity_permutation(b: int, h: int, n: int, device) -> torch.Tensor:
    """int32 (B, H, N): every slot holds its own key (no permutation)."""
    return torch.arange(n, device=device, dtype=torch.int32).expand(b, h, n).contiguous()


def permute_keys(k: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Gather keys (or values) into permuted order. k (B, H_kv, N, D), perm (B, H_perm, N).

    With a per-query-head permutation (H_perm = H_q) the result has H_q heads."""
    b, h_perm, n = perm.shape
    h_kv = k.shape[1]
    src = k if h_perm == h_kv else k.repeat_interleave(h_perm // h_kv, dim=1)
    return torch.gather(src, 2, perm.long().unsqueeze(-1).expand(-1, -1, -1, k.shape[-1]))


# -- sampled query rows and their float8 rounding ----------------------------------------------


def sample_rows(n: int, block_size: int, rows: int, device=None, spacing: str = "strided") -> torch.Tensor:
    """int64 (N_b, rows): ``rows`` query positions per block, each block's last row first (clipped to
    N-1 in a partial last block, so rows may repeat there). Offsets inside the block: "strided"
    B-1, B-1-s, B-1-2s, ... with s = B // rows; "geometric" B-1, then 2**(rows-2) - 1, ..., 3, 1, 0."""
    n_b = -(-n // block_size)
    t = torch.arange(rows, device=device)
    if spacing == "geometric":
        offs = torch.where(t == 0, block_size - 1, (1 << (rows - 1 - t).clamp_min(0)) - 1)
    else:
        offs = block_size - 1 - (block_size // rows) * t
    pos = torch.arange(n_b, device=device)[:, None] * block_size + offs[None, :]
    return pos.clamp_max(n - 1)


FLOAT8_MAX = 448.0  # the largest finite float8 e4m3 value


def float8_scaled(x: torch.Tensor, dims: tuple[int, ...] = (-2, -1)) -> tuple[torch.Tensor, torch.Tensor]:
    """x rounded to float8 e4m3 after scaling each slice over ``dims`` by a power of two: (x * scale as
    torch.float8_e4m3fn, scale fp32 of x's shape without ``dims``). dims (-2, -1): a scale per (batch, head)
    of (B, H, N, D) keys; (-1,): one per row of (B, H, R, D) sampled query rows. The scale brings the
    slice's largest magnitude into (224, 448] (1 for an all-zero slice), so rounding loses no range and
    needs no clamp; a power of two keeps the scaling and its inverse exact."""
    amax = torch.linalg.vector_norm(x, float("inf"), dim=dims).float()  # max |x| without an |x| copy
    scale = torch.where(amax > 0, torch.exp2(torch.floor(torch.log2(FLOAT8_MAX / amax.clamp_min(1e-30)))), 1.0)
    expanded = scale.reshape(*scale.shape, *(1,) * len(dims))
    # in x's own dtype: a power-of-two factor is exact there too, and no fp32 copy of x is made
    return (x * expanded.to(x.dtype)).to(torch.float8_e4m3fn), scale


def float8_rounded(x: torch.Tensor, dims: tuple[int, ...] = (-2, -1)) -> torch.Tensor:
    """fp32 x as ``float8_scaled`` rounds it (the float8 values divided by their scale again)."""
    x8, scale = float8_scaled(x, dims)
    return x8.float() / scale.reshape(*scale.shape, *(1,) * len(dims))


# -- block classes and top-p ranking -----------------------------------------------------------


def sink_block(perm: torch.Tensor, block_size: int) -> torch.Tensor:
    """int64 (B, H_perm): the permuted key block that holds original token 0."""
    return torch.div((perm == 0).int().argmax(-1), block_size, rounding_mode="floor")


def chunk_blocks(n_b: int, r0: int, r1: int, config: PBSConfig, sink: torch.Tensor,
                 device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block classes of query blocks [r0, r1) (C = r1 - r0) against all N_b key blocks.

    sink: int64 (B, H_q) permuted key block holding original token 0 (``sink_block``, expanded to
    the query heads). Returns (candidate bool (C, N_b): the off-diagonal causal blocks, i.e. those
    before the query block's own segment; causal bool (C, N_b); forced bool, broadcastable to
    (B, H_q, C, N_b): the diagonal segment up to the query block, the ``local_blocks`` just before
    it and, with ``config.sink``, the sink block). Plain torch, no host syncs.
    """
    cols = torch.arange(n_b, device=device)
    rows = torch.arange(r0, r1, device=device)[:, None]  # (C, 1)
    start = segment_starts(n_b, config.block_size, config.segment_size, device)[r0:r1, None]  # (C, 1)
    candidate = cols[None, :] < start
    causal = cols[None, :] <= rows
    forced = (cols[None, :] >= start) & causal
    forced = forced | (candidate & (cols[None, :] >= start - config.local_blocks))
    if config.sink:
        forced = forced | (candidate & (cols == sink[:, :, None, None]))
    return candidate, causal, forced


def pooled_block_probs(q_bar: torch.Tensor, k_bar: torch.Tensor, k_bar_orig: torch.Tensor | None,
                       candidate: torch.Tensor, causal: torch.Tensor, config: PBSConfig, scale: float) -> torch.Tensor:
    """score="pooled": fp32 (B, H_q, C, N_b) block probabilities of one chunk of C query blocks.

    q_bar (B, H_q, C, D) pooled queries of the chunk; k_bar (B, H_q, N_b, D) keys pooled in permuted
    order; candidate, causal (C, N_b) from ``chunk_blocks``. threshold_scope "offdiag": softmax of
    q_bar . k_bar over the candidate (off-diagonal) blocks. "total": softmax over every causal block,
    where the blocks of the query block's own (diagonal) segment, which attention reads in original
    order, are scored with ``k_bar_orig`` (B, H_q, N_b, D), the keys pooled in original order.
    """
    scores = torch.matmul(q_bar, k_bar.transpose(-1, -2)) * scale
    if config.threshold_scope == "offdiag":
        return scores.masked_fill(~candidate, float("-inf")).softmax(-1).nan_to_num(0.0)
    own = torch.matmul(q_bar, k_bar_orig.transpose(-1, -2)) * scale
    scores = torch.where(candidate, scores, own)
    return scores.masked_fill(~causal, float("-inf")).softmax(-1).nan_to_num(0.0)


def rank_order(probs: torch.Tensor | None, candidate: torch.Tensor, forced: torch.Tensor, config: PBSConfig,
               per_row: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The threshold-independent part of the top-p ranking of one chunk of query blocks.

    probs: fp32 (B, H_q, C, N_b) block probabilities (score="pooled": softmax over the scope), or
    None with ``per_row``: fp32 (B, H_q, C, m, N_b), the mass of each sampled row on each key block
    (score="sampled" / "sampled_max" / "mean_query", rows summing to 1 over the causal blocks). Then the block
    probability is the mean over the rows; ``config.row_top`` forces each row's best off-diagonal
    blocks; threshold_scope "offdiag" renormalizes over the off-diagonal blocks.
    candidate (C, N_b), forced (broadcastable to (B, H_q, C, N_b)): from ``chunk_blocks``.

    With ``config.forced_in_top_p`` forced blocks rank first, then blocks by descending probability
    (stable sort); without it (published) the ranking ignores which blocks are forced. Returns (probs,
    forced, order, mass_before), each (B, H_q, C, N_b): the block probabilities, the forced blocks
    (row_top included), the ranking (block indices) and the mass ranked before each ranked position.
    """
    if per_row is not None:  # estimated attention mass per block, summing to 1 over the causal blocks
        n_b = per_row.shape[-1]
        probs = per_row.mean(3)
        if config.row_top:  # every sampled row keeps its own best off-diagonal blocks (needles)
            top = per_row.masked_fill(~candidate[:, None, :], -1.0).topk(min(config.row_top, n_b), -1)
            row_best = torch.zeros_like(per_row, dtype=torch.bool).scatter_(-1, top.indices, top.values > 0)
            row_forced = row_best.any(3)  # (B, H_q, C, N_b)
        if config.threshold_scope == "offdiag":
            probs = probs * candidate
            probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-30)
    forced = forced.expand_as(probs)
    if per_row is not None and config.row_top:
        forced = forced | (row_forced & candidate)
    # forced_in_top_p: forced blocks come first in the ranking and count towards the kept mass; else
    # top-p ranks every block by its probability and the forced blocks join the kept set afterwards
    ranked = torch.where(forced, probs + 2.0, probs) if config.forced_in_top_p else probs
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    p_sorted = torch.gather(probs, -1, order)
    return probs, forced, order, torch.cumsum(p_sorted, -1) - p_sorted


def rank_blocks(probs: torch.Tensor | None, candidate: torch.Tensor, forced: torch.Tensor, config: PBSConfig,
                per_row: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p ranking of one chunk of query blocks: the kept set, packed. Shared by the reference and
    the GPU paths (plain torch: runs on CUDA without host syncs). Arguments as for ``rank_order``.

    Blocks are kept in ranking order (``rank_order``) while the mass ranked before them is below tau;
    forced blocks are kept in any case. Returns (kv_num_blocks int32 (B, H_q, C),
    kv_indices int32 (B, H_q, C, N_b): kept blocks first, ascending, then the rest ascending).
    """
    probs, forced, order, mass_before = rank_order(probs, candidate, forced, config, per_row)
    n_b = probs.shape[-1]
    cols = torch.arange(n_b, device=probs.device)
    keep_sorted = (mass_before < config.threshold - 1e-6) | (config.threshold >= 1.0)
    keep_sorted &= torch.gather(candidate.expand_as(probs) | forced, -1, order)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted) | forced
    num = keep.sum(-1, dtype=torch.int32)
    # kept blocks first, ascending; then the rest (padding, never read)
    key = torch.where(keep, cols, cols + n_b)
    return num, torch.sort(key, dim=-1).indices.to(torch.int32)
