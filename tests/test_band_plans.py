"""Sliding windows, soft-capping and attention sinks: band plans, the PyTorch reference and the Triton kernel
against the fp64 token-level oracle (attention_oracle.py) of windowed (soft-capped, sink) causal attention.

The oracle knows nothing of blocks: query q sees original keys q - W < k <= q. Band plans are checked
twice: their kept blocks against the blocks that window touches (computed from the token mask), and
the attention over them against the oracle, at odd lengths, windows that are not multiples of the
block size, and GQA groups of 1 to 8. Kernel tests run in the Triton interpreter (fp16/fp32) with the
tolerance rule of test_triton_attention.py and NaN-filled outputs.
"""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("triton")

from pbs_kernels import PBSConfig, pbs_attention, reference as R  # noqa: E402
from pbs_kernels.attention import attention_kernel, band_attention  # noqa: E402
from pbs_kernels.band import band_plan, band_rows  # noqa: E402
from pbs_kernels.triton import attention as A  # noqa: E402
from attention_oracle import masked_attention, token_mask  # noqa: E402
from test_triton_attention import DEVICE, DTYPES, FLOOR, ON_GPU, qkv, random_plan, to_device  # noqa: E402


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def window_mask(n: int, window: int | None) -> torch.Tensor:
    """Bool (N, N): causal, and inside the window when one is given."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    mask = j <= i
    return mask if window is None else mask & (j > i - window)


def assert_rule(out, q, k, v, mask, softcap=None, scale=None, sinks=None):
    """err(out vs fp64 oracle) <= 2 * err(the same math in q's dtype vs fp64) + floor."""
    exact = masked_attention(q, k, v, mask, softcap=softcap, scale=scale, sinks=sinks)
    low = masked_attention(q, k, v, mask, q.dtype, softcap=softcap, scale=scale, sinks=sinks)
    err = (out.cpu().double() - exact).abs().max().item()
    err_pt = (low.double() - exact).abs().max().item()
    assert err <= 2 * err_pt + FLOOR[q.dtype], f"error {err:.3g} > 2 x PyTorch error {err_pt:.3g} + floor"


# -- the plan --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,block", [(1, 16), (37, 16), (203, 32), (256, 32), (129, 64)])
@pytest.mark.parametrize("window", [1, 5, 16, 33, 50, 64, 1000])
def test_band_keeps_exactly_the_blocks_the_window_touches(n, block, window):
    plan = band_plan(2, 4, 2, n, window, block, 2 * block)
    n_b = -(-n // block)
    pad = n_b * block - n
    touched = torch.nn.functional.pad(window_mask(n, window), (0, pad, 0, pad))
    touched = touched.reshape(n_b, block, n_b, block).any(3).any(1)  # (N_qb, N_kb)
    assert torch.equal(plan.to_dense(), touched.expand(2, 4, n_b, n_b))
    assert torch.equal(plan.perm, torch.arange(n, dtype=torch.int32).expand(2, 2, n))  # no permutation
    assert plan.density() == pytest.approx(touched.sum().item() / (n_b * (n_b + 1) / 2))
    num, idx = band_rows(n, window, block, 1, max(1, n_b - 1))  # a chunk of rows: the same rows
    assert torch.equal(num, plan.kv_num_blocks[0, 0, 1:max(1, n_b - 1)])
    assert torch.equal(idx, plan.kv_indices[0, 0, 1:max(1, n_b - 1)])


@pytest.mark.parametrize("window", [0, -3, 2.5, True])
def test_bad_windows_are_refused(window):
    with pytest.raises(ValueError, match="window must be a positive"):
        band_plan(1, 1, 1, 10, window, 16, 32)


# -- the reference ---------------------------------------------------------------------------------


@pytest.mark.parametrize("h_q,h_kv", [(2, 2), (4, 2), (8, 2), (8, 1)])  # GQA groups 1, 2, 4, 8
@pytest.mark.parametrize("n,window", [(203, 45), (203, 1), (97, 200), (255, 64), (300, 100)])
def test_reference_band_attention_matches_the_windowed_oracle(h_q, h_kv, n, window):
    q, k, v = qkv(2, h_q, h_kv, n, 16, torch.float32, seed=n + window)
    out, plan = band_attention(q, k, v, PBSConfig(block_size=32, segment_size=64, threshold=0.3), window)
    assert plan.density() <= 1.0 and torch.equal(plan.perm[0, 0], torch.arange(n, dtype=torch.int32))
    assert_rule(out, q, k, v, window_mask(n, window))


@pytest.mark.parametrize("softcap", [1.0, 4.0, 50.0])
@pytest.mark.parametrize("window", [None, 45])
def test_reference_softcap_on_a_permuted_sparse_plan(softcap, window):
    """Soft-capping and a window on any plan (a random permuted one here): the oracle masks by the plan's
    keys (original positions) and the window; scores are capped before masking."""
    n = 190
    q, k, v = (x.cpu() for x in qkv(1, 4, 2, n, 16, torch.float32, seed=7))
    q = q * 3  # logits well past the cap
    plan = random_plan(1, 4, 2, n, 32, 64, p=0.5, seed=7)
    out = R.block_sparse_attention(q, k, v, plan, window=window, softcap=softcap)
    assert_rule(out, q, k, v, token_mask(plan) & window_mask(n, window), softcap=softcap)
    uncapped = R.block_sparse_attention(q, k, v, plan, window=window)
    assert (out - uncapped).abs().max() > 1e-3  # the cap changed the result


@pytest.mark.parametrize("window", [None, 45])
def test_reference_sinks_on_a_permuted_sparse_plan(window):
    """gpt-oss's learned sinks: a per-head logit in every softmax denominator that carries no value."""
    n = 170
    q, k, v = (x.cpu() for x in qkv(2, 4, 1, n, 16, torch.float32, seed=8))
    sinks = torch.tensor([-1.0, 0.0, 2.0, 5.0])  # from a small share of the mass to most of it
    plan = random_plan(2, 4, 1, n, 32, 64, p=0.5, seed=8)
    out = R.block_sparse_attention(q, k, v, plan, window=window, sinks=sinks)
    assert_rule(out, q, k, v, token_mask(plan) & window_mask(n, window), sinks=sinks)
    assert (out - R.block_sparse_attention(q, k, v, plan, window=window)).abs().max() > 1e-2  # sinks took mass


def test_bad_softcap_is_refused():
    q, k, v = qkv(1, 2, 1, 40, 16, torch.float32)
    with pytest.raises(ValueError, match="softcap must be a positive"):
        pbs_attention(q.cpu(), k.cpu(), v.cpu(), band_plan(1, 2, 1, 40, 8, 16, 32), softcap=0.0)


# -- the Triton kernel -----------------------------------------------------------------------------


def check_kernel(q, k, v, plan, mask, **kw):
    out = torch.full_like(q, float("nan"))
    A.pbs_attention(q, k, v, plan, out=out, **kw)
    assert not out.isnan().any(), "kernel left NaN (unwritten tile or 0/0)"
    assert_rule(out, q, k, v, mask, softcap=kw.get("softcap"), scale=kw.get("scale"), sinks=kw.get("sinks"))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h_q,h_kv", [(2, 2), (8, 1)])
@pytest.mark.parametrize("n,window", [(203, 45), (171, 1), (150, 200)])
def test_kernel_band_plan_matches_the_windowed_oracle(dtype, h_q, h_kv, n, window):
    q, k, v = qkv(1, h_q, h_kv, n, 64, dtype, seed=window)
    plan = band_plan(1, h_q, h_kv, n, window, 32, 64, DEVICE)
    check_kernel(q, k, v, plan, window_mask(n, window), window=window)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["remap", "gather", "tma"])
def test_kernel_window_on_permuted_plans_in_every_masking_mode(dtype, mode):
    """The window masks by original positions in every phase: permuted slots of earlier segments (phase 1
    reads them from the plan's permutation), the own segment and the diagonal block."""
    n, window = 230, 90
    q, k, v = qkv(2, 4, 2, n, 64, dtype, seed=3)
    plan = to_device(random_plan(2, 4, 2, n, 32, 64, p=0.6, seed=3))
    check_kernel(q, k, v, plan, token_mask(plan) & window_mask(n, window), window=window, perm_mode=mode)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 70])
