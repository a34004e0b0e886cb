"""What a PBS plan does to one attention head: block attention mass, kept mask, recall, forced rows.

The pictures of ``pbs viz-mask`` and its numbers come from here; rendering lives in ``viz``.
Everything is computed exactly in fp32 (token-level softmax, chunked over query rows), so the
numbers are ground truth for the plan, not an estimate from pooled scores.

Layouts. "original" indexes key blocks by original position. "plan" is the layout the kernel reads
and ``plan.to_dense()`` uses: for query block ``i``, key blocks before ``i``'s own (diagonal)
segment are permuted slots (slot ``s`` holds original key ``perm[s]``), key blocks inside it are in
original order.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from pbs_kernels import PBSConfig, PermutedBlockMask
from pbs_kernels import plan_rules
from pbs_kernels import reference as ref
from pbs_kernels.permute import compute_permutation
from pbs_kernels.select import select_blocks

# fp32 elements of one chunk of token-level attention probabilities (heads x rows x keys)
_CHUNK_ELEMENTS = 1 << 23
# recall difference (absolute) below which the permutation counts as neither helping nor hurting
NEUTRAL_BAND = 0.005


@dataclass
class HeadStats:
    """Numbers for one head. Fractions in [0, 1].

    density:          kept causal blocks / causal blocks.
    recall:           mean over all query rows of the attention mass the kept keys cover.
    forced_only_rows: query blocks that had a choice (earlier segments exist) but kept only forced blocks.
    rows_with_choice: query blocks with at least one selectable (non-forced) causal block.
    noperm_density:   density of the no-permutation plan matched to ``density`` (None when permute is off).
    noperm_recall:    recall of plain block selection at ``density`` (interpolated between the two
                      thresholds that bracket it).
    recall_gain:      recall - noperm_recall: what the permutation bought at equal density.
    verdict:          "helped", "hurt", "neutral" (|gain| < 0.5 points) or "n/a".
    """

    layer: int | None
    head: int
    density: float
    recall: float
    forced_only_rows: int
    rows_with_choice: int
    noperm_density: float | None
    noperm_recall: float | None
    recall_gain: float | None
    verdict: str

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass
class HeadView:
    """Everything needed to draw one head. Arrays are (N_b, N_b), numpy, on the host.

    original: fp32 block attention mass in original key order (row i: mean over query rows of block
              i of the softmax mass in each key block; each row sums to 1).
    permuted: the same in plan layout.
    kept:     bool, the plan's kept blocks (plan layout).
    forced:   bool, the blocks the plan keeps regardless of scores (diagonal segment, sink, local).
    """

    stats: HeadStats
    original: np.ndarray
    permuted: np.ndarray
    kept: np.ndarray
    forced: np.ndarray
    seq_len: int
    config: PBSConfig
    heads_total: int
    head_dim: int


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_attention_mass(q: torch.Tensor, k: torch.Tensor, perm: torch.Tensor, block_size: int,
                         segment_size: int, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact causal block attention mass of some heads, in original and in plan layout.

    q, k: (H, N, D), one key head per query head (GQA already resolved); perm: (H, N) int.
    Returns two fp32 (H, N_b, N_b) tensors on the host: ``original`` and ``plan``; row i of each is
    the mean over the real query rows of block i of the softmax mass per key block (rows sum to 1).
    """
    h, n, d = q.shape
    bs = block_size
    heads_per_pass = max(1, _CHUNK_ELEMENTS // (n * bs))
    if h > heads_per_pass:  # bounded memory: a few heads at a time
        parts = [block_attention_mass(q[i : i + heads_per_pass], k[i : i + heads_per_pass],
                                      perm[i : i + heads_per_pass], bs, segment_size, scale)
                 for i in range(0, h, heads_per_pass)]
        return torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])
    n_b = _cdiv(n, bs)
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    kf = k.float()
    keys = torch.arange(n, device=q.device)
    # key block of each original key, and the permuted block (slot // bs) that holds it
    orig_block = (keys // bs).expand(h, n)
    slot_of_key = torch.empty_like(perm, dtype=torch.long).scatter_(-1, perm.long(), keys.expand(h, n))
    perm_block = slot_of_key // bs
    original = torch.zeros(h, n_b, n_b)
    permall = torch.zeros(h, n_b, n_b)
    blocks_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, h * n * bs))
    for b0 in range(0, n_b, blocks_per_chunk):
        b1 = min(n_b, b0 + blocks_per_chunk)
        r0, r1 = b0 * bs, min(n, b1 * bs)  # query rows; they see keys [0, r1) only
        rows = torch.arange(r0, r1, device=q.device)
        s = torch.matmul(q[:, r0:r1].float() * scale, kf[:, :r1].transpose(-1, -2))  # (H, R, r1)
        p = s.masked_fill_(keys[None, :r1] > rows[:, None], float("-inf")).softmax(-1)
        counts = torch.full((b1 - b0,), float(bs), device=q.device)
        counts[-1] = r1 - (b1 - 1) * bs
        # sum the rows of each query block first: (H, C, r1), then keys into blocks of either layout
        rows_summed = torch.zeros(h, b1 - b0, r1, device=q.device).index_add_(1, (rows - r0) // bs, p)
        for target, kblock in ((original, orig_block), (permall, perm_block)):
            sums = torch.zeros(h, b1 - b0, n_b, device=q.device)
            sums.scatter_add_(-1, kblock[:, None, :r1].expand(-1, b1 - b0, -1), rows_summed)
            target[:, b0:b1] = (sums / counts[None, :, None]).cpu()
    diag = ref.segment_starts(n_b, bs, segment_size)  # (N_b,)
    before_diag = torch.arange(n_b)[None, :] < diag[:, None]  # (N_b, N_b)
    plan = torch.where(before_diag, permall, original)
    return original, plan


def forced_blocks(perm: torch.Tensor, n: int, config: PBSConfig) -> torch.Tensor:
    """bool (H, N_b, N_b): blocks a plan keeps whatever the scores (plan layout).

    perm: (H, N). The diagonal segment up to the query block, the ``local_blocks`` before it, and
    (with ``sink``) the permuted block that holds original token 0.
    """
    bs = config.block_size
    n_b = _cdiv(n, bs)
    rows = torch.arange(n_b)[:, None]
    cols = torch.arange(n_b)[None, :]
    start = ref.segment_starts(n_b, bs, config.segment_size)[:, None]
    forced = ((cols >= start) & (cols <= rows)) | ((cols < start) & (cols >= start - config.local_blocks))
    forced = forced.expand(perm.shape[0], n_b, n_b).clone()
    if config.sink:
        sink = ref.sink_block(perm.cpu()[None], bs)[0]  # (H,)
        forced |= (cols[None] == sink[:, None, None]) & (cols < start)[None]
    return forced


def _row_weights(n: int, bs: int) -> torch.Tensor:
    """fp32 (N_b,): real query rows per block, over N (the last block may be partial)."""
    n_b = _cdiv(n, bs)
    w = torch.full((n_b,), float(bs))
    w[-1] = n - (n_b - 1) * bs
    return w / n


def recall_of(mass: torch.Tensor, kept: torch.Tensor, n: int, bs: int) -> torch.Tensor:
    """Mean over all query rows of the kept attention mass. mass, kept: (H, N_b, N_b) -> fp32 (H,)."""
    per_block = (mass * kept.float()).sum(-1)  # (H, N_b)
    return (per_block * _row_weights(n, bs)[None]).sum(-1)


def _density(num: torch.Tensor) -> float:
    n_b = num.shape[-1]
    return float(num.sum().item()) / (num.numel() / n_b * n_b * (n_b + 1) / 2)


def analysis_bytes(seq_len: int, block_size: int, heads: int, layers: int = 1) -> int:
    """Host memory ``analyze`` needs for ``heads`` heads of each of ``layers`` layers (an estimate from above):
    the (N_b, N_b) block matrices kept per head (mass in two layouts, fp32; kept and forced blocks, bool),
    and the working set of one layer (the plan layout's temporaries per head; the no-permutation
    comparison's fp32 and bool matrices)."""
    n_b = _cdiv(seq_len, block_size)
    kept = layers * heads * n_b * n_b * (4 + 4 + 1 + 1)
    working = n_b * n_b * (12 * heads + 24)
    return kept + working


def plain_selection_order(q1: torch.Tensor, k1: torch.Tensor, config: PBSConfig,
                          scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The threshold-independent part of plain block selection (no permutation) of one head.

    q1, k1: (1, 1, N, D). Top-p selection ranks each query block's candidate blocks once (forced
    blocks first unless ``forced_in_top_p`` is off, then by score) and keeps a candidate iff the
    score mass ranked before it is below ``threshold - 1e-6`` (everything at threshold 1.0), so one
    scoring pass describes the plans of every threshold. The ranking is
    ``pbs_kernels.plan_rules.rank_order``, the one that ``reference.select_blocks`` uses (tests check
    that re-thresholding reproduces its plans exactly).

    Returns (forced bool (N_b, N_b), before fp32 (N_b, N_b)): ``before[i, j]`` is the mass ranked
    before candidate block j of query block i, +inf where j is forced or not a candidate.
    """
    _, _, n, d = q1.shape
    bs = config.block_size
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    n_b = _cdiv(n, bs)
    sampled = config.score != "pooled"
    kf = k1.float()
    if sampled:
        m = 1 if config.score == "mean_query" else config.sample_rows
        rows_per_chunk = max(1, ref._CHUNK_ELEMENTS // max(1, 2 * m * n))
    else:
        q_bar, k_bar = ref.pool_blocks(q1, bs), ref.pool_blocks(k1, bs)
        rows_per_chunk = max(1, ref._CHUNK_ELEMENTS // n_b)
    forced_all = torch.zeros(n_b, n_b, dtype=torch.bool)
    before_all = torch.full((n_b, n_b), float("inf"))
    sink = torch.zeros(1, 1, dtype=torch.long, device=q1.device)  # the identity permutation keeps token 0 in block 0
    for r0 in range(0, n_b, rows_per_chunk):
        r1 = min(n_b, r0 + rows_per_chunk)
        candidate, causal, forced = ref.chunk_blocks(n_b, r0, r1, config, sink, q1.device)
        if sampled:
            per_row = ref.sampled_block_mass(q1, kf, kf, config, r0, r1, scale, per_row=True)  # (1, 1, C, m, N_b)
            _, forced, order, mass_before = plan_rules.rank_order(None, candidate, forced, config, per_row)
        else:
            # no permutation: the keys pooled in original order serve both layouts
            probs = ref.pooled_block_probs(q_bar[:, :, r0:r1], k_bar, k_bar, candidate, causal, config, scale)
            _, forced, order, mass_before = plan_rules.rank_order(probs, candidate, forced, config)
        forced, order, mass_before = forced[0, 0], order[0, 0], mass_before[0, 0]
        before = torch.empty_like(mass_before).scatter_(-1, order, mass_before)
        forced_all[r0:r1] = forced.cpu()
        before_all[r0:r1] = before.masked_fill(forced | ~candidate, float("inf")).cpu()
    return forced_all, before_all


def plain_selection_curve(forced: torch.Tensor, before: torch.Tensor, mass: torch.Tensor,
                          n: int, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(density, recall) of every distinct plain plan, from the smallest threshold to 1.0.

    forced, before: from ``plain_selection_order``; mass: (N_b, N_b) block attention mass (original
    layout = the plain plan's layout). Returns two float64 (P,) tensors, density strictly
    increasing, the first the plan of the smallest threshold, the last 1.0 (every causal block).
    """
    n_b = forced.shape[-1]
    causal = n_b * (n_b + 1) / 2
    weighted = mass.double() * _row_weights(n, bs).double()[:, None]  # recall contribution of each block
    selectable = torch.isfinite(before)
    base = forced | (selectable & (before < 0))  # kept at every threshold
    crit = before[selectable & ~base].double().clamp_max(1.0 - 1e-6)  # above this, the threshold keeps it
    gain = weighted[selectable & ~base]
    crit, order = torch.sort(crit, stable=True)
    last = torch.ones_like(crit, dtype=torch.bool)  # last entry of each group of equal critical values
    last[:-1] = crit[1:] != crit[:-1]
    count = (torch.arange(1, crit.numel() + 1, dtype=torch.float64) + base.sum()) / causal
    recall = torch.cumsum(gain[order], 0) + weighted[base].sum()
    d0 = torch.tensor([float(base.sum()) / causal], dtype=torch.float64)
    r0 = weighted[base].sum().reshape(1)
    return torch.cat([d0, count[last]]), torch.cat([r0, recall[last]])


def _noperm_at_density(q1: torch.Tensor, k1: torch.Tensor, config: PBSConfig, target: float,
                       mass_original: torch.Tensor, scale: float | None) -> tuple[float, float]:
    """(density, recall) of plain block selection (no permutation) at ``target`` density.

    q1, k1: (1, 1, N, D); mass_original: (N_b, N_b). Among the plain plans of all thresholds, the
    two that bracket ``target`` (the sparsest with density >= target and the densest below it);
    recall is interpolated linearly in density between them. When even the smallest threshold keeps
    more than ``target``, returns that plan's density and recall.
    """
    n = q1.shape[2]
    bs = config.block_size
    forced, before = plain_selection_order(q1, k1, config.replace(permute=False), scale)
    density, recall = plain_selection_curve(forced, before, mass_original, n, bs)
    hi = int(torch.searchsorted(density, torch.tensor([target], dtype=torch.float64))[0])
    hi = min(hi, density.numel() - 1)
    if hi == 0:
        return float(density[0]), float(recall[0])
    d_lo, d_hi, r_lo, r_hi = float(density[hi - 1]), float(density[hi]), float(recall[hi - 1]), float(recall[hi])
    if d_hi == target:
        return d_hi, r_hi
    t = (target - d_lo) / (d_hi - d_lo)
    return target, r_lo + t * (r_hi - r_lo)


def _causal(n_b: int) -> torch.Tensor:
    return torch.ones(n_b, n_b, dtype=torch.bool).tril()


def verdict(gain: float | None) -> str:
    if gain is None:
        return "n/a"
    if gain > NEUTRAL_BAND:
        return "helped"
    if gain < -NEUTRAL_BAND:
        return "hurt"
    return "neutral"


def plan_heads(q: torch.Tensor, k: torch.Tensor, config: PBSConfig, heads: list[int],
               scale: float | None = None) -> PermutedBlockMask:
    """The rows of ``build_plan(q, k, config)`` for query heads ``heads`` only, without selecting
    blocks for the other heads. q: (1, H_q, N, D), k: (1, H_kv, N, D).

    The permutation needs every query head of a KV group (it averages their key importance), the
    block selection is per query head: so the permutation is computed for the whole layer and the
    selection for the chosen heads, each with its own KV head and permutation row. Returns a plan of
    ``len(heads)`` heads, one permutation row per head.
    """
    h_q, h_kv = q.shape[1], k.shape[1]
    perm = compute_permutation(q, k, config, scale)  # (1, H_perm, N)
    idx = torch.tensor(heads, dtype=torch.long, device=q.device)
    perm = perm[:, idx // (h_q // perm.shape[1])]  # (1, h, N)
    qs, ks = q[:, idx], k[:, idx // (h_q // h_kv)]  # (1, h, N, D) each
    num, kv_idx = select_blocks(qs, ks, perm, config, scale)
    return PermutedBlockMask(perm, num, kv_idx, config.block_size, config.segment_size, q.shape[2])


def analyze(q: torch.Tensor, k: torch.Tensor, config: PBSConfig, heads: list[int], layer: int | None = None,
            scale: float | None = None, compare: bool = True) -> list[HeadView]:
    """Plan one layer with ``config`` and describe the selected query heads.

    q: (1, H_q, N, D) post-RoPE queries; k: (1, H_kv, N, D) keys. ``heads`` index query heads.
    ``compare`` adds the no-permutation plan at equal density (skipped when ``config.permute`` is off).
    Returns one ``HeadView`` per head, in the order given.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != 1:
        raise ValueError(f"expected q (1, H_q, N, D) and k (1, H_kv, N, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    _, h_q, n, d = q.shape
    h_kv = k.shape[1]
    bad = [h for h in heads if not 0 <= h < h_q]
    if bad:
        raise ValueError(f"head {bad[0]} out of range: this layer has {h_q} query heads (0-{h_q - 1})")
    g = h_q // h_kv
    bs = config.block_size
    plan = plan_heads(q, k, config, heads, scale)
    idx = torch.tensor(heads, dtype=torch.long)
    perm = plan.perm[0].cpu()  # (h, N)
    qs = q[0, idx.to(q.device)]
    ks = k[0, (idx // g).to(k.device)]
    original, planned = block_attention_mass(qs, ks, perm.to(q.device), bs, config.segment_size, scale)
    kept = plan.to_dense()[0].cpu()  # (h, N_b, N_b)
    forced = forced_blocks(perm, n, config) & _causal(kept.shape[-1])
    recalls = recall_of(planned, kept, n, bs)
    density_per_head = plan.density_per_head()[0].cpu()
    n_b = kept.shape[-1]
    start = ref.segment_starts(n_b, bs, config.segment_size)
    choice_cols = torch.arange(n_b)[None, :] < start[:, None]
    selectable = choice_cols[None] & ~forced
    has_choice = selectable.any(-1)  # (h, N_b)
    forced_only = has_choice & ~(kept & selectable).any(-1)

    views = []
    for t, h in enumerate(heads):
        density = float(density_per_head[t])
        recall = float(recalls[t])
        np_density = np_recall = gain = None
        if compare and config.permute and n >= config.segment_size:
            np_density, np_recall = _noperm_at_density(q[:, h : h + 1], k[:, h // g : h // g + 1], config,
                                                       density, original[t], scale)
            gain = recall - np_recall
        stats = HeadStats(layer, h, density, recall, int(forced_only[t].sum()), int(has_choice[t].sum()),
                          np_density, np_recall, gain, verdict(gain))
        views.append(HeadView(stats, original[t].numpy(), planned[t].numpy(), kept[t].numpy(), forced[t].numpy(),
                              n, config, h_q, d))
    return views
