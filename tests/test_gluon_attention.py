"""The persistent Gluon kernel ("persistent" read mode) against the fp64 oracle and the reference.

Gluon kernels do not run in the Triton interpreter, so the numerical tests need a Hopper GPU (they
reuse ``test_triton_attention``'s oracle, plans and tolerance rule); on other machines only the
refusal is tested here, and ``test_kernel_fits_hopper`` compiles the kernel for sm_90.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pbs_kernels import PermutedBlockMask  # noqa: E402
from pbs_kernels.triton import attention as A  # noqa: E402

from test_triton_attention import check, qkv, random_plan, to_device  # noqa: E402

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not HOPPER, reason="the persistent Gluon kernel needs a Hopper GPU")


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("b,h_q,h_kv,n", [(1, 4, 1, 600), (2, 2, 2, 512), (1, 8, 1, 1000), (1, 3, 1, 130)])
def test_persistent_matches_oracle(dtype, d, b, h_q, h_kv, n):
    """Odd and whole lengths, batch 2, GQA 1/2/8; 128-token blocks, segments of two blocks."""
    q, k, v = qkv(b, h_q, h_kv, n, d, dtype, seed=n)
    plan = to_device(random_plan(b, h_q, h_kv, n, 128, 256, p=0.5, seed=n))
    check(q, k, v, plan, perm_mode="persistent")


@needs_hopper
def test_persistent_few_programs_many_tiles():
    """Fewer programs than tiles by far (each walks many tiles, wrapping its q buffers and K/V rings
    many times): the result depends neither on the number of programs nor on the tile order (atomic
    counter, the default, or a fixed stride; copy head or query block slowest)."""
    q, k, v = qkv(1, 8, 2, 1500, 128, torch.bfloat16, seed=3)
    plan = to_device(random_plan(1, 8, 2, 1500, 128, 256, p=0.3, seed=3))
    one = check(q, k, v, plan, perm_mode="persistent", config={"programs": 1})
    many = A.pbs_attention(q, k, v, plan, perm_mode="persistent")
    torch.testing.assert_close(one, many, atol=0, rtol=0)
    for cfg in ({"dynamic": False}, {"dynamic": False, "programs": 3}, {"programs": 3}, {"programs": 1 << 30},
                {"head_major": False}, {"head_major": False, "dynamic": False, "programs": 3}):
        torch.testing.assert_close(A.pbs_attention(q, k, v, plan, perm_mode="persistent", config=cfg), many,
                                   atol=0, rtol=0)


@needs_hopper
def test_persistent_only_forced_blocks_and_dropped_diagonals():
    """Rows with only forced blocks; rows without their diagonal block (odd rows keep block i-1)."""
    n = 1024
    q, k, v = qkv(1, 4, 1, n, 128, torch.bfloat16, seed=5)
    plan = random_plan(1, 4, 1, n, 128, 256, p=0.0, seed=5)
    check(q, k, v, to_device(plan), perm_mode="persistent")
    dense = plan.to_dense()
    rows = torch.arange(dense.shape[-2])
    drop = rows % 2 == 1
    dense[..., rows[drop], rows[drop]] = False
    cols = torch.arange(dense.shape[-1])
    num = dense.sum(-1, dtype=torch.int32)
    idx = torch.where(dense, cols, cols + dense.shape[-1]).sort(-1).indices.to(torch.int32)
    check(q, k, v, to_device(PermutedBlockMask(plan.perm, num, idx, 128, 256, n)), perm_mode="persistent")


@needs_hopper
@pytest.mark.parametrize("head_major", [False, True])
def test_persistent_empty_rows_write_zeros(head_major):
    """Plan rows without any kept block (a user's plan may have them) write zeros: every third query
    block, and all of one head (long runs of such tiles, and the last tiles of the programs). The
    other rows are bit for bit those of the same plan with those rows kept."""
    n = 1500
    q, k, v = qkv(1, 4, 1, n, 128, torch.bfloat16, seed=6)
    plan = to_device(random_plan(1, 4, 1, n, 128, 256, p=0.3, seed=6))
    empty = torch.zeros(plan.kv_num_blocks.shape, dtype=torch.bool, device=q.device)
    empty[..., ::3] = True
    empty[:, 1] = True
    part = PermutedBlockMask(plan.perm, plan.kv_num_blocks.masked_fill(empty, 0), plan.kv_indices, 128, 256, n)
    cfg = {"head_major": head_major, "programs": 3}
    whole = A.pbs_attention(q, k, v, plan, perm_mode="persistent", config=cfg)
    out = torch.full_like(q, float("nan"))
    A.pbs_attention(q, k, v, part, perm_mode="persistent", config=cfg, out=out)
    rows = empty.repeat_interleave(128, -1)[..., :n]
    assert (out[rows] == 0).all()
    torch.testing.assert_close(out[~rows], whole[~rows], atol=0, rtol=0)


@needs_hopper
@pytest.mark.parametrize("d", [64, 128])
def test_persistent_reads_token_major_views_in_place(d):
    """q, k, v as transformers passes them, (B, H, N, D) views of (B, N, H, D)-contiguous tensors: the
    persistent kernel reads them without copies and writes its output in that layout, bit-identical
    to the same call on contiguous copies; batch 2, GQA 3, an odd length, whole plans and a row chunk."""
    n, h_q, h_kv = 1100, 6, 2
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in qkv(2, h_q, h_kv, n, d, torch.bfloat16, seed=5))
    assert all(A.token_major(x) for x in (q, k, v)) and A.keeps_layout("persistent", q, k, v)
    plan = to_device(random_plan(2, h_q, h_kv, n, 128, 256, p=0.4, seed=5))
    want = A.pbs_attention(q.contiguous(), k.contiguous(), v.contiguous(), plan, perm_mode="persistent")
    got = A.pbs_attention(q, k, v, plan, perm_mode="persistent")
    assert A.token_major(got)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    out = torch.full_like(q, float("nan"))  # token-major too, and a chunk of rows
    part = PermutedBlockMask(plan.perm, plan.kv_num_blocks[:, :, 2:5].contiguous(),
                             plan.kv_indices[:, :, 2:5].contiguous(), 128, 256, n, row_offset=2)
    A.pbs_attention(q, k, v, part, perm_mode="persistent", out=out,
                    permuted=A.copies_for("persistent", k, v, plan.perm))
    torch.testing.assert_close(out[:, :, 256:640], want[:, :, 256:640], atol=0, rtol=0)
    assert out[:, :, :256].isnan().all() and out[:, :, 640:].isnan().all()


@needs_hopper
def test_persistent_row_chunk_writes_only_its_rows():
    n = 1100
    q, k, v = qkv(1, 4, 2, n, 64, torch.bfloat16, seed=9)
    plan = to_device(random_plan(1, 4, 2, n, 128, 256, p=0.4, seed=9))
    whole = A.pbs_attention(q, k, v, plan, perm_mode="persistent")
    copies = A.copies_for("persistent", k, v, plan.perm)
    out = torch.full_like(q, float("nan"))
    r0, r1 = 3, 6
    part = PermutedBlockMask(plan.perm, plan.kv_num_blocks[:, :, r0:r1].contiguous(),
                             plan.kv_indices[:, :, r0:r1].contiguous(), 128, 256, n, row_offset=r0)
    A.pbs_attention(q, k, v, part, perm_mode="persistent", out=out, permuted=copies)
    rows = slice(r0 * 128, r1 * 128)
    torch.testing.assert_close(out[:, :, rows], whole[:, :, rows], atol=0, rtol=0)
    assert out[:, :, : r0 * 128].isnan().all() and out[:, :, r1 * 128 :].isnan().all()


@needs_hopper
def test_persistent_bit_identical_to_itself_and_close_to_tma():
    """Deterministic (same tiles, same order of blocks) and within bf16 rounding of the "tma" kernel."""
    q, k, v = qkv(1, 4, 1, 2048, 128, torch.bfloat16, seed=4)
    plan = to_device(random_plan(1, 4, 1, 2048, 128, 256, p=0.2, seed=4))
    a = A.pbs_attention(q, k, v, plan, perm_mode="persistent")
    b = A.pbs_attention(q, k, v, plan, perm_mode="persistent")
    assert torch.equal(a, b)
    torch.testing.assert_close(a.float(), A.pbs_attention(q, k, v, plan, perm_mode="tma").float(), atol=2e-2, rtol=0)


def test_persistent_refuses_what_it_cannot_run(monkeypatch):
    """Off Hopper (or for fp32, other head_dims, other block sizes) the mode says what to use instead."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors then pass the Triton path's own check
    q, k, v = (torch.randn(1, 2, 256, 64) for _ in range(3))
    plan = random_plan(1, 2, 2, 256, 128, 256, p=0.5)
    assert not A.persistent_supported(q, 128)
    with pytest.raises(ValueError, match="perm_mode='auto'"):
        A.pbs_attention(q.half(), k.half(), v.half(), plan, perm_mode="persistent")


@needs_hopper
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("b,h_q,h_kv,n", [(1, 4, 1, 600), (2, 6, 2, 1100), (1, 2, 2, 130)])
def test_persistent_64_token_blocks(d, b, h_q, h_kv, n):
    """64-token plans (the ``default`` preset's blocks), where each program has one consumer group and two
    programs share an SM: against the fp64 oracle; the same output with one program, with 3, and with a
    fixed stride; from token-major views (written in that layout); a row chunk writes only its rows."""
    q, k, v = qkv(b, h_q, h_kv, n, d, torch.bfloat16, seed=n + d)
    plan = to_device(random_plan(b, h_q, h_kv, n, 64, 256, p=0.4, seed=n))
    whole = check(q, k, v, plan, perm_mode="persistent")
    for cfg in ({"programs": 1}, {"programs": 3}, {"dynamic": False}, {"head_major": False}):
        torch.testing.assert_close(A.pbs_attention(q, k, v, plan, perm_mode="persistent", config=cfg), whole,
                                   atol=0, rtol=0)
    tq, tk, tv = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    got = A.pbs_attention(tq, tk, tv, plan, perm_mode="persistent")
    assert A.token_major(got)
    torch.testing.assert_close(got, whole, atol=0, rtol=0)
    r0, r1 = 1, 3
    part = PermutedBlockMask(plan.perm, plan.kv_num_blocks[:, :, r0:r1].contiguous(),
                             plan.kv_indices[:, :, r0:r1].contiguous(), 64, 256, n, row_offset=r0)
    out = torch.full_like(q, float("nan"))
    A.pbs_attention(q, k, v, part, perm_mode="persistent", out=out,
                    permuted=A.copies_for("persistent", k, v, plan.perm))
    torch.testing.assert_close(out[:, :, r0 * 64 : r1 * 64], whole[:, :, r0 * 64 : r1 * 64], atol=0, rtol=0)
    assert out[:, :, : r0 * 64].isnan().all() and out[:, :, r1 * 64 :].isnan().all()


def test_auto_keeps_64_token_plans_off_the_persistent_kernel_until_measured(monkeypatch):
    """Where the persistent kernel can run (here: made to look so), "auto" picks it for 128-token plans
    only; 64-token plans take it when asked for by name (``perm_mode="persistent"``, or ``PBS_PERM_MODE``)."""
    monkeypatch.setattr(A, "persistent_supported", lambda q, block_size: True)
    q = torch.empty(1, 1, 1, 128, device="meta", dtype=torch.bfloat16)
    assert A._auto_mode(131072, 128, q) == "persistent"
    assert A._auto_mode(131072, 64, q) == "tma" and A._auto_mode(4096, 64, q) == "remap"