@pytest.mark.parametrize("d", [64, 128])
def test_kernel_softcap(dtype, window, d):
    n = 180
    q, k, v = qkv(1, 4, 1, n, d, dtype, seed=5)
    q = q * 4  # logits well past the cap
    plan = to_device(random_plan(1, 4, 1, n, 32, 64, p=0.5, seed=5))
    out = check_kernel(q, k, v, plan, token_mask(plan) & window_mask(n, window), window=window, softcap=5.0,
                       scale=0.2)
    ref = R.block_sparse_attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), to_device(plan, "cpu"),
                                   scale=0.2, window=window, softcap=5.0)
    exact = masked_attention(q, k, v, token_mask(plan) & window_mask(n, window), softcap=5.0, scale=0.2)
    low = masked_attention(q, k, v, token_mask(plan) & window_mask(n, window), dtype, softcap=5.0, scale=0.2)
    err_pt = (low.double() - exact).abs().max().item()
    torch.testing.assert_close(out.float().cpu(), ref, atol=2 * err_pt + FLOOR[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["remap", "tma"])
def test_kernel_sinks(dtype, mode):
    """Sinks on a band plan and on a permuted sparse plan (GQA 4, odd length)."""
    n, window = 181, 60
    q, k, v = qkv(1, 4, 1, n, 64, dtype, seed=9)
    sinks = torch.tensor([-1.0, 0.0, 2.0, 5.0], device=DEVICE)
    band = band_plan(1, 4, 1, n, window, 32, 64, DEVICE)
    check_kernel(q, k, v, band, window_mask(n, window), window=window, sinks=sinks, perm_mode=mode)
    plan = to_device(random_plan(1, 4, 1, n, 32, 64, p=0.5, seed=9))
    check_kernel(q, k, v, plan, token_mask(plan) & window_mask(n, None), sinks=sinks, perm_mode=mode)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["remap", "gather"])
