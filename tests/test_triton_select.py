"""GPU permutation and block selection (``pbs_kernels.triton.permute`` / ``.select``) vs the reference.

Without a GPU the Triton kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (set in
conftest.py) in fp32 and fp16; on a CUDA machine the same tests run compiled, in bf16 and fp16.

Exactness rule: permutations and kept sets must equal the reference's except where the
reference's own numbers tie within float rounding: keys whose importances are within 1e-5 of each
other may swap inside a segment, and a row's kept set may differ only when a block sits within 1e-5
of the top-p boundary (its mass-before is that close to tau, or its probability ties with the block
on the other side of the boundary); those rows must still keep every forced block, stay causal and
differ by at most one block in count.
"""

from __future__ import annotations

import math

import pytest
import torch

from triton_setup import DEVICE

from pbs_kernels import reference  # noqa: E402
from pbs_kernels.block_mask import PermutedBlockMask  # noqa: E402
from pbs_kernels.config import PBSConfig  # noqa: E402
from pbs_kernels.triton import permute as tperm  # noqa: E402
from pbs_kernels.triton import select as tsel  # noqa: E402
from pbs_kernels.triton.tiles import PermuteTiles, SelectTiles  # noqa: E402

# bf16 is wrong in the interpreter (DESIGN.md); fp32 is what the CPU path is for
DTYPES = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float32, torch.float16]
TIE = 1e-5


