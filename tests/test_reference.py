"""The PyTorch reference against independent oracles (fp64, token-level masks: attention_oracle.py, and
the ones written here)."""

from __future__ import annotations

import math

import pytest
import torch

from pbs_kernels import PBSConfig, build_plan, pbs_attention
from pbs_kernels import reference as R

from attention_oracle import masked_attention, token_mask

SMALL = PBSConfig(block_size=32, segment_size=64, threshold=0.9)


def qkv(b, h_q, h_kv, n, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(dtype) for h in (h_q, h_kv, h_kv)]


@pytest.mark.parametrize(
    "b,h_q,h_kv,n,d",
    [(1, 4, 4, 64, 16), (1, 3, 1, 100, 32), (2, 8, 2, 257, 16), (1, 4, 1, 300, 64), (2, 6, 3, 20, 16)],
)
def test_sparse_attention_matches_token_level_oracle(b, h_q, h_kv, n, d):
    q, k, v = qkv(b, h_q, h_kv, n, d)
    plan = build_plan(q, k, SMALL)
    out = pbs_attention(q, k, v, plan)
    ref = masked_attention(q, k, v, token_mask(plan))
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    assert plan.density() <= 1.0


@pytest.mark.parametrize("n", [37, 64, 200, 333])
@pytest.mark.parametrize("h_q,h_kv", [(2, 2), (6, 2), (8, 1)])
def test_threshold_one_is_dense_causal(n, h_q, h_kv):
    q, k, v = qkv(2, h_q, h_kv, n, 16, seed=n)
    plan = build_plan(q, k, SMALL.replace(threshold=1.0))
    assert plan.density() == 1.0
    out = pbs_attention(q, k, v, plan)
    g = h_q // h_kv
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1), is_causal=True
    )
    torch.testing.assert_close(out.double(), dense, atol=2e-5, rtol=1e-4)


def test_permutation_sorts_inside_complete_segments_only():
    q, k, _ = qkv(1, 4, 2, 200, 16, seed=3)
    imp = R.key_importance(q, k, 32)
    perm = R.segment_permutation(imp, 64)
    assert perm.dtype == torch.int32 and perm.shape == (1, 2, 200)
    for seg in range(3):  # three complete segments of 64; 8 trailing tokens keep their order
        p = perm[0, :, seg * 64 : (seg + 1) * 64].long()
        assert sorted(p[0].tolist()) == list(range(seg * 64, (seg + 1) * 64))
        scores = torch.gather(imp[0], 1, p)
        assert (scores[:, :-1] >= scores[:, 1:]).all()
    assert perm[0, :, 192:].tolist() == [list(range(192, 200))] * 2


def test_key_importance_is_last_block_softmax_mean():
    q, k, _ = qkv(1, 2, 1, 50, 8, seed=5)
    imp = R.key_importance(q, k, 16)
    rows = []
    for h in range(2):
        for r in range(34, 50):
            s = (q[0, h, r] @ k[0, 0, : r + 1].T) / math.sqrt(8)
            rows.append(torch.nn.functional.pad(s.softmax(-1), (0, 50 - r - 1)))
    torch.testing.assert_close(imp[0, 0], torch.stack(rows).mean(0))
    torch.testing.assert_close(imp.sum(-1), torch.ones(1, 1))


def test_forced_blocks_always_kept_and_threshold_monotone():
    q, k, _ = qkv(1, 4, 2, 512, 16, seed=7)
    tiny = build_plan(q, k, SMALL.replace(threshold=1e-6))
    dense = tiny.to_dense()
    n_qb = 16
    for i in range(n_qb):
        diag = (i // 2) * 2
        assert dense[0, :, i, diag : i + 1].all(), "diagonal segment blocks must be kept"
        assert not dense[0, :, i, i + 1 :].any(), "nothing above the diagonal"
    # the sink: every query block past segment 0 keeps the permuted block holding token 0
    # (rows of segment 0 read it in original order as part of their diagonal segment)
    sink = R.sink_block(tiny.perm, 32).repeat_interleave(2, 1)[0]
    for h in range(4):
        assert dense[0, h, 2:, sink[h]].all()
    # only forced blocks: diagonal-segment blocks + the sink for rows past segment 0
    per_row = torch.tensor([i - (i // 2) * 2 + 1 + (i >= 2) for i in range(n_qb)])
    assert torch.equal(tiny.kv_num_blocks[0, 0], per_row.int())
    densities = [build_plan(q, k, SMALL.replace(threshold=t)).density() for t in (0.3, 0.6, 0.9, 1.0)]
    assert densities == sorted(densities) and densities[-1] == 1.0


def test_plan_layout_packed_left_ascending():
    q, k, _ = qkv(2, 3, 3, 300, 16, seed=11)
    plan = build_plan(q, k, SMALL.replace(threshold=0.5))
    for num, idx in zip(plan.kv_num_blocks.flatten(0, 2).tolist(), plan.kv_indices.flatten(0, 2).tolist()):
        kept = idx[:num]
        assert kept == sorted(set(kept))
    assert plan.kv_indices.dtype == plan.kv_num_blocks.dtype == torch.int32


def test_per_head_permutation_and_no_permutation():
    q, k, v = qkv(1, 6, 2, 256, 16, seed=13)
    per_head = build_plan(q, k, SMALL.replace(per_head_permutation=True))
    assert per_head.perm.shape == (1, 6, 256)
    out = pbs_attention(q, k, v, per_head)
    torch.testing.assert_close(out.double(), masked_attention(q, k, v, token_mask(per_head)), atol=2e-5, rtol=1e-4)
    plain = build_plan(q, k, SMALL.replace(permute=False))
    assert torch.equal(plain.perm[0, 0], torch.arange(256, dtype=torch.int32))


def test_recall_matches_direct_mass_and_is_one_when_dense():
    q, k, _ = qkv(1, 4, 2, 300, 16, seed=17)
    rows = torch.tensor([5, 100, 299])
    full = build_plan(q, k, SMALL.replace(threshold=1.0))
    torch.testing.assert_close(R.attention_recall(q, k, full, rows), torch.ones(1, 4, 3))
    plan = build_plan(q, k, SMALL.replace(threshold=0.4))
    mask = token_mask(plan)[:, :, rows]
    g = 2
    s = q[:, :, rows].double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2) / 4.0
    causal = torch.arange(300)[None, :] <= rows[:, None]
    p = s.masked_fill(~causal, float("-inf")).softmax(-1)
    torch.testing.assert_close(R.attention_recall(q, k, plan, rows).double(), (p * mask).sum(-1), atol=1e-5, rtol=1e-5)


def test_plan_repr_and_grid():
    q, k, _ = qkv(1, 2, 1, 128, 16)
    plan = build_plan(q, k, SMALL.replace(threshold=1.0))
    assert "density=100.00%" in repr(plan) and "blocks=4x4" in repr(plan)
    grid = plan.to_string(heads=1).splitlines()
    assert grid[2:] == ["█", "██", "███", "████"]


@pytest.mark.parametrize(
    "kwargs,match",
    [({"threshold": 0.0}, "threshold"), ({"threshold": 1.5}, "threshold"), ({"segment_size": 96, "block_size": 64}, "multiple"),
     ({"block_size": 48}, "power of two")],
)
def test_config_errors_say_what_to_do(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PBSConfig(**kwargs)
