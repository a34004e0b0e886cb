"""``estimate_dropped``: dropped key blocks of earlier segments enter the softmax as one pseudo-key each
(mean key, mean value, weight = block size), in the Triton kernel and the PyTorch reference.

The oracle is written from the definition: dense fp64 attention over the original keys the plan
keeps plus, per query row, the mean key / mean value of each dropped earlier-segment block with a
log(block_size) score bias. The tolerance rule is the attention tests' (kernel error vs fp64 <= 2 x
the same computation in the input dtype + floor). Runs in the interpreter on CPU, on CUDA in fp16/bf16.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from pbs_kernels import PBSConfig, build_plan  # noqa: E402
from pbs_kernels import reference as R  # noqa: E402
from pbs_kernels.attention import pbs_attention  # noqa: E402
from pbs_kernels.triton import attention as A  # noqa: E402
from test_triton_attention import (DEVICE, DTYPES, FLOOR, _interpret, qkv, random_plan, to_cpu,  # noqa: E402,F401
                                   to_device, token_mask)


def estimate_parts(k, v, plan):
    """Mean key / value of every permuted block, straight from perm (fp64, (B, H_perm, N_kb, D)),
    and which blocks each query row estimates: bool (B, H_q, N, N_kb)."""
    perm = plan.perm.cpu().long()
    b, h_perm, n = perm.shape
    bs = plan.block_size
    n_kb = plan.num_blocks
    kv_of = torch.arange(h_perm) // (h_perm // k.shape[1]) if h_perm >= k.shape[1] else torch.arange(h_perm)
    means = []
    for x in (k, v):
        x = x.cpu().double()[:, kv_of]  # (B, H_perm, N, D)
        m = torch.zeros(b, h_perm, n_kb, x.shape[-1], dtype=torch.float64)
        for j in range(n // bs):  # whole blocks only; a partial last block is never estimated
            slots = perm[:, :, j * bs : (j + 1) * bs]
            m[:, :, j] = torch.gather(x, 2, slots[..., None].expand(-1, -1, -1, x.shape[-1])).mean(2)
        means.append(m)
    kept = to_cpu(plan).to_dense()  # (B, H_q, N_qb, N_kb)
    n_qb = kept.shape[-2]
    per_seg = plan.segment_size // bs
    seg_start = torch.arange(n_qb) // per_seg * per_seg
    earlier = torch.arange(n_kb)[None, :] < seg_start[:, None]
    est_rows = (earlier & ~kept).repeat_interleave(bs, dim=2)[:, :, :n]  # per query row
    return means[0], means[1], est_rows


def oracle(q, k, v, plan, dtype):
    """Dense attention over the kept keys plus the pseudo-keys, every op in ``dtype``."""
    g = q.shape[1] // k.shape[1]
    km, vm, est = estimate_parts(k, v, plan)
    gp = q.shape[1] // km.shape[1]
    mask = token_mask(plan)
    qx, kx, vx = (x.cpu().to(dtype) for x in (q, k, v))
    kx, vx = kx.repeat_interleave(g, 1), vx.repeat_interleave(g, 1)
    km, vm = (x.to(dtype).repeat_interleave(gp, 1) for x in (km, vm))
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = (qx @ kx.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    s_est = (qx @ km.transpose(-1, -2) * scale + math.log(plan.block_size)).masked_fill(~est, float("-inf"))
    p = torch.cat([s, s_est], -1).softmax(-1)
    return p @ torch.cat([vx, vm], 2)


def check(q, k, v, plan, **kw):
    out = torch.full_like(q, float("nan"))
    A.pbs_attention(q, k, v, plan, out=out, estimate_dropped=True, **kw)
    assert not out.isnan().any(), "kernel left NaN"
    exact = oracle(q, k, v, plan, torch.float64)
    err_pt = (oracle(q, k, v, plan, q.dtype).double() - exact).abs().max().item()
    err = (out.cpu().double() - exact).abs().max().item()
    assert err <= 2 * err_pt + FLOOR[q.dtype], f"kernel error {err:.3g} > 2 x PyTorch error {err_pt:.3g} + floor"
    ref = R.block_sparse_attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), to_cpu(plan),
                                   estimate_dropped=True)
    torch.testing.assert_close(ref.double(), exact, atol=1e-5, rtol=0)  # the reference computes in fp32
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h_q,h_kv,h_perm", [(2, 2, 2), (4, 1, 1), (4, 2, 4)])
def test_matches_oracle_random_plans(dtype, h_q, h_kv, h_perm):
    q, k, v = qkv(1, h_q, h_kv, 300, 64, dtype, seed=11)  # 300: a partial block and a partial segment
    plan = to_device(random_plan(1, h_q, h_perm, 300, 32, 64, p=0.3, seed=11))
    est = estimate_parts(k, v, plan)[2]
    assert est.any() and not est.all()
    check(q, k, v, plan)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["remap", "gather", "tma"])
def test_read_modes_batch2_head_dim_128(dtype, mode):
    q, k, v = qkv(2, 2, 1, 257, 128, dtype, seed=12)
    plan = to_device(random_plan(2, 2, 1, 257, 32, 64, p=0.4, seed=12))
    check(q, k, v, plan, perm_mode=mode)


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_when_each_dropped_block_holds_one_key(dtype):
    """Keys and values constant inside every permuted block: a block's mean is its keys, so the
    estimate of a dropped block is exact and the result equals dense causal attention."""
    n, bs = 256, 32
    plan = to_device(random_plan(1, 2, 1, n, bs, 64, p=0.25, seed=13))
    g = torch.Generator().manual_seed(13)
    q = torch.randn(1, 2, n, 64, generator=g)
    k, v = torch.empty(1, 1, n, 64), torch.empty(1, 1, n, 64)
    perm = plan.perm.cpu().long()[0, 0]
    for j in range(n // bs):
        k[0, 0, perm[j * bs : (j + 1) * bs]] = torch.randn(64, generator=g)
        v[0, 0, perm[j * bs : (j + 1) * bs]] = torch.randn(64, generator=g)
    q, k, v = (x.to(dtype).to(DEVICE) for x in (q, k, v))
    out = check(q, k, v, plan)
    qd, kd, vd = (x.cpu().double() for x in (q, k, v))
    dense = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)
    low = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    err_pt = (low.cpu().double() - dense).abs().max().item()
    assert (out.cpu().double() - dense).abs().max().item() <= 2 * err_pt + FLOOR[dtype]
    # without the estimate the same plan is far from dense
    plain = A.pbs_attention(q, k, v, plan)
    assert (plain.cpu().double() - dense).abs().max().item() > 10 * (2 * err_pt + FLOOR[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_plan_has_nothing_to_estimate(dtype):
    q, k, v = qkv(1, 4, 1, 150, 64, dtype, seed=14)
    plan = build_plan(q.float(), k.float(), PBSConfig(block_size=32, segment_size=64, threshold=1.0))
    both = [A.pbs_attention(q, k, v, plan, estimate_dropped=e) for e in (False, True)]
    torch.testing.assert_close(both[0], both[1], atol=0, rtol=0)


def test_config_reaches_the_attention(monkeypatch):
    """``PBSConfig.estimate_dropped`` is what ``pbs_prefill_attention`` passes on."""
    from pbs_kernels import attention as api

    seen = []
    monkeypatch.setattr(api, "pbs_attention", lambda *a, **kw: seen.append(a[5:]) or a[0])
    q, k, v = qkv(1, 2, 1, 128, 64, DTYPES[0], seed=15)
    for flag in (False, True):
        api.pbs_prefill_attention(q, k, v, PBSConfig(block_size=32, segment_size=64, estimate_dropped=flag))
    assert seen == [(False,), (True,)]  # the argument after (q, k, v, plan, scale)


def test_kept_bits_match_the_dense_mask():
    plan = random_plan(2, 3, 1, 1000, 16, 32, p=0.3, seed=16)  # 63 blocks: two words, bit 31 used
    bits = A.kept_bits(plan, chunk_elements=500)  # several chunks
    words = bits.long() & 0xFFFFFFFF
    j = torch.arange(plan.num_blocks)
    decoded = ((words[..., j // 32] >> (j % 32)) & 1).bool()
    assert torch.equal(decoded, plan.to_dense())


def test_reference_dispatch_on_cpu_tensors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = (x.cpu().float() for x in qkv(1, 2, 1, 200, 64, torch.float32, seed=17))
    plan = to_cpu(random_plan(1, 2, 1, 200, 32, 64, p=0.3, seed=17))
    out = pbs_attention(q, k, v, plan, estimate_dropped=True)
    torch.testing.assert_close(out.double(), oracle(q, k, v, plan, torch.float64), atol=1e-5, rtol=0)