def structured_qkv(b: int, h_q: int, h_kv: int, n: int, d: int, dtype, seed: int = 0):
    """q (B, H_q, N, D), k (B, H_kv, N, D) with attention structure, not plain noise: a few
    heavy-hitter key directions that the queries share, a sink-like first token, a local bias."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(3, d, generator=gen)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True) * math.sqrt(d)
    q = 0.6 * torch.randn(b, h_q, n, d, generator=gen)
    q += torch.rand(b, h_q, n, 3, generator=gen) @ dirs
    k = 0.6 * torch.randn(b, h_kv, n, d, generator=gen)
    heavy = torch.rand(b, h_kv, n, 1, generator=gen) < 0.06
    k += heavy * (torch.randint(0, 3, (b, h_kv, n), generator=gen)[..., None] == torch.arange(3)).float() @ dirs
    k[:, :, 0] += dirs[0]  # the sink
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype)


def segment_perm_check(perm: torch.Tensor, n: int, s: int) -> None:
    """perm is a bijection inside every complete segment and the identity after them."""
    full = n // s * s
    pl = perm.long().cpu()
    if full:
        seg = pl[..., :full].reshape(*pl.shape[:-1], full // s, s).sort(-1).values
        base = torch.arange(0, full, s)[:, None] + torch.arange(s)
        assert torch.equal(seg, base.expand_as(seg)), "perm is not a permutation inside each segment"
    assert torch.equal(pl[..., full:], torch.arange(full, n).expand_as(pl[..., full:]))


# -- permutation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h_q,h_kv,per_head,n", [(2, 2, False, 333), (3, 1, False, 256), (8, 2, False, 300),
                                                 (4, 1, True, 290), (3, 3, True, 129)])
def test_key_importance_matches_reference(dtype, h_q, h_kv, per_head, n):
    q, k = structured_qkv(2, h_q, h_kv, n, 64, dtype, seed=n)
    got = tperm.key_importance(q, k, 64, per_head)
    want = reference.key_importance(q, k, 64, per_head)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    # each importance row is a mean of probability rows: it sums to 1
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("span", [128, 512])
def test_key_importance_merges_spans(span):
    """Row statistics over several key spans, merged by log-sum-exp, equal one pass over all keys."""
    q, k = structured_qkv(1, 4, 2, 1500, 64, DTYPES[0], seed=5)
    tiles = PermuteTiles(span=span)  # the launcher rounds it up to its key tile
    torch.testing.assert_close(tperm.key_importance(q, k, 64, tiles=tiles), reference.key_importance(q, k, 64),
                               rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h_q,h_kv,per_head,n", [(3, 1, False, 517), (4, 1, True, 300), (2, 2, False, 64)])
def test_permutation_matches_reference(dtype, h_q, h_kv, per_head, n):
    cfg = PBSConfig(block_size=32, segment_size=64, per_head_permutation=per_head)
    q, k = structured_qkv(1, h_q, h_kv, n, 32, dtype, seed=7)
    got = tperm.compute_permutation(q, k, cfg)
    imp = reference.key_importance(q, k, cfg.block_size, per_head)
    want = reference.segment_permutation(imp, cfg.segment_size)
    assert got.dtype == torch.int32 and got.shape == want.shape == (1, h_q if per_head else h_kv, n)
    segment_perm_check(got, n, cfg.segment_size)
    # slot by slot, the reference's importance of the key placed there agrees: a different key is
    # only allowed where two importances tie within rounding
    tol = TIE * imp.amax(-1, keepdim=True)
    diff = (imp.gather(-1, got.long()) - imp.gather(-1, want.long())).abs()
    assert bool((diff <= tol).all()), f"max importance gap {diff.max().item():.3g} > tie tolerance"
    assert (got == want).float().mean().item() > 0.9  # ties are rare in structured inputs


def test_permutation_short_or_off_is_identity():
    q, k = structured_qkv(1, 2, 1, 50, 32, DTYPES[0])
    for cfg in (PBSConfig(block_size=16, segment_size=64), PBSConfig(block_size=16, segment_size=32, permute=False)):
        perm = tperm.compute_permutation(q, k, cfg)
        assert torch.equal(perm.cpu(), torch.arange(50, dtype=torch.int32).expand(1, 1, 50))


@pytest.mark.parametrize("seg", [64, 128])
def test_segment_sort_equals_the_stable_reference_sort(seg):
    """The fused per-segment sort is torch.sort(descending, stable) exactly, ties included: scores rounded
    to a few values (many exact ties), +0.0 / -0.0 (equal to torch.sort), NaNs (first, in order), +-inf,
    and a trailing partial segment (identity)."""
    gen = torch.Generator().manual_seed(seg)
    n = 2 * seg + 17  # two full segments and a partial one (the interpreter sorts slowly: few segments)
    scores = (torch.randn(2, 3, n, generator=gen) * 2).round() / 2  # ~15 distinct values per segment
    scores[0, 0, 3:12:2], scores[0, 0, 4:12:2] = 0.0, -0.0  # interleaved zeros of both signs
    scores[1, 2, seg:2 * seg:3] = -0.0
    scores[0, 1, [5, 9, seg + 1]] = float("nan")
    if DEVICE == "cpu":  # NaNs with the sign bit set (0xffc00000, x86's default NaN) or another payload
        # (0x7f800001): torch.sort on the CPU puts every NaN first, as the kernel does; CUDA's radix sort
        # orders NaNs by their bits (sign-set ones last), but CUDA's own arithmetic only makes 0x7fffffff
        scores[0, 1, [2, seg + 4]] = torch.tensor([-4194304, 0x7F800001], dtype=torch.int32).view(torch.float32)
    scores[1, 0, [0, 7]], scores[1, 0, [2, 8]] = float("inf"), float("-inf")
    scores[0, 2, :seg] = 1.0  # one segment all tied: stays in order
    scores = scores.to(DEVICE)
    want = reference.segment_permutation(scores, seg)
    got = tperm.segment_permutation(scores, seg, fused=True)
    assert got.dtype == torch.int32 and got.shape == want.shape
    assert torch.equal(got, want)
    # fp16 scores widen exactly to the kernel's fp32 (two heads will do)
    half = scores[:1, :2].half()
    assert torch.equal(tperm.segment_permutation(half, seg, fused=True), reference.segment_permutation(half, seg))
    with pytest.raises(ValueError, match="power-of-two"):
        tperm.segment_permutation(scores, seg - 16, fused=True)


# -- selection -----------------------------------------------------------------------------------


def forced_blocks(n_b: int, per_seg: int, local: int, sink_blocks: torch.Tensor | None) -> torch.Tensor:
    """Bool (B, H, N_b, N_b) of forced blocks, from the definition: the diagonal segment up to i,
    ``local`` blocks before it and the sink block (when it precedes the diagonal segment)."""
    i = torch.arange(n_b)[:, None]
    j = torch.arange(n_b)[None, :]
    start = i // per_seg * per_seg
    forced = ((j >= start) & (j <= i)) | ((j < start) & (j >= start - local))
    forced = forced.expand(*sink_blocks.shape, n_b, n_b).clone() if sink_blocks is not None else forced
    if sink_blocks is not None:
        forced |= (j < start) & (j == sink_blocks[..., None, None])
    return forced


def ranking(q, k_perm, perm, cfg):
    """fp64 twin of the reference ranking: (probs, forced, mass_before) per (B, H_q, N_b, N_b);
    mass_before[j] = mass ranked before block j (forced first unless ``cfg.forced_in_top_p`` is off,
    then descending probability)."""
    b, h_q, n, d = q.shape
    g = h_q // k_perm.shape[1]
    bs = cfg.block_size
    n_b = -(-n // bs)
    qb = reference.pool_blocks(q, bs).double()
    kb = reference.pool_blocks(k_perm, bs).double().repeat_interleave(g, 1)
    i = torch.arange(n_b)[:, None]
    j = torch.arange(n_b)[None, :]
    cand = j < i // (cfg.segment_size // bs) * (cfg.segment_size // bs)
    probs = (qb @ kb.transpose(-1, -2) / math.sqrt(d)).masked_fill(~cand, float("-inf")).softmax(-1).nan_to_num(0.0)
    sink = reference.sink_block(perm, bs).repeat_interleave(g, 1).cpu() if cfg.sink else None
    forced = forced_blocks(n_b, cfg.segment_size // bs, cfg.local_blocks, sink).expand_as(probs)
    ranked = torch.where(forced, probs + 2.0, probs) if cfg.forced_in_top_p else probs
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    p_sorted = probs.gather(-1, order)
    mass_before = torch.zeros_like(probs).scatter(-1, order, p_sorted.cumsum(-1) - p_sorted)
    return probs, forced, mass_before, cand


def assert_packed(num: torch.Tensor, idx: torch.Tensor) -> None:
    """kv_indices rows: the kept blocks ascending, then the others ascending; a permutation of 0..N_b-1."""
    n_b = idx.shape[-1]
    for row_num, row in zip(num.reshape(-1).tolist(), idx.reshape(-1, n_b).tolist()):
        kept, rest = row[:row_num], row[row_num:]
        assert kept == sorted(kept) and rest == sorted(rest) and sorted(row) == list(range(n_b))


def assert_selection_matches(q, k, perm, cfg, got, want):
    """Equal kept sets, except rows whose reference boundary is within TIE (see module docstring)."""
    num, idx = (t.cpu() for t in got)
    r_num, r_idx = (t.cpu() for t in want)
    assert num.dtype == idx.dtype == torch.int32 and num.shape == r_num.shape and idx.shape == r_idx.shape
    assert_packed(num, idx)
    dense = PermutedBlockMask(perm, num, idx, cfg.block_size, cfg.segment_size, q.shape[2]).to_dense().cpu()
    r_dense = PermutedBlockMask(perm, r_num, r_idx, cfg.block_size, cfg.segment_size, q.shape[2]).to_dense().cpu()
    k_perm = reference.permute_keys(k.cpu().float(), perm.cpu())
    probs, forced, mass_before, cand = ranking(q.cpu().float(), k_perm, perm.cpu(), cfg)
    assert bool((dense | ~forced).all()), "a forced block was dropped"
    assert bool((~dense | cand | forced).all()), "a non-causal block was kept"
    differ = (dense != r_dense).any(-1)
    for bh_i in differ.nonzero().tolist():
        d_row, r_row = dense[tuple(bh_i)], r_dense[tuple(bh_i)]
        p, mb = probs[tuple(bh_i)], mass_before[tuple(bh_i)]
        flipped = (d_row != r_row).nonzero().flatten()
        kept_p = p[r_row & ~forced[tuple(bh_i)]]
        dropped_p = p[~r_row & cand[tuple(bh_i)] & ~forced[tuple(bh_i)]]
        boundary_tie = (kept_p.numel() and dropped_p.numel()
                        and (kept_p.min() - dropped_p.max()).abs().item() <= TIE)
        near = ((mb[flipped] - cfg.threshold).abs() <= TIE).all().item()
        assert near or boundary_tie, f"row {bh_i} differs from the reference away from the top-p boundary"
        assert abs(int(d_row.sum()) - int(r_row.sum())) <= 1


CASES = [
    # (B, H_q, H_kv, N, block, segment, options)
    (1, 2, 2, 1000, 32, 64, {}),
    (2, 3, 1, 700, 16, 64, {"local_blocks": 2}),
    (1, 4, 1, 517, 16, 32, {"per_head_permutation": True}),
    (1, 4, 1, 333, 16, 48, {"sink": False, "threshold": 0.5}),
    (1, 3, 3, 40, 16, 64, {}),  # N < one segment: identity permutation, diagonal only
    (1, 2, 1, 10, 16, 32, {}),  # N < one block
    # the published method: one permutation per query head, top-p before the sink is added (GQA 1-8)
    (1, 2, 2, 999, 16, 32, {"per_head_permutation": True, "forced_in_top_p": False}),
    (2, 4, 2, 517, 16, 64, {"per_head_permutation": True, "forced_in_top_p": False}),
    (1, 8, 1, 333, 16, 32, {"per_head_permutation": True, "forced_in_top_p": False, "threshold": 0.5}),
    (1, 6, 2, 401, 32, 64, {"forced_in_top_p": False, "local_blocks": 1}),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-Hq{c[1]}-Hkv{c[2]}-N{c[3]}-bs{c[4]}-S{c[5]}-{c[6]}")
def test_select_matches_reference(dtype, case):
    b, h_q, h_kv, n, bs, s, opts = case
    if s % bs:
        s = bs * (s // bs)
    cfg = PBSConfig(block_size=bs, segment_size=s, **opts)
    q, k = structured_qkv(b, h_q, h_kv, n, 32, dtype, seed=n + h_q)
    perm = tperm.compute_permutation(q, k, cfg)
    got = tsel.select_blocks(q, k, perm, cfg)
    want = reference.select_blocks(q, reference.permute_keys(k, perm), perm, cfg)
    assert_selection_matches(q, k, perm, cfg, got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_one_keeps_every_causal_block(dtype):
    cfg = PBSConfig(block_size=16, segment_size=32, threshold=1.0)
    q, k = structured_qkv(1, 4, 2, 300, 32, dtype)
    perm = tperm.compute_permutation(q, k, cfg)
    num, idx = (t.cpu() for t in tsel.select_blocks(q, k, perm, cfg))
    n_b = 19
    assert torch.equal(num, torch.arange(1, n_b + 1, dtype=torch.int32).expand(1, 4, n_b))
    assert torch.equal(idx, torch.arange(n_b, dtype=torch.int32).expand(1, 4, n_b, n_b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sink,local", [(True, 0), (False, 1)])
def test_tiny_threshold_keeps_only_forced_blocks(dtype, sink, local):
    cfg = PBSConfig(block_size=16, segment_size=32, threshold=1e-6, sink=sink, local_blocks=local)
    q, k = structured_qkv(2, 3, 1, 250, 32, dtype)
    perm = tperm.compute_permutation(q, k, cfg)
    num, idx = tsel.select_blocks(q, k, perm, cfg)
    plan = PermutedBlockMask(perm.cpu(), num.cpu(), idx.cpu(), 16, 32, 250)
    sink_blocks = reference.sink_block(perm, 16).repeat_interleave(3, 1).cpu() if sink else None
    want = forced_blocks(16, 2, local, sink_blocks).expand(2, 3, 16, 16)
    assert torch.equal(plan.to_dense().cpu(), want)


@pytest.mark.parametrize("tiles", [PermuteTiles(block_m=16, block_n=32, num_warps=2, span=64), SelectTiles(
    tile_elements=512, top_p_warps=1, score_block=16)], ids=["permute", "select"])
def test_other_tiles_give_the_reference_plan(tiles):
    """A launch with other tiles (``tiles=``, as benchmarks/select_bench.py --sweep passes them) plans as the
    reference does (the interpreter widens some tiles; a GPU runs these)."""
    cfg = PBSConfig(block_size=16, segment_size=32, local_blocks=1)
    q, k = structured_qkv(1, 4, 2, 333, 32, DTYPES[0], seed=3)
    if isinstance(tiles, PermuteTiles):
        perm = tperm.compute_permutation(q, k, cfg, tiles=tiles)
        imp = reference.key_importance(q, k, cfg.block_size)
        torch.testing.assert_close(tperm.key_importance(q, k, cfg.block_size, tiles=tiles), imp, rtol=1e-4, atol=1e-7)
        segment_perm_check(perm, 333, cfg.segment_size)
        got = tsel.select_blocks(q, k, perm, cfg)
    else:
        perm = tperm.compute_permutation(q, k, cfg)
        got = tsel.select_blocks(q, k, perm, cfg, tiles=tiles)
    want = reference.select_blocks(q, reference.permute_keys(k, perm), perm, cfg)
    assert_selection_matches(q, k, perm, cfg, got, want)


def test_chunked_scores_equal_one_chunk():
    """The score buffer bounds memory by chunks of query blocks; chunking changes nothing."""
    cfg = PBSConfig(block_size=16, segment_size=32, local_blocks=1)
    q, k = structured_qkv(1, 2, 1, 600, 32, DTYPES[0])
    perm = tperm.compute_permutation(q, k, cfg)
    whole = tsel.select_blocks(q, k, perm, cfg)
    n_b = 38
    chunked = tsel.select_blocks(q, k, perm, cfg, score_bytes=4 * 2 * n_b * 5)  # chunks of 5 query blocks
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


@pytest.mark.parametrize("r0,r1,score_rows", [(0, 38, 38), (5, 17, 4), (30, 38, 3), (37, 38, 38)])
def test_row_range_equals_those_rows_of_the_whole_plan(r0, r1, score_rows):
    """rows=(r0, r1) plans query blocks r0..r1-1 only (long sequences are planned in such chunks),
    also when the score buffer splits the range again."""
    cfg = PBSConfig(block_size=16, segment_size=32, local_blocks=1)
    q, k = structured_qkv(2, 2, 1, 600, 32, DTYPES[0], seed=3)  # 38 query blocks, the last one partial
    perm = tperm.compute_permutation(q, k, cfg)
    num, idx = tsel.select_blocks(q, k, perm, cfg)
    part_num, part_idx = tsel.select_blocks(q, k, perm, cfg, rows=(r0, r1), score_bytes=4 * 2 * 2 * 38 * score_rows)
    assert part_num.shape == (2, 2, r1 - r0) and part_idx.shape == (2, 2, r1 - r0, 38)
    assert torch.equal(part_num, num[:, :, r0:r1]) and torch.equal(part_idx, idx[:, :, r0:r1])
    with pytest.raises(ValueError, match="rows must satisfy"):
        tsel.select_blocks(q, k, perm, cfg, rows=(3, 3))


def test_row_chunks_pool_once_and_cover_the_plan(monkeypatch):
    cfg = PBSConfig(block_size=16, segment_size=32, local_blocks=1)
    q, k = structured_qkv(1, 2, 1, 600, 32, DTYPES[0], seed=4)
    perm = tperm.compute_permutation(q, k, cfg)
    num, idx = tsel.select_blocks(q, k, perm, cfg)
    pools = []
    real = tsel.pool_blocks
    monkeypatch.setattr(tsel, "pool_blocks", lambda *a, **kw: pools.append(1) or real(*a, **kw))
    chunks = list(tsel.select_row_chunks(q, k, perm, cfg, None, 10))
    assert [r0 for r0, _, _ in chunks] == [0, 10, 20, 30] and len(pools) == 2  # q and k, once
    assert torch.equal(torch.cat([c[1] for c in chunks], -1), num)
    assert torch.equal(torch.cat([c[2] for c in chunks], -2), idx)


def test_pooling_gathers_through_the_permutation():
    q, k = structured_qkv(2, 4, 2, 201, 32, DTYPES[0])
    cfg = PBSConfig(block_size=16, segment_size=32, per_head_permutation=True)
    perm = tperm.compute_permutation(q, k, cfg)  # (2, 4, 201): per query head
    got = tsel.pool_blocks(k, 16, perm)
    want = reference.pool_blocks(reference.permute_keys(k, perm), 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tsel.pool_blocks(q, 16), reference.pool_blocks(q, 16), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_head", [False, True])
def test_pooling_pass_copies_keys_and_values_in_permuted_order(per_head):
    """``pool_and_copy``: the pooled keys of ``pool_blocks`` and, from the same gather, K and V in
    permuted order exactly as the reference gathers them; inputs in transformers' strided layout."""
    q, k = structured_qkv(2, 4, 2, 201, 32, DTYPES[-1], seed=5)
    v = torch.randn(k.shape, generator=torch.Generator().manual_seed(6)).to(k.device, k.dtype)
    kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (k, v))
    cfg = PBSConfig(block_size=16, segment_size=32, per_head_permutation=per_head)
    perm = tperm.compute_permutation(q, k, cfg)  # (2, 4 or 2, 201)
    k_bar, k_perm, v_perm = tsel.pool_and_copy(kt, vt, 16, perm)
    assert torch.equal(k_bar, tsel.pool_blocks(k, 16, perm))
    assert k_perm.is_contiguous() and v_perm.is_contiguous()
    assert torch.equal(k_perm, reference.permute_keys(k, perm))
    assert torch.equal(v_perm, reference.permute_keys(v, perm))
    with pytest.raises(ValueError, match="power-of-two"):
        tsel.pool_and_copy(k[..., :24], v[..., :24], 16, perm)


