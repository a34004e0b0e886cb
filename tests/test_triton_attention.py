"""The Triton block-sparse attention kernel against the PyTorch reference and the fp64 oracle (attention_oracle.py).

Without a GPU the kernel runs in the Triton interpreter (TRITON_INTERPRET=1, set per test by a
fixture; the launcher interprets the kernel even when triton was imported earlier) in fp16/fp32 on
tiny shapes. With a GPU the same tests run on CUDA in fp16/bf16.

Tolerance rule (FlashAttention's): err(kernel vs fp64) <= 2 * err(plain PyTorch in the same low
precision vs fp64) + floor, max abs error; outputs are NaN-filled first so an unwritten tile fails.
"""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("triton")

from pbs_kernels import PBSConfig, PermutedBlockMask, build_plan  # noqa: E402
from pbs_kernels import reference as R  # noqa: E402
from pbs_kernels.triton import attention as A  # noqa: E402

from attention_oracle import masked_attention, token_mask  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if ON_GPU else [torch.float16, torch.float32]
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}
SMALL = PBSConfig(block_size=32, segment_size=64, threshold=0.9)


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


# -- inputs and plans -------------------------------------------------------------------------


def qkv(b, h_q, h_kv, n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(dtype).to(DEVICE) for h in (h_q, h_kv, h_kv)]


