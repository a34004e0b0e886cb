"""The structured synthetic Q/K/V generator produces the attention structure it promises.

Each check computes the attention map directly (softmax of q k^T / sqrt(D), causal) on sampled rows and
compares it with the recipe the generator reports (heavy-hitter positions, topics, slash offsets)."""

from __future__ import annotations

import math

import pytest
import torch

from pbs_cli.engine.workloads import PATTERNS, synthetic_qkv
from pbs_kernels import PBSConfig, reference

N = 2048


def _probs(q, k, rows):
    """fp32 (B, H_q, R, N) causal attention probabilities of ``rows``."""
    g = q.shape[1] // k.shape[1]
    s = q[:, :, rows].float() @ k.float().repeat_interleave(g, 1).transpose(-1, -2) / math.sqrt(q.shape[-1])
    return s.masked_fill(torch.arange(q.shape[2])[None, :] > rows[:, None], float("-inf")).softmax(-1)


ROWS = torch.arange(N // 2, N, 97)


def test_shapes_dtypes_and_determinism():
    q, k, v = synthetic_qkv(2, 6, 3, 300, 32, seed=5, dtype=torch.float16)
    assert q.shape == (2, 6, 300, 32) and k.shape == v.shape == (2, 3, 300, 32)
    assert q.dtype == k.dtype == v.dtype == torch.float16
    assert all(torch.isfinite(t.float()).all() for t in (q, k, v))
    q2, k2, v2 = synthetic_qkv(2, 6, 3, 300, 32, seed=5, dtype=torch.float16)
    assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(v, v2)
    q3, _, _ = synthetic_qkv(2, 6, 3, 300, 32, seed=6, dtype=torch.float16)
    assert not torch.equal(q, q3)
    with pytest.raises(ValueError, match="multiple"):
        synthetic_qkv(1, 6, 4, 64, 32)
    with pytest.raises(ValueError, match="pattern"):
        synthetic_qkv(1, 2, 1, 64, 32, pattern="zigzag")


def test_sink_heads_put_most_mass_on_token_zero():
    q, k, _ = synthetic_qkv(1, 4, 2, N, 64, pattern="sink")
    p = _probs(q, k, ROWS)
    assert p[..., 0].min() > 0.8


def test_vertical_heads_attend_to_the_heavy_hitters():
    q, k, _, recipe = synthetic_qkv(1, 4, 2, N, 64, pattern="vertical", return_recipe=True)
    p = _probs(q, k, ROWS)
    for hq in range(4):
        heavy = recipe.heavy_positions[0][hq // 2]
        assert heavy.numel() == round(4.0 * N / 1024) and int(heavy.min()) > 0
        visible = p[0, hq][:, heavy].sum(-1)  # mass on heavy keys (the ones after a row get 0)
        frac_visible = (heavy[None, :] <= ROWS[:, None]).float().mean(-1)
        # 8 of ~1-2K visible keys (<1%) hold most of the mass
        assert (visible[frac_visible > 0.5] > 0.5).all() and visible[frac_visible > 0.5].mean() > 0.75


def test_local_heads_attend_to_the_recent_window():
    q, k, _ = synthetic_qkv(1, 4, 2, N, 64, pattern="local", window=256)
    p = _probs(q, k, ROWS)
    near = torch.stack([p[..., i, max(0, int(r) - 256) : int(r) + 1].sum(-1) for i, r in enumerate(ROWS)], -1)
    assert near.min() > 0.7


def test_slash_heads_peak_at_their_offset():
    q, k, _, recipe = synthetic_qkv(1, 4, 2, N, 64, pattern="slash", return_recipe=True)
    p = _probs(q, k, ROWS)
    for hq, r in enumerate(recipe.heads):
        assert r.kind == "slash" and 1 <= r.offset < N // 2
        peak = p[0, hq].argmax(-1)
        assert ((ROWS - peak - r.offset).abs() <= 2).float().mean() > 0.9


def test_topic_heads_attend_to_their_own_topic():
    q, k, _, recipe = synthetic_qkv(1, 2, 1, N, 64, pattern="topic", return_recipe=True)
    topics = recipe.topics[0][0]
    p = _probs(q, k, ROWS)
    same = topics[None, :] == topics[ROWS][:, None]  # (R, N)
    mass = (p[0] * same).sum(-1)
    assert mass.min() > 0.8


def test_mixed_heads_differ_and_keep_a_sink():
    _, _, _, recipe = synthetic_qkv(1, 10, 2, 512, 64, return_recipe=True)
    kinds = [h.kind for h in recipe.heads]
    assert set(kinds) == {"local", "vertical", "sink", "slash", "topic"}
    assert all(h.sink > 0 for h in recipe.heads)


def test_block_selection_on_structured_heads_is_sparse_and_on_uniform_is_not():
    """PBS at tau 0.9 keeps far fewer blocks on the mixed workload than on Gaussian Q/K, with high recall."""
    cfg = PBSConfig(threshold=0.9)
    q, k, _ = synthetic_qkv(1, 8, 2, 4096, 64, seed=0)
    plan = reference.build_plan(q, k, cfg)
    qu, ku, _ = synthetic_qkv(1, 8, 2, 4096, 64, seed=0, pattern="uniform")
    plan_u = reference.build_plan(qu, ku, cfg)
    assert plan.density() < 0.65 < 0.85 < plan_u.density()
    rows = torch.arange(512, 4096, 211)
    assert reference.attention_recall(q, k, plan, rows).mean() > 0.9


def test_every_pattern_generates_in_bf16():
    for pattern in PATTERNS:
        q, k, v = synthetic_qkv(1, 2, 1, 256, 16, pattern=pattern, dtype=torch.bfloat16)
        assert torch.isfinite(q.float()).all() and torch.isfinite(k.float()).all(), pattern