def test_strided_inputs_from_transformers_layout():
    """q, k as (B, N, H, D) tensors viewed as (B, H, N, D), as attention hooks receive them."""
    cfg = PBSConfig(block_size=16, segment_size=32)
    q, k = structured_qkv(1, 4, 2, 200, 32, DTYPES[0])
    qt, kt = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    perm = tperm.compute_permutation(q, k, cfg)
    assert torch.equal(tperm.compute_permutation(qt, kt, cfg), perm)
    for a, b_ in zip(tsel.select_blocks(qt, kt, perm, cfg), tsel.select_blocks(q, k, perm, cfg)):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("published", [False, True])
def test_dispatch_runs_triton_path(monkeypatch, published):
    """pbs_kernels.attention.build_plan with PBS_BACKEND=triton goes through these launchers and
    matches the reference plan, the published options (per-query-head permutation, forced blocks
    added after top-p) included."""
    from pbs_kernels import attention

    monkeypatch.setenv("PBS_BACKEND", "triton")
    cfg = PBSConfig(block_size=16, segment_size=32, per_head_permutation=published, forced_in_top_p=not published)
    q, k = structured_qkv(1, 3, 1, 180, 32, DTYPES[0])
    calls = []
    real = tsel.select_blocks
    monkeypatch.setattr(tsel, "select_blocks", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    plan = attention.build_plan(q, k, cfg)
    assert calls, "the Triton selection did not run"
    perm = reference.segment_permutation(reference.key_importance(q, k, 16, published), 32)
    assert plan.perm.shape == perm.shape == (1, 3 if published else 1, 180)
    want = reference.select_blocks(q, reference.permute_keys(k, plan.perm), plan.perm, cfg)
    segment_perm_check(plan.perm, 180, 32)
    assert (plan.perm == perm).float().mean() > 0.9
    assert_selection_matches(q, k, plan.perm, cfg, (plan.kv_num_blocks, plan.kv_indices), want)


def test_rejects_mismatched_heads():
    cfg = PBSConfig(block_size=16, segment_size=32)
    q, k = structured_qkv(1, 4, 2, 64, 32, DTYPES[0])
    bad = torch.zeros(1, 3, 64, dtype=torch.int32, device=q.device)
    with pytest.raises(ValueError, match="heads must nest"):
        tsel.select_blocks(q, k, bad, cfg)


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.85])
def test_exact_ties_rank_by_block_index(threshold):
    """Keys repeating with the segment period give key blocks with bit-identical pooled keys, so
    block probabilities tie exactly; the reference's stable sort keeps the lower block index first.
    q and k lie on a grid of halves, so that every pooled dot product is exact in fp32 whatever the
    summation order: a CPU BLAS (the interpreter's tl.dot) may sum identical columns differently."""
    cfg = PBSConfig(block_size=16, segment_size=64, threshold=threshold)
    q, k = (torch.round(2 * x) / 2 for x in structured_qkv(1, 2, 1, 512, 32, DTYPES[0], seed=3))
    k = k[:, :, :64].repeat(1, 1, 8, 1)
    perm = tperm.compute_permutation(q, k, cfg)
    num, idx = tsel.select_blocks(q, k, perm, cfg)
    r_num, r_idx = reference.select_blocks(q, reference.permute_keys(k, perm), perm, cfg)
    k_bar = reference.pool_blocks(reference.permute_keys(k, perm), 16)
    assert torch.equal(k_bar[:, :, 4:8], k_bar[:, :, 8:12])  # the ties are real
    assert torch.equal(num.cpu(), r_num.cpu()) and torch.equal(idx.cpu(), r_idx.cpu())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h_q,h_kv", [(3, 3), (8, 1)])