def test_kernel_head_dim_256(dtype, mode):
    """Gemma's head_dim 256 with the tiles the launcher picks on a GPU (64x32: two key tiles per plan block):
    a band plan with window, soft-cap and sinks, and a plain permuted sparse plan."""
    n, window = 203, 90
    q, k, v = qkv(1, 4, 2, n, 256, dtype, seed=12)
    assert A._default_config(64, 256, mode) == {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    sinks = torch.tensor([0.0, 1.0, -2.0, 3.0], device=DEVICE)
    band = band_plan(1, 4, 2, n, window, 64, 128, DEVICE)
    check_kernel(q, k, v, band, window_mask(n, window), window=window, softcap=3.0, sinks=sinks, perm_mode=mode)
    plan = to_device(random_plan(1, 4, 2, n, 64, 128, p=0.5, seed=12))
    check_kernel(q, k, v, plan, token_mask(plan) & window_mask(n, None), perm_mode=mode)


def test_head_dim_256_runs_the_modes_that_fit():
    """With head_dim 256 every read mode but gather runs remap (tma's descriptors and the persistent
    kernel do not fit or do not take it); 64 and 128 keep theirs."""
    wide, narrow = torch.empty(1, 4, 8, 256, device="meta"), torch.empty(1, 4, 8, 128, device="meta")
    for mode in A.PERM_MODES:
        assert A.resolve_perm_mode(A.TMA_MIN_SEQ_LEN, 128, wide, mode) == ("gather" if mode == "gather" else "remap")
        assert A.resolve_perm_mode(A.TMA_MIN_SEQ_LEN, 128, narrow, mode) == mode
    assert A.supports(torch.empty(1, 4, 8, 256, device=DEVICE, dtype=DTYPES[0]))


def test_band_attention_in_row_chunks_equals_the_whole_plan(monkeypatch):
    """Long band plans are built and attended in row chunks on the Triton path (index table over
    ``plan_bytes``): the same output as the whole plan."""
    monkeypatch.setenv("PBS_BACKEND", "triton")
    dtype = DTYPES[-1]
    n, window = 300, 70
    q, k, v = qkv(1, 4, 2, n, 64, dtype, seed=2)
    cfg = PBSConfig(block_size=32, segment_size=64)
    whole, plan = band_attention(q, k, v, cfg, window)
    chunked, summary = band_attention(q, k, v, cfg, window, plan_bytes=4 * 4 * 10 * 3)  # 3 rows a chunk
    assert summary.kv_indices is None and torch.equal(summary.kv_num_blocks, plan.kv_num_blocks)
    torch.testing.assert_close(chunked, whole, atol=0, rtol=0)
    assert_rule(chunked, q, k, v, window_mask(n, window))


@pytest.mark.parametrize("mode", ["persistent"])
def test_masked_calls_leave_the_plain_causal_kernels(mode, monkeypatch):
    """The persistent kernel applies neither a window nor a softcap: such calls run the kernel that does ("remap" below TMA_MIN_SEQ_LEN tokens, "tma" from it), also when asked by name."""
    q = torch.empty(1, 4, 8, 64, device="meta")
    assert A.resolve_perm_mode(1000, 128, q, mode, masked=True) == "remap"
    assert A.resolve_perm_mode(A.TMA_MIN_SEQ_LEN, 128, q, mode, masked=True) == "tma"
    assert A.resolve_perm_mode(1000, 128, q, mode) == mode
    for name in A.MASKING_MODES:
        assert A.resolve_perm_mode(1000, 128, q, name, masked=True) == name
    monkeypatch.setenv("PBS_BACKEND", "triton")
    monkeypatch.setenv("PBS_PERM_MODE", mode)
    qc = torch.empty(1, 4, 8, 64, device=DEVICE, dtype=DTYPES[0])
    assert attention_kernel(qc, 32) == f"triton/{mode}"
    assert attention_kernel(qc, 32, masked=True) == "triton/remap"