def random_plan(b, h_q, h_perm, n, block, segment, p, seed=0) -> PermutedBlockMask:
    """Random permutation inside full segments; diagonal segment and sink forced; other causal
    blocks kept with probability p. Independent of the selection code."""
    g = torch.Generator().manual_seed(seed)
    n_b = -(-n // block)
    per_seg = segment // block
    full = n // segment * segment
    perm = torch.arange(n).repeat(b, h_perm, 1)
    if full:
        r = torch.rand(b, h_perm, full // segment, segment, generator=g)
        perm[..., :full] = (r.argsort(-1) + torch.arange(0, full, segment)[:, None]).reshape(b, h_perm, full)
    rows, cols = torch.arange(n_b)[:, None], torch.arange(n_b)[None, :]
    diag = rows // per_seg * per_seg
    sink = ((perm == 0).int().argmax(-1) // block).repeat_interleave(h_q // h_perm, 1)[..., None, None]
    keep = (cols >= diag) & (cols <= rows)
    keep = keep | ((cols < diag) & ((cols == sink) | (torch.rand(b, h_q, n_b, n_b, generator=g) < p)))
    num = keep.sum(-1, dtype=torch.int32)
    idx = torch.where(keep, cols, cols + n_b).sort(-1).indices.to(torch.int32)
    return PermutedBlockMask(perm.to(torch.int32), num, idx, block, segment, n)


def to_device(plan: PermutedBlockMask, device=DEVICE) -> PermutedBlockMask:
    return PermutedBlockMask(plan.perm.to(device), plan.kv_num_blocks.to(device), plan.kv_indices.to(device),
                             plan.block_size, plan.segment_size, plan.seq_len)


# -- the tolerance rule -----------------------------------------------------------------------


def check(q, k, v, plan, **kw):
    """Run the kernel into a NaN-filled output; apply the tolerance rule against the fp64 oracle
    and compare with the PyTorch reference."""
    out = torch.full_like(q, float("nan"))
    A.pbs_attention(q, k, v, plan, out=out, **kw)
    assert not out.isnan().any(), "kernel left NaN (unwritten tile or 0/0)"
    mask = token_mask(plan)
    oracle = masked_attention(q, k, v, mask, torch.float64)
    low = masked_attention(q, k, v, mask, q.dtype)
    err = (out.cpu().double() - oracle).abs().max().item()
    err_pt = (low.double() - oracle).abs().max().item()
    assert err <= 2 * err_pt + FLOOR[q.dtype], f"kernel error {err:.3g} > 2 x PyTorch error {err_pt:.3g} + floor"
    ref = R.block_sparse_attention(q.float(), k.float(), v.float(), plan)
    torch.testing.assert_close(out.float(), ref, atol=2 * err_pt + FLOOR[q.dtype], rtol=0)
    return out


# -- cases ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h_q,h_kv", [(2, 2), (4, 1), (8, 1)])
@pytest.mark.parametrize("mode", [None, "tma"])
def test_gqa_ratios_random_sparse_plan(dtype, h_q, h_kv, mode):
    q, k, v = qkv(1, h_q, h_kv, 192, 64, dtype)
    plan = to_device(random_plan(1, h_q, h_kv, 192, 32, 64, p=0.3))
    assert plan.density() < 0.8
    check(q, k, v, plan, perm_mode=mode)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["remap", "gather", "tma"])
def test_perm_modes_odd_length_batch2(dtype, mode):
    n = 171  # not a multiple of the block (32) or the segment (64)
    q, k, v = qkv(2, 2, 1, n, 64, dtype, seed=1)
    plan = to_device(random_plan(2, 2, 1, n, 32, 64, p=0.4, seed=1))
    check(q, k, v, plan, perm_mode=mode)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [20, 50])
def test_shorter_than_one_segment(dtype, n):
    q, k, v = qkv(1, 3, 1, n, 64, dtype, seed=2)
    plan = build_plan(q.float(), k.float(), SMALL)
    check(q, k, v, plan)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", [None, "tma"])
def test_head_dim_128_and_per_head_permutation(dtype, mode):
    q, k, v = qkv(1, 4, 2, 160, 128, dtype, seed=3)
    plan = to_device(random_plan(1, 4, 4, 160, 32, 64, p=0.5, seed=3))  # one perm per query head
    check(q, k, v, plan, perm_mode=mode)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", [None, "tma"])
def test_only_forced_blocks(dtype, mode):
    q, k, v = qkv(1, 4, 2, 230, 64, dtype, seed=4)
    plan = build_plan(q.float(), k.float(), SMALL.replace(threshold=1e-6))
    # forced per query block: own-segment causal blocks, plus the sink block outside segment 0
    n_b, per_seg = plan.kv_num_blocks.shape[-1], 2
    forced = torch.tensor([i % per_seg + 1 + (i >= per_seg) for i in range(n_b)], dtype=torch.int32)
    assert torch.equal(plan.kv_num_blocks.cpu(), forced.expand_as(plan.kv_num_blocks.cpu()))
    check(q, k, v, plan, perm_mode=mode)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
def test_threshold_one_is_dense_causal(dtype, d):
    n = 150
    q, k, v = qkv(1, 4, 1, n, d, dtype, seed=5)
    plan = build_plan(q.float(), k.float(), SMALL.replace(threshold=1.0))
    assert plan.density() == 1.0
    out = check(q, k, v, plan)
    qd, kd, vd = (x.cpu().double() for x in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)
    # the same rule against the independent dense oracle: PyTorch's own SDPA in ``dtype`` sets the scale
    low = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    err_pt = (low.cpu().double() - sdpa).abs().max().item()
    assert (out.cpu().double() - sdpa).abs().max().item() <= 2 * err_pt + FLOOR[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_m,block_n", [(32, 16), (16, 32)])
def test_tiles_smaller_than_plan_blocks(dtype, block_m, block_n):
    q, k, v = qkv(1, 2, 1, 190, 64, dtype, seed=6)
    plan = to_device(random_plan(1, 2, 1, 190, 32, 64, p=0.5, seed=6))
    check(q, k, v, plan, config={"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4, "num_stages": 2})


@pytest.mark.parametrize("d,block_n", [(64, None), (128, None), (64, 64), (128, 64)])
def test_tma_with_128_token_blocks(d, block_n):
    """The "tma" mode on 128-token plans, odd N, GQA 4; also with 64-key tiles, two per plan block (the
    causal mask of the diagonal block then spans two tiles)."""
    dtype = DTYPES[-1]
    n = 600
    q, k, v = qkv(1, 4, 1, n, d, dtype, seed=11)
    plan = to_device(random_plan(1, 4, 1, n, 128, 256, p=0.5, seed=11))
    tiles = None if block_n is None else {"BLOCK_M": 64, "BLOCK_N": block_n, "num_warps": 4, "num_stages": 2}
    check(q, k, v, plan, perm_mode="tma", config=tiles)


@pytest.mark.parametrize("mode", ["remap", "tma"])
def test_plan_without_some_diagonal_blocks(mode):
    """A plan need not keep block i for query block i: then no key of block i is read."""
    dtype = DTYPES[0]
    q, k, v = qkv(1, 2, 1, 200, 64, dtype, seed=8)
    plan = random_plan(1, 2, 1, 200, 32, 64, p=0.5, seed=8)
    dense = plan.to_dense()
    rows = torch.arange(dense.shape[-2])
    drop = (rows % 2 == 1)  # odd rows keep block i-1 of their own segment, not block i
    dense[..., rows[drop], rows[drop]] = False
    cols = torch.arange(dense.shape[-1])
    num = dense.sum(-1, dtype=torch.int32)
    idx = torch.where(dense, cols, cols + dense.shape[-1]).sort(-1).indices.to(torch.int32)
    plan = to_device(PermutedBlockMask(plan.perm, num, idx, 32, 64, 200))
    check(q, k, v, plan, perm_mode=mode)


def test_plan_block_64_and_scale():
    dtype = DTYPES[0]
    q, k, v = qkv(1, 2, 1, 300, 64, dtype, seed=7)
    plan = to_device(random_plan(1, 2, 1, 300, 64, 128, p=0.5, seed=7))
    out = torch.full_like(q, float("nan"))
    A.pbs_attention(q, k, v, plan, scale=0.05, out=out)
    ref = R.block_sparse_attention(q.float(), k.float(), v.float(), plan, scale=0.05)
    torch.testing.assert_close(out.float(), ref, atol=3e-3, rtol=0)


@pytest.mark.parametrize("mode", ["remap", "tma"])
def test_plan_rows_chunk_writes_only_its_rows(mode):
    """A plan of query blocks r0..r1-1 (``row_offset``) computes exactly those rows of the whole plan's
    output; the permuted copies may come from the caller."""
    dtype = DTYPES[0]
    n = 300
    q, k, v = qkv(1, 4, 2, n, 64, dtype, seed=9)
    plan = to_device(random_plan(1, 4, 2, n, 32, 64, p=0.4, seed=9))
    whole = A.pbs_attention(q, k, v, plan, perm_mode=mode)
    out = torch.full_like(q, float("nan"))
    copies = A.copies_for(mode, k, v, plan.perm)
    for r0, r1 in ((3, 7), (0, 3), (7, 10)):
        part = PermutedBlockMask(plan.perm, plan.kv_num_blocks[:, :, r0:r1].contiguous(),
                                 plan.kv_indices[:, :, r0:r1].contiguous(), 32, 64, n, row_offset=r0)
        assert part.causal_blocks() == 4 * sum(i + 1 for i in range(r0, r1))
        before = out.clone()
        A.pbs_attention(q, k, v, part, perm_mode=mode, out=out, permuted=copies)
        rows = slice(r0 * 32, min(n, r1 * 32))
        torch.testing.assert_close(out[:, :, rows], whole[:, :, rows], atol=0, rtol=0)
        out[:, :, rows] = before[:, :, rows]
        assert torch.equal(out.isnan(), before.isnan()) and torch.equal(out.nan_to_num(), before.nan_to_num())
        out[:, :, rows] = whole[:, :, rows]
    torch.testing.assert_close(out, whole, atol=0, rtol=0)
    bad = PermutedBlockMask(plan.perm, plan.kv_num_blocks[:, :, :4].contiguous(), plan.kv_indices[:, :, :4].contiguous(),
                            32, 64, n, row_offset=8)
    with pytest.raises(ValueError, match="does not fit"):
        A.pbs_attention(q, k, v, bad)
    with pytest.raises(ValueError, match="whole plans"):
        R.block_sparse_attention(q.float(), k.float(), v.float(), bad)


@pytest.mark.parametrize("h_kv,h_perm,d", [(2, 2, 64), (1, 4, 128), (3, 3, 64)])
def test_permuted_copy_equals_the_reference_gather(h_kv, h_perm, d):
    """The Triton row gather of keys into permuted order, also from a transposed (B, N, H, D) view; keys
    and values in one launch give what two launches give (and tensors of different shapes fall back to
    one launch each)."""
    n = 333
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, n, h_kv, d, generator=g).to(DTYPES[0]).to(DEVICE).transpose(1, 2)  # strided, like transformers'
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(2 * h_perm)]).reshape(2, h_perm, n).to(DEVICE)
    got = A.permuted_copy(x, perm.to(torch.int32))
    assert got.is_contiguous() and got.shape == (2, h_perm, n, d)
    assert torch.equal(got, R.permute_keys(x, perm))
    y = torch.randn(2, h_kv, n, d, generator=g).to(DTYPES[0]).to(DEVICE)  # values: another layout, one launch
    kp, vp = A.permuted_copies((x, y), perm.to(torch.int32))
    assert torch.equal(kp, got)
    assert torch.equal(vp, R.permute_keys(y, perm))
    assert torch.equal(A.permuted_copies((x, y[..., :32].contiguous()), perm)[1], R.permute_keys(y[..., :32], perm))


def test_only_the_persistent_mode_keeps_token_major_layouts():
    """transformers' q, k, v are (B, H, N, D) views of (B, N, H, D)-contiguous tensors: the persistent
    kernel reads them as they are, every other read mode (and any other layout) gets contiguous copies."""
    x = torch.empty(2, 5, 3, 16, device=DEVICE)  # (B, N, H, D)
    tm, hm = x.transpose(1, 2), x.transpose(1, 2).contiguous()
    assert A.token_major(tm) and not A.token_major(hm) and not A.token_major(tm[:, :, ::2])
    assert A.keeps_layout("persistent", tm, tm, tm)
    assert not A.keeps_layout("persistent", tm, hm, tm) and not A.keeps_layout("tma", tm, tm, tm)
    q, k, v = (torch.randn(1, 5, h, 64, device=DEVICE).to(DTYPES[0]).transpose(1, 2) for h in (4, 2, 2))
    plan = to_device(random_plan(1, 4, 2, 5, 16, 32, p=1.0))
    out = A.pbs_attention(q, k, v, plan)  # a copying mode here: contiguous output
    assert out.is_contiguous()


def test_supports():
    dtype = DTYPES[0]
    assert A.supports(torch.empty(1, 2, 8, 64, dtype=dtype, device=DEVICE))
    assert A.supports(torch.empty(1, 2, 8, 128, dtype=dtype, device=DEVICE))
    assert not A.supports(torch.empty(1, 2, 8, 96, dtype=dtype, device=DEVICE))
    assert not A.supports(torch.empty(2, 8, 64, dtype=dtype, device=DEVICE))
    if not ON_GPU:
        assert not A.supports(torch.empty(1, 2, 8, 64, dtype=torch.bfloat16))  # wrong in the interpreter


def test_bad_inputs_say_what_to_do():
    q, k, v = qkv(1, 2, 1, 64, 64, DTYPES[0])
    plan = to_device(random_plan(1, 2, 1, 64, 32, 64, p=1.0))
    with pytest.raises(ValueError, match="perm_mode"):
        A.pbs_attention(q, k, v, plan, perm_mode="bogus")
    with pytest.raises(ValueError, match="out must be"):
        A.pbs_attention(q, k, v, plan, out=torch.empty(1, 2, 64, 32, dtype=q.dtype, device=DEVICE))
    with pytest.raises(ValueError, match="config must be"):
        A.pbs_attention(q, k, v, plan, config="fast")
    other = to_device(random_plan(1, 2, 1, 128, 32, 64, p=1.0))
    with pytest.raises(ValueError, match="plan shape"):
        A.pbs_attention(q, k, v, other)


def test_auto_read_mode_needs_no_plan_values():
    """``auto`` chooses its read mode from shapes and the device alone: on a plan whose tensors hold no
    data (meta device) it still answers, so choosing cannot synchronize with the GPU. Off Hopper (here:
    the meta device) the Gluon kernel never applies and the length decides between remap and
    copy + TMA."""
    def meta_plan(n, block=128, h_q=32, h_kv=8):
        nb = -(-n // block)
        return PermutedBlockMask(torch.empty(1, h_kv, n, dtype=torch.int32, device="meta"),
                                 torch.empty(1, h_q, nb, dtype=torch.int32, device="meta"),
                                 torch.empty(1, h_q, nb, nb, dtype=torch.int32, device="meta"), block, 256, n)

    q = torch.empty(1, 32, 8, 128, device="meta")
    assert A.choose_perm_mode(meta_plan(8192), q) == "remap"
    assert A.choose_perm_mode(meta_plan(A.TMA_MIN_SEQ_LEN - 1), q) == "remap"
    assert A.choose_perm_mode(meta_plan(A.TMA_MIN_SEQ_LEN), q) == "tma"
    assert A.choose_perm_mode(meta_plan(131072), q) == "tma"
    if ON_GPU and A._is_hopper(torch.cuda.current_device()):
        on_gpu = torch.empty(1, 32, 8, 128, device=DEVICE)
        assert A.choose_perm_mode(meta_plan(32768), on_gpu) == "tma"  # fp32: not the Gluon kernel
        assert A.choose_perm_mode(meta_plan(32768), on_gpu.bfloat16()) == "persistent"
        assert A.choose_perm_mode(meta_plan(8192, block=64), on_gpu.bfloat16()) == "remap"
        assert A.choose_perm_mode(meta_plan(131072), on_gpu[..., :64]) == "tma"
        smol = torch.empty(1, 9, 8, 64, device=DEVICE, dtype=torch.bfloat16)  # SmolLM2: copies of 24 MiB at 32K
        assert A.copies_fit_l2(smol, 3, 32768) and not A.copies_fit_l2(smol, 3, 131072)
        assert A.choose_perm_mode(meta_plan(32768, h_q=9, h_kv=3), smol) == "persistent"
        assert A.choose_perm_mode(meta_plan(32768, block=64, h_q=9, h_kv=3), smol) == "tma"


def test_perm_mode_variable_is_read_when_used_and_validated(monkeypatch):
    """``PBS_PERM_MODE`` picks the read mode of calls that name none, read at each call (set after the
    import here); a value the kernel does not know is refused with the allowed values."""
    q = torch.empty(1, 4, 8, 64, device="meta")
    monkeypatch.delenv("PBS_PERM_MODE", raising=False)
    assert A.default_perm_mode() == "auto"
    for mode in A.PERM_MODES:
        monkeypatch.setenv("PBS_PERM_MODE", mode)
        assert A.resolve_perm_mode(1000, 128, q) == mode
        assert A.resolve_perm_mode(1000, 128, q, "remap") == "remap"  # a named mode wins
    monkeypatch.setenv("PBS_PERM_MODE", "")
    assert A.default_perm_mode() == "auto"
    monkeypatch.setenv("PBS_PERM_MODE", "TMA")
    with pytest.raises(ValueError, match=r"^PBS_PERM_MODE='TMA' is not a valid value; use one of auto, tma, gather, "
                                         r"remap, persistent, or unset it$"):
        A.resolve_perm_mode(1000, 128, q)
    from pbs_cli.options import KERNEL_SETTINGS  # what `pbs` refuses before a command runs: the same values

    assert set(KERNEL_SETTINGS["PBS_PERM_MODE"]) == {"auto", *A.PERM_MODES}