def test_forced_blocks_outside_top_p_match_a_loop_oracle(dtype, h_q, h_kv):
    """forced_in_top_p off (published): per row, top-p over the off-diagonal pooled probabilities in
    descending order (the sink block competes like any other), then the forced blocks are added. The
    oracle is a Python loop over rows, in fp64 from the pooled q and k; rows whose boundary is within
    TIE may differ as in ``assert_selection_matches``."""
    cfg = PBSConfig(block_size=16, segment_size=32, threshold=0.7, per_head_permutation=True, forced_in_top_p=False,
                    local_blocks=1)
    n = 301
    q, k = structured_qkv(1, h_q, h_kv, n, 32, dtype, seed=11)
    perm = tperm.compute_permutation(q, k, cfg)
    num, idx = (t.cpu() for t in tsel.select_blocks(q, k, perm, cfg))
    dense = PermutedBlockMask(perm.cpu(), num, idx, 16, 32, n).to_dense()
    qb = reference.pool_blocks(q.cpu().float(), 16).double()
    kb = reference.pool_blocks(reference.permute_keys(k.cpu().float(), perm.cpu()), 16).double()
    sink = reference.sink_block(perm.cpu(), 16)
    n_b, rows_checked = -(-n // 16), 0
    for h in range(h_q):
        for i in range(n_b):
            start = i // 2 * 2
            if start == 0:
                continue
            s = (qb[0, h, i] @ kb[0, h, :start].T / math.sqrt(32)).softmax(-1).tolist()
            order = sorted(range(start), key=lambda j: (-s[j], j))
            keep, acc, boundary = set(), 0.0, []
            for j in order:
                if acc < cfg.threshold - 1e-6:
                    keep.add(j)
                boundary.append(abs(acc - cfg.threshold))
                acc += s[j]
            keep |= {start - 1, int(sink[0, h])} | set(range(start, i + 1))
            got = set(torch.nonzero(dense[0, h, i]).flatten().tolist())
            if got != keep:
                assert min(boundary) <= TIE and len(got ^ keep) == 1, (h, i, sorted(got), sorted(keep))
            rows_checked += got == keep
    assert rows_checked > 0.9 * h_q * (n_b - 2)

