"""Long sequences are planned and attended in chunks of query blocks (``pbs_prefill_attention`` with
``plan_chunk_rows``): the same output and block counts as one whole plan, with a bounded index table.

Runs the Triton path: compiled on CUDA, in the interpreter on CPU tensors (``PBS_BACKEND=triton``).
"""

from __future__ import annotations

import pytest
import torch

from triton_setup import DEVICE

from pbs_kernels import PBSConfig, PermutedBlockMask, build_plan, pbs_attention  # noqa: E402
from pbs_kernels import attention as api  # noqa: E402
from test_triton_select import structured_qkv  # noqa: E402

DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
CFG = PBSConfig(block_size=16, segment_size=32, threshold=0.9, local_blocks=1)


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("PBS_BACKEND", "triton")


def inputs(n=600, seed=0):
    q, k = structured_qkv(1, 4, 2, n, 64, DTYPE, seed=seed)
    v = torch.randn(k.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, DTYPE)
    return q, k, v


def test_chunked_prefill_equals_one_plan():
    q, k, v = inputs()
    n_b = 38
    budget = 4 * 4 * n_b * 9  # 9 query blocks per chunk -> 5 chunks, the last one of 2
    assert api.plan_chunk_rows(q, CFG, budget) == 9
    out, summary = api.pbs_prefill_attention(q, k, v, CFG, plan_bytes=budget)
    plan = build_plan(q, k, CFG)
    want = pbs_attention(q, k, v, plan)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    assert summary.kv_indices is None and torch.equal(summary.kv_num_blocks, plan.kv_num_blocks)
    assert summary.causal_blocks() == plan.causal_blocks() and summary.density() == plan.density()
    assert summary.shape == plan.shape
    with pytest.raises(ValueError, match="build_plan"):
        summary.to_dense()


@pytest.mark.parametrize("chunked", [False, True])
def test_prefill_makes_the_kv_copies_in_the_pooling_pass(monkeypatch, chunked):
    """In a copying read mode, ``pbs_prefill_attention`` takes K/V in permuted order from the
    selection's pooling pass (no separate copy launch) and returns what the separate copy gives."""
    from pbs_kernels.triton import attention as fast

    q, k, v = inputs(n=170, seed=2)
    monkeypatch.setenv("PBS_PERM_MODE", "gather")  # a copying mode that runs everywhere
    plan = build_plan(q, k, CFG)
    want = pbs_attention(q, k, v, plan)  # copies K/V apart
    monkeypatch.setattr(fast, "permuted_copies", lambda *a, **kw: pytest.fail("copied K/V apart from the pooling"))
    budget = 4 * 4 * 11 * 4 if chunked else api.PLAN_CHUNK_BYTES  # 11 query blocks, 4 per chunk
    out, got_plan = api.pbs_prefill_attention(q, k, v, CFG, plan_bytes=budget)
    assert (got_plan.kv_indices is None) == chunked
    assert torch.equal(got_plan.kv_num_blocks, plan.kv_num_blocks)
    torch.testing.assert_close(out, want, atol=0, rtol=0)


def test_prefill_in_remap_mode_copies_nothing(monkeypatch):
    """The "remap" read mode reads keys through the permutation: ``pbs_prefill_attention`` then asks
    neither the pooling pass nor the row gather for K/V copies, and returns what ``pbs_attention`` does."""
    from pbs_kernels.triton import attention as fast
    from pbs_kernels.triton import select as fast_select

    q, k, v = inputs(n=170, seed=3)
    monkeypatch.setenv("PBS_PERM_MODE", "remap")
    want = pbs_attention(q, k, v, build_plan(q, k, CFG))
    monkeypatch.setattr(fast, "permuted_copies", lambda *a, **kw: pytest.fail("copied K/V in remap mode"))
    monkeypatch.setattr(fast_select, "pool_and_copy", lambda *a, **kw: pytest.fail("copied K/V in remap mode"))
    out, _ = api.pbs_prefill_attention(q, k, v, CFG)
    torch.testing.assert_close(out, want, atol=0, rtol=0)


def test_the_chunk_steps_refuse_the_reference_path(monkeypatch):
    """``select.row_selection`` and ``attend.attend(out=)`` belong to the fused GPU path: with the
    reference backend they say so (and name what to call) instead of computing something else."""
    from pbs_kernels import attend, select

    q, k, v = inputs(n=100)
    monkeypatch.setenv("PBS_BACKEND", "reference")
    plan = build_plan(q, k, CFG)
    assert attend.kernel_read(q, 16, k, v) is None and attend.attention_kernel(q, 16, k, v) == "reference"
    with pytest.raises(ValueError, match="use select_blocks"):
        select.row_selection(q, k, plan.perm, CFG)
    with pytest.raises(ValueError, match="call attend without them"):
        attend.attend(q, k, v, plan, out=torch.empty_like(q))


def test_whole_plan_below_the_budget_and_off_the_fused_path(monkeypatch):
    q, k, v = inputs(n=200)
    assert api.plan_chunk_rows(q, CFG) is None  # 13 x 13 blocks: far below 256 MiB
    assert api.plan_chunk_rows(q, CFG, budget=64) == 1
    assert api.plan_chunk_rows(q, CFG.replace(score="sampled", sample_rows=4), budget=64) is None
    monkeypatch.setenv("PBS_BACKEND", "reference")
    assert api.plan_chunk_rows(q, CFG, budget=64) is None
    out, plan = api.pbs_prefill_attention(q, k, v, CFG, plan_bytes=64)  # the reference: whole plan
    assert plan.kv_indices is not None


def test_a_chunk_of_rows_reads_as_such():
    perm = torch.arange(100).expand(1, 2, 100).to(torch.int32)
    num = torch.tensor([[[3, 4], [1, 2]]], dtype=torch.int32)  # rows 2 and 3 of a 7-row plan
    plan = PermutedBlockMask(perm, num, torch.zeros(1, 2, 2, 7, dtype=torch.int32), 16, 32, 100, row_offset=2)
    assert plan.shape == (1, 2, 2, 7)
    assert plan.causal_blocks() == 2 * (3 + 4)
    assert plan.density() == pytest.approx(10 / 14)
    torch.testing.assert_close(plan.density_per_head(), torch.tensor([[1.0, 3 / 7]]))
    assert "rows 2..3 of 2x7" in repr(plan)
