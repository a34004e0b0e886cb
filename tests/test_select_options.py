"""Selection options beyond the published method, against loop-level oracles written here."""

from __future__ import annotations

import math

import pytest
import torch

from pbs_kernels import PBSConfig, build_plan, pbs_attention
from pbs_kernels import reference as R
from pbs_kernels.block_mask import PermutedBlockMask
from pbs_kernels import select as select_dispatch
from selection_oracle import antidiagonal_masses

SMALL = PBSConfig(block_size=16, segment_size=32, threshold=0.9)


def qkv(b, h_q, h_kv, n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g) for h in (h_q, h_kv, h_kv)]


def exact_probs(q, k):
    """fp64 causal attention probabilities (B, H_q, N, N) over ORIGINAL key positions."""
    g = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(g, 1)
    s = q.double() @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    n = q.shape[2]
    return s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")).softmax(-1)


def oracle_block_mass(q, k, perm, cfg, rows):
    """Loop oracle: mass per key block (in the layout query row r reads) of each row. (B, H_q, R, N_b)."""
    p = exact_probs(q, k)
    b, h_q, n, _ = q.shape
    bs, per_seg = cfg.block_size, cfg.segment_size // cfg.block_size
    n_b = -(-n // bs)
    g = h_q // perm.shape[1]
    out = torch.zeros(b, h_q, len(rows), n_b, dtype=torch.float64)
    for bi in range(b):
        for h in range(h_q):
            for ri, r in enumerate(rows):
                diag = (r // bs) // per_seg * per_seg
                for j in range(n_b):
                    slots = range(j * bs, min(n, (j + 1) * bs))
                    keys = [s if j >= diag else int(perm[bi, h // g, s]) for s in slots]
                    out[bi, h, ri, j] = sum(float(p[bi, h, r, key]) for key in keys)
    return out


# -- config -------------------------------------------------------------------------------------


def test_config_defaults_run_the_fused_selection():
    cfg = PBSConfig()
    assert (cfg.score, cfg.importance_rows, cfg.permute_heads, cfg.dense_layers) == ("pooled", "last", "all", ())
    assert not cfg.beyond_published()


@pytest.mark.parametrize("change", [{"score": "sampled"}, {"score": "mean_query"}, {"importance_rows": "strided"},
                                    {"permute_heads": "auto"}])
def test_new_options_route_to_reference(change):
    assert PBSConfig(**change).beyond_published()


def test_config_round_trips_dense_layers_and_rejects_bad_values():
    cfg = PBSConfig.from_dict({"dense_layers": [0, 1], "score": "sampled"})
    assert cfg.dense_layers == (0, 1)
    assert cfg.for_layer(0) is None and cfg.for_layer(2) is cfg and cfg.for_layer(None) is cfg
    assert PBSConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="score must be one of"):
        PBSConfig(score="max")
    with pytest.raises(ValueError, match="sample_rows"):
        PBSConfig(block_size=16, segment_size=32, sample_rows=17)
    with pytest.raises(ValueError, match="dense_layers"):
        PBSConfig(dense_layers=(-1,))


# -- sampled scoring ----------------------------------------------------------------------------


def test_sample_rows_are_strided_and_start_at_each_blocks_last_row():
    rows = R.sample_rows(40, 16, 4)
    assert rows.tolist() == [[15, 11, 7, 3], [31, 27, 23, 19], [39, 39, 39, 35]]


def test_geometric_sample_rows_start_at_the_last_row_then_hug_the_blocks_start():
    rows = R.sample_rows(40, 16, 5, spacing="geometric")
    assert rows.tolist() == [[15, 7, 3, 1, 0], [31, 23, 19, 17, 16], [39, 39, 35, 33, 32]]
    with pytest.raises(ValueError, match="at most 5 rows in a block of 16"):
        PBSConfig(block_size=16, segment_size=32, score="sampled", sample_rows=6, sample_spacing="geometric")
    with pytest.raises(ValueError, match="sample_spacing must be one of strided, geometric"):
        PBSConfig(sample_spacing="random")


@pytest.mark.parametrize("permute", [True, False])
def test_sampled_block_mass_matches_loop_oracle(permute):
    q, k, _ = qkv(1, 4, 2, 80, 8, seed=1)
    cfg = SMALL.replace(score="sampled", sample_rows=4, permute=permute)
    perm = R.compute_permutation(q, k, cfg)
    kp = R.permute_keys(k, perm).repeat_interleave(2, 1)
    mass = R.sampled_block_mass(q, k.repeat_interleave(2, 1), kp, cfg, 0, 5, 1 / math.sqrt(8))  # (1, 4, 5, 5)
    rows = R.sample_rows(80, 16, 4)
    oracle = oracle_block_mass(q, k, perm, cfg, rows.reshape(-1).tolist()).reshape(1, 4, 5, 4, 5).mean(3)
    torch.testing.assert_close(mass.double(), oracle, atol=1e-5, rtol=1e-4)
    if permute:
        assert not torch.equal(perm, R.identity_permutation(1, 2, 80, q.device))


@pytest.mark.parametrize("n, h_q, h_kv, rows", [(83, 4, 2, 4), (64, 2, 2, 2), (50, 8, 1, 8)])
def test_antidiagonal_mass_matches_loop_oracle(n, h_q, h_kv, rows):
    q, k, _ = qkv(1, h_q, h_kv, n, 8, seed=n)
    cfg = SMALL.replace(score="antidiagonal", sample_rows=rows)
    perm = R.compute_permutation(q, k, cfg)
    assert not torch.equal(perm, R.identity_permutation(1, h_kv, n, q.device))
    g = h_q // h_kv
    kp = R.permute_keys(k, perm).repeat_interleave(g, 1)
    n_b = -(-n // 16)
    mass = R.sampled_block_mass(q, k.repeat_interleave(g, 1), kp, cfg, 0, n_b, 1 / math.sqrt(8), per_row=True)
    torch.testing.assert_close(mass.double(), antidiagonal_masses(q, k, perm, cfg), atol=1e-5, rtol=1e-4)


def test_antidiagonal_rows_must_divide_the_block():
    with pytest.raises(ValueError, match="sample_rows must divide it"):
        PBSConfig(block_size=16, segment_size=32, score="antidiagonal", sample_rows=3)
    cfg = PBSConfig(score="antidiagonal")
    assert cfg.beyond_published() and not cfg.needs_reference_selection()  # the sampled GPU path runs it


def test_mean_query_mass_uses_the_pooled_query_against_every_key():
    q, k, _ = qkv(1, 2, 1, 64, 8, seed=2)
    cfg = SMALL.replace(score="mean_query", permute=False)
    kk = k.repeat_interleave(2, 1)
    mass = R.sampled_block_mass(q, kk, kk, cfg, 0, 4, 1 / math.sqrt(8))  # (1, 2, 4, 4)
    q_bar = q.reshape(1, 2, 4, 16, 8).mean(3).double()
    for i in range(4):
        last = i * 16 + 15
        p = (q_bar[:, :, i : i + 1] @ kk[:, :, : last + 1].double().transpose(-1, -2) / math.sqrt(8)).softmax(-1)
        expect = torch.nn.functional.pad(p, (0, 63 - last)).reshape(1, 2, 4, 16).sum(-1)
        torch.testing.assert_close(mass[:, :, i].double(), expect, atol=1e-6, rtol=1e-5)


def test_sampled_with_every_row_keeps_tau_of_each_blocks_mean_attention():
    """sample_rows = block_size makes the estimate exact for the block mean, so the kept blocks must
    cover at least tau of the mean attention of each query block (checked with attention_recall)."""
    q, k, _ = qkv(1, 3, 1, 128, 16, seed=3)
    densities = []
    for tau in (0.5, 0.8, 0.95):
        cfg = SMALL.replace(score="sampled", sample_rows=16, threshold=tau, threshold_scope="total")
        plan = R.build_plan(q, k, cfg)
        recall = R.attention_recall(q, k, plan, torch.arange(128))  # (1, 3, 128)
        per_block = recall.reshape(1, 3, 8, 16).mean(-1)
        assert (per_block >= tau - 1e-4).all(), (tau, per_block.min())
        densities.append(plan.density())
    assert densities[0] < densities[-1] and densities[0] < 1.0  # a real selection, sparser at lower tau


def test_sampled_at_threshold_one_is_dense_attention():
    q, k, v = qkv(1, 4, 2, 100, 16, seed=4)
    plan = build_plan(q, k, SMALL.replace(score="sampled", threshold=1.0))
    assert plan.density() == 1.0
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           is_causal=True)
    torch.testing.assert_close(pbs_attention(q, k, v, plan), ref, atol=2e-5, rtol=1e-4)


def test_sampled_selection_keeps_forced_blocks_and_packs_left():
    q, k, _ = qkv(2, 4, 2, 150, 16, seed=5)
    cfg = SMALL.replace(score="sampled", threshold=0.3, local_blocks=1)
    plan = build_plan(q, k, cfg)
    dense = plan.to_dense()
    n_b = dense.shape[-1]
    for i in range(n_b):
        diag = i // 2 * 2
        assert dense[:, :, i, diag : i + 1].all()  # diagonal segment up to the query block
        assert not dense[:, :, i, i + 1 :].any()  # nothing acausal
        if diag >= 1:
            assert dense[:, :, i, diag - 1].all()  # the forced local block
    num, idx = plan.kv_num_blocks, plan.kv_indices
    for b, h, i in [(0, 0, 9), (1, 3, 7)]:
        kept = idx[b, h, i, : num[b, h, i]]
        assert torch.all(kept[1:] > kept[:-1])


# -- permutation options ------------------------------------------------------------------------


def test_strided_importance_rows_and_scores():
    rows = R.importance_rows(1000, 16, 256, "strided")
    assert rows[0] == 256 and rows[-1] == 999 and len(rows) == 16
    assert R.importance_rows(1000, 16, 256, "last").tolist() == list(range(984, 1000))
    assert R.importance_rows(200, 16, 256, "strided").tolist() == list(range(184, 200))  # too short: last
    q, k, _ = qkv(1, 4, 2, 300, 8, seed=6)
    rows = torch.tensor([40, 150, 299])
    imp = R.key_importance(q, k, 16, rows=rows)
    p = exact_probs(q, k)[:, :, rows]  # (1, 4, 3, N)
    torch.testing.assert_close(imp.double(), p.reshape(1, 2, 2 * 3, 300).mean(2), atol=1e-6, rtol=1e-5)


def oracle_blocks_to_cover(masses, tau):
    out = []
    for row in masses:
        total, acc, cnt = sum(row), 0.0, 0
        for m in sorted(row, reverse=True):
            if acc >= tau * total - 1e-12:
                break
            acc += m
            cnt += 1
        out.append(cnt)
    return out


def test_blocks_to_cover_matches_loop():
    g = torch.Generator().manual_seed(7)
    mass = torch.rand(20, 9, generator=g) ** 3
    for tau in (0.3, 0.9, 1.0):
        assert R.blocks_to_cover(mass, tau).tolist() == oracle_blocks_to_cover(mass.tolist(), tau)


def needle_qk(n=512, d=16, every=13, local=False):
    """Keys that every query wants: scattered needles (permutation gathers them), or, with ``local``,
    a smooth positional code where each query attends to its own neighbourhood (permutation by the
    last block's needs scatters that)."""
    g = torch.Generator().manual_seed(8)
    if local:
        pos = torch.arange(n, dtype=torch.float32)[:, None]
        freq = torch.linspace(0.002, 0.02, d // 2)[None, :]
        code = torch.cat([torch.cos(pos * freq), torch.sin(pos * freq)], -1) * 6.0
        return code[None, None].clone(), code[None, None].clone()
    u = torch.randn(d, generator=g)
    k = torch.randn(1, 1, n, d, generator=g) * 0.1
    k[0, 0, ::every] += 3 * u
    q = u.expand(1, 1, n, d).clone() + 0.1 * torch.randn(1, 1, n, d, generator=g)
    return q, k


def test_auto_heads_keep_permutation_where_it_gathers_needles():
    q, k = needle_qk()
    cfg = PBSConfig(block_size=16, segment_size=64, permute_heads="auto")
    perm = R.segment_permutation(R.key_importance(q, k, 16), 64)
    assert R.permutation_helps(q, k, perm, cfg).all()
    assert torch.equal(R.compute_permutation(q, k, cfg), perm)


def test_auto_heads_drop_permutation_where_it_hurts_or_does_nothing():
    cfg = PBSConfig(block_size=16, segment_size=64, permute_heads="auto")
    q0 = torch.zeros(1, 2, 512, 16)  # uniform attention: permuting cannot lower the block count
    k0 = torch.randn(1, 2, 512, 16, generator=torch.Generator().manual_seed(9))
    assert not R.permutation_helps(q0, k0, R.compute_permutation(q0, k0, cfg.replace(permute_heads="all")), cfg).any()
    assert torch.equal(R.compute_permutation(q0, k0, cfg), R.identity_permutation(1, 2, 512, q0.device))


def test_auto_heads_decide_per_head_against_a_loop_count():
    q, k, _ = qkv(1, 4, 2, 256, 8, seed=10)
    q[:, :2], k[:, :1] = needle_qk(256, 8)[0].expand(1, 2, -1, -1), needle_qk(256, 8)[1]
    cfg = PBSConfig(block_size=16, segment_size=32, permute_heads="auto", threshold=0.8)
    perm = R.compute_permutation(q, k, cfg.replace(permute_heads="all"))
    helps = R.permutation_helps(q, k, perm, cfg)
    # oracle: per query head, the mean over the same rows of the loop-counted blocks, both layouts
    rows = torch.unique(torch.linspace(32, 255, 64).round().long()).tolist()
    p = exact_probs(q, k)
    gains = []
    for h in range(4):
        counts = []
        for layout in (torch.arange(256), perm[0, h // 2].long()):
            per_row = []
            for r in rows:
                earlier = r // 32 * 32
                masses = [sum(float(p[0, h, r, int(layout[s])]) for s in range(j * 16, j * 16 + 16)
                              if int(layout[s]) < earlier) for j in range(16)]
                per_row.append(oracle_blocks_to_cover([masses], 0.8)[0] if sum(masses) > 0 else 0)
            counts.append(sum(per_row) / len(per_row))
        gains.append(counts[0] - counts[1])
    expect = [(gains[0] + gains[1]) / 2 > 0, (gains[2] + gains[3]) / 2 > 0]
    assert helps[0].tolist() == expect
    assert expect[0]  # the needle head


# -- dispatch ---------------------------------------------------------------------------------


def test_dispatch_sends_new_options_to_the_reference_even_on_the_gpu_path(monkeypatch):
    q, k, _ = qkv(1, 4, 2, 96, 16, seed=11)
    cfg = SMALL.replace(score="sampled", permute_heads="auto", importance_rows="strided")
    monkeypatch.setattr(select_dispatch, "use_triton", lambda x: True)
    from pbs_kernels import permute as permute_dispatch

    monkeypatch.setattr(permute_dispatch, "use_triton", lambda x: True)
    perm = permute_dispatch.compute_permutation(q, k, cfg)
    num, idx = select_dispatch.select_blocks(q, k, perm, cfg)
    ref = R.build_plan(q, k, cfg)
    assert torch.equal(perm, ref.perm) and torch.equal(num, ref.kv_num_blocks) and torch.equal(idx, ref.kv_indices)


# -- threshold scope and per-row needle blocks --------------------------------------------------


def topp_keep(mass, forced, allowed, tau):
    """Loop oracle of the top-p rule: forced blocks first, then descending mass, while the mass kept
    before a block is < tau. mass/forced/allowed: lists over key blocks."""
    order = [j for j in range(len(mass)) if forced[j]]
    order += sorted((j for j in range(len(mass)) if allowed[j] and not forced[j]), key=lambda j: -mass[j])
    keep, acc = set(), 0.0
    for j in order:
        if forced[j] or acc < tau - 1e-6:
            keep.add(j)
        acc += mass[j]
    return keep


def test_pooled_total_scope_is_top_p_over_every_causal_block():
    q, k, _ = qkv(1, 2, 1, 128, 16, seed=12)
    cfg = SMALL.replace(threshold=0.6, threshold_scope="total", permute=False, sink=False)
    plan = build_plan(q, k, cfg)
    dense = plan.to_dense()
    qb = q.reshape(1, 2, 8, 16, 16).mean(3).double()
    kb = k.reshape(1, 1, 8, 16, 16).mean(3).double()
    for h in range(2):
        for i in range(8):
            s = (qb[0, h, i] @ kb[0, 0, : i + 1].T / 4.0).softmax(-1).tolist()  # scale 1/sqrt(16)
            diag = i // 2 * 2
            forced = [j >= diag for j in range(i + 1)]
            expect = topp_keep(s, forced, [True] * (i + 1), 0.6)
            assert set(torch.nonzero(dense[0, h, i]).flatten().tolist()) == expect, (h, i)


@pytest.mark.parametrize("threshold,sink", [(0.7, True), (0.5, False)])
def test_pooled_total_scope_scores_the_diagonal_segment_in_original_order(threshold, sink):
    """With a permutation, the blocks of the diagonal segment are scored with keys pooled in the
    order attention reads them (original), not through the permutation (loop oracle)."""
    from selection_oracle import planted_total_case, pooled_total_plan

    q, k, perm = planted_total_case(seed=1)
    cfg = SMALL.replace(threshold=threshold, threshold_scope="total", sink=sink)
    num, idx = R.select_blocks(q, R.permute_keys(k, perm), perm, cfg, k=k)
    got = PermutedBlockMask(perm, num, idx, 16, 32, 96).to_dense()
    want = pooled_total_plan(q, k, perm, 16, 32, threshold, sink=sink)
    assert torch.equal(got, want)
    # the planted keys make the layouts differ: scoring the diagonal through the permutation fails
    wrong = pooled_total_plan(q, k, perm, 16, 32, threshold, sink=sink, diagonal_layout="permuted")
    assert not torch.equal(want, wrong)
    with pytest.raises(ValueError, match="original keys"):
        R.select_blocks(q, R.permute_keys(k, perm), perm, cfg)


@pytest.mark.parametrize("threshold", [0.3, 0.7])
def test_forced_blocks_added_after_top_p_match_a_loop_oracle(threshold):
    """forced_in_top_p off: top-p over the off-diagonal pooled probabilities in descending order, the
    sink block competing like any other, then the sink, the local block and the diagonal segment
    added. With forced blocks counted (the default) the same input keeps fewer blocks."""
    q, k, _ = qkv(1, 2, 1, 160, 16, seed=14)
    cfg = SMALL.replace(threshold=threshold, permute=False, local_blocks=1, forced_in_top_p=False)
    dense = build_plan(q, k, cfg).to_dense()
    qb = q.reshape(1, 2, 10, 16, 16).mean(3).double()
    kb = k.reshape(1, 1, 10, 16, 16).mean(3).double()
    for h in range(2):
        for i in range(10):
            start = i // 2 * 2
            s = (qb[0, h, i] @ kb[0, 0, :start].T / 4.0).softmax(-1).tolist() if start else []
            expect = topp_keep(s, [False] * start, [True] * start, threshold)
            expect |= {0, start - 1} if start else set()  # the sink (block 0) and the local block
            expect |= set(range(start, i + 1))
            assert set(torch.nonzero(dense[0, h, i]).flatten().tolist()) == expect, (h, i)
    counted = build_plan(q, k, cfg.replace(forced_in_top_p=True)).to_dense()
    assert counted.sum() < dense.sum() and bool((dense | ~counted).all())


def test_forced_in_top_p_is_validated():
    assert PBSConfig().forced_in_top_p and not PBSConfig(forced_in_top_p=False).beyond_published()
    with pytest.raises(ValueError, match="threshold_scope"):
        PBSConfig(forced_in_top_p=False, threshold_scope="total")
    with pytest.raises(ValueError, match="true or false"):
        PBSConfig.from_dict({"forced_in_top_p": "no"})


def test_published_preset_is_the_papers_method():
    """One permutation per query head, pooled scores, top-p before the sink is added, no local block."""
    from pbs_cli.engine import presets

    cfg, _ = presets.resolve_config("published")
    assert (cfg.block_size, cfg.segment_size, cfg.threshold) == (128, 256, 0.9)
    assert cfg.per_head_permutation and not cfg.forced_in_top_p and cfg.local_blocks == 0 and cfg.sink
    assert cfg.score == "pooled" and cfg.threshold_scope == "offdiag" and not cfg.beyond_published()
    from pbs_cli.engine.evaluation import PUBLISHED

    assert PUBLISHED == cfg  # what `pbs eval` compares against


def test_row_top_keeps_each_sampled_rows_best_off_diagonal_blocks():
    q, k, _ = qkv(1, 2, 1, 160, 8, seed=13)
    cfg = SMALL.replace(score="sampled", sample_rows=4, threshold=0.2, threshold_scope="total", permute=False,
                        row_top=2)
    plan = build_plan(q, k, cfg)
    base = build_plan(q, k, cfg.replace(row_top=0)).to_dense()
    dense = plan.to_dense()
    assert torch.equal(dense | base, dense) and plan.density() > build_plan(q, k, cfg.replace(row_top=0)).density()
    rows = R.sample_rows(160, 16, 4)  # (10, 4)
    mass = oracle_block_mass(q, k, R.identity_permutation(1, 1, 160, q.device), cfg, rows.reshape(-1).tolist())
    mass = mass.reshape(1, 2, 10, 4, 10)
    for h in range(2):
        for i in range(10):
            diag = i // 2 * 2
            need = set()
            for r in range(4):
                off = sorted(range(diag), key=lambda j: -float(mass[0, h, i, r, j]))[:2]
                need |= {j for j in off if float(mass[0, h, i, r, j]) > 0}
            kept = set(torch.nonzero(dense[0, h, i]).flatten().tolist())
            assert need <= kept, (h, i, need, kept)
            assert kept - need <= set(torch.nonzero(base[0, h, i]).flatten().tolist())
