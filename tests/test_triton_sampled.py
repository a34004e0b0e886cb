"""GPU sampled-row block scoring (``pbs_kernels.triton.sampled``) vs an independent definition and
vs the reference selection.

Without a GPU the kernel runs on CPU tensors under ``TRITON_INTERPRET=1`` (conftest.py), in fp32
and fp16; on a CUDA machine the same tests run compiled, in bf16 and fp16.

``layout_masses`` below is the definition, written independently of both implementations: for each
sampled row of query block i it builds the key sequence that block reads (slot s < ds(i)*B holds key
perm[s], slot s >= ds(i)*B holds key s), masks slots after the row, takes the softmax and sums it per
block of B slots. Plans must equal the reference's exactly, except where the reference's own block
masses tie (a tie may swap two blocks at the top-p boundary: same count, same density).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from triton_setup import DEVICE

from pbs_kernels import plan_rules, reference  # noqa: E402
from pbs_kernels.config import PBSConfig  # noqa: E402
from pbs_kernels.triton import sampled  # noqa: E402
from pbs_kernels.triton.tiles import SampledTiles  # noqa: E402

LOW = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # bf16 is wrong in the interpreter
TIE = 1e-6


def structured_qkv(b: int, h_q: int, h_kv: int, n: int, d: int, seed: int = 0):
    """fp32 q (B, H_q, N, D), k (B, H_kv, N, D) with attention structure: shared heavy-hitter key
    directions, a sink-like first token; scores span a wide range so the layout matters."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(3, d, generator=gen)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True) * math.sqrt(d)
    q = 0.6 * torch.randn(b, h_q, n, d, generator=gen) + torch.rand(b, h_q, n, 3, generator=gen) @ dirs
    k = 0.6 * torch.randn(b, h_kv, n, d, generator=gen)
    heavy = torch.rand(b, h_kv, n, 1, generator=gen) < 0.06
    k += heavy * (torch.randint(0, 3, (b, h_kv, n), generator=gen)[..., None] == torch.arange(3)).float() @ dirs
    k[:, :, 0] += dirs[0]
    return q, k


def permutation(q, k, cfg):
    return reference.compute_permutation(q, k, cfg)


def layout_masses(q, k, perm, cfg, r0, r1, dtype=torch.float64, layout="pbs"):
    """(B, H_q, C, m, N_b) per-row block masses from the definition, computed in ``dtype``: the softmax
    over the keys summed per block, or for score "sampled_max" the softmax over each block's largest logit.

    layout "pbs": permuted slots before the diagonal segment, original keys inside it. The broken
    layouts "original" (no permutation anywhere) and "permuted" (permuted inside the diagonal segment
    too) exist to show that the tests would catch them."""
    b, h_q, n, d = q.shape
    bs, m = cfg.block_size, cfg.sample_rows
    n_b = -(-n // bs)
    per_seg = cfg.segment_size // bs
    scale = 1.0 / math.sqrt(d)
    kq = k.repeat_interleave(h_q // k.shape[1], 1).to(dtype)
    pq = perm.long().repeat_interleave(h_q // perm.shape[1], 1)  # (B, H_q, N)
    slots = torch.arange(n)
    out = torch.zeros(b, h_q, r1 - r0, m, n_b, dtype=torch.float64)
    for i in range(r0, r1):
        if cfg.sample_spacing == "geometric":  # the last row, then rows 2**k - 1 from the block's start
            offsets = [bs - 1] + [2 ** (m - 1 - t) - 1 for t in range(1, m)]
        else:
            offsets = [bs - 1 - (bs // m) * t for t in range(m)]
        rows = [min(i * bs + o, n - 1) for o in offsets]
        ds = i // per_seg * per_seg * bs
        if layout == "original":
            src = slots.expand(b, h_q, n)
        elif layout == "permuted":
            src = pq
        else:
            src = torch.where(slots < ds, pq, slots)
        k_lay = torch.gather(kq, 2, src[..., None].expand(-1, -1, -1, d))  # (B, H_q, N, D), this block's layout
        s = (q[:, :, rows].to(dtype) * scale) @ k_lay.transpose(-1, -2)  # (B, H_q, m, N)
        s = s.masked_fill(slots[None, :] > torch.tensor(rows)[:, None], float("-inf"))
        if cfg.score == "sampled_max":  # each block's largest logit, softmax over the blocks
            s = torch.nn.functional.pad(s, (0, n_b * bs - n), value=float("-inf")).reshape(b, h_q, m, n_b, bs)
            out[:, :, i - r0] = s.amax(-1).softmax(-1).double()
            continue
        p = s.softmax(-1).double()
        out[:, :, i - r0] = torch.nn.functional.pad(p, (0, n_b * bs - n)).reshape(b, h_q, m, n_b, bs).sum(-1)
    return out


def ref_select(q, k, perm, cfg):
    return reference.select_blocks(q, reference.permute_keys(k, perm), perm, cfg, k=k)


def assert_plans_equal(q, k, perm, cfg, got, want):
    """Equal plans, except where the reference's own numbers tie within float rounding: in a row
    with the same count, kept blocks may swap with blocks of equal mass (within TIE); a row may keep
    one block more or less only when the reference keeps that set at a threshold within 1e-5 of tau
    (its top-p boundary sits on tau). Plans equal outright in the interpreter's fp32."""
    num, idx = (t.cpu() for t in got)
    r_num, r_idx = (t.cpu() for t in want)
    assert num.dtype == idx.dtype == torch.int32
    assert num.shape == r_num.shape and idx.shape == r_idx.shape
    if torch.equal(num, r_num) and torch.equal(idx, r_idx):
        return
    n_b = idx.shape[-1]

    def kept(n, i):  # bool (..., N_b) kept blocks of packed rows
        return torch.zeros(*i.shape, dtype=torch.bool).scatter(-1, i.long(), torch.arange(n_b) < n[..., None])

    dense, r_dense = kept(num, idx), kept(r_num, r_idx)
    lo, hi = (kept(*ref_select(q, k, perm, cfg.replace(threshold=min(1.0, cfg.threshold + e))))
              for e in (-1e-5, 1e-5))
    mass = reference.sampled_block_mass(
        q.float(), k.float().repeat_interleave(q.shape[1] // k.shape[1], 1),
        reference.permute_keys(k.float(), perm).repeat_interleave(q.shape[1] // perm.shape[1], 1),
        cfg, 0, n_b, 1.0 / math.sqrt(q.shape[-1]), per_row=True).mean(3) if cfg.score != "pooled" else None
    for row in (dense != r_dense).any(-1).nonzero().tolist():
        d_row, r_row = dense[tuple(row)], r_dense[tuple(row)]
        boundary = bool((lo[tuple(row)] <= d_row).all() and (d_row <= hi[tuple(row)]).all())
        swapped = mass is not None and int(d_row.sum()) == int(r_row.sum()) and all(
            (mass[tuple(row)][x] - mass[tuple(row)][y]).abs() <= TIE
            for x, y in zip((d_row & ~r_row).nonzero().flatten(), (r_row & ~d_row).nonzero().flatten()))
        assert boundary or swapped, f"row {row} differs from the reference away from ties"
        assert abs(int(d_row.sum()) - int(r_row.sum())) <= 1


# -- per-row masses ------------------------------------------------------------------------------

SHAPES = [
    # (B, H_q, H_kv, N, block, segment, sample_rows, per_head_permutation)
    (1, 3, 3, 333, 32, 64, 8, False),   # GQA 1, partial last block
    (2, 3, 1, 300, 32, 96, 4, False),   # GQA 3, three blocks per segment
    (1, 4, 1, 257, 16, 64, 16, True),   # GQA 4, per-head permutation, one-row last block
    (1, 2, 2, 50, 16, 64, 3, False),    # N shorter than one segment; 3 rows (not a power of two)
    (1, 8, 1, 150, 16, 32, 2, False),   # GQA 8, one block per segment
    (1, 4, 2, 333, 32, 64, "geometric", False),  # geometric rows 31, 15, 7, 3, 1, 0
]


@pytest.mark.parametrize("case", SHAPES, ids=lambda c: "B{}-Hq{}-Hkv{}-N{}-bs{}-S{}-m{}-ph{}".format(*c))
def test_masses_match_definition_fp32(case):
    b, h_q, h_kv, n, bs, s, m, ph = case
    spacing = "strided"
    if m == "geometric":
        spacing, m = m, bs.bit_length()
    cfg = PBSConfig(block_size=bs, segment_size=s, score="sampled", sample_rows=m, per_head_permutation=ph,
                    sample_spacing=spacing)
    q, k = structured_qkv(b, h_q, h_kv, n, 32, seed=n)
    perm = permutation(q, k, cfg)
    n_b = -(-n // bs)
    got = sampled.sampled_block_mass(q.to(DEVICE), k.to(DEVICE), perm.to(DEVICE), cfg, 0, n_b).cpu()
    want = layout_masses(q, k, perm, cfg, 0, n_b)
    assert got.shape == want.shape == (b, h_q, n_b, m, n_b) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-6)
    # and the reference twin agrees (the plan's ranking runs on these numbers)
    twin = reference.sampled_block_mass(q, k.repeat_interleave(h_q // h_kv, 1),
                                        reference.permute_keys(k, perm).repeat_interleave(h_q // perm.shape[1], 1),
                                        cfg, 0, n_b, 1.0 / math.sqrt(32), per_row=True)
    torch.testing.assert_close(got, twin, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("case", [(*SHAPES[0], 1), (*SHAPES[1], 2), (*SHAPES[2], 4), (*SHAPES[3], 1)],
                         ids=lambda c: "B{}-Hq{}-Hkv{}-N{}-bs{}-S{}-m{}-ph{}-kb{}".format(*c))
def test_block_max_masses_match_definition(case):
    """score "sampled_max": the kernel's softmax over block maxima against the definition (fp32) and the
    reference twin, with tiles of 1, 2 and 4 key blocks; and it is not the per-key softmax's masses."""
    b, h_q, h_kv, n, bs, s, m, ph, key_blocks = case
    cfg = PBSConfig(block_size=bs, segment_size=s, score="sampled_max", sample_rows=m, per_head_permutation=ph)
    q, k = structured_qkv(b, h_q, h_kv, n, 32, seed=n + 1)
    perm = permutation(q, k, cfg)
    n_b = -(-n // bs)
    tiles = SampledTiles(rows=16, key_blocks=key_blocks)
    got = sampled.sampled_block_mass(q.to(DEVICE), k.to(DEVICE), perm.to(DEVICE), cfg, 0, n_b, tiles=tiles).cpu()
    want = layout_masses(q, k, perm, cfg, 0, n_b)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-6)
    twin = reference.sampled_block_mass(q, k.repeat_interleave(h_q // h_kv, 1),
                                        reference.permute_keys(k, perm).repeat_interleave(h_q // perm.shape[1], 1),
                                        cfg, 0, n_b, 1.0 / math.sqrt(32), per_row=True)
    torch.testing.assert_close(got, twin, rtol=1e-5, atol=2e-6)
    summed = layout_masses(q, k, perm, cfg.replace(score="sampled"), 0, n_b)
    assert (got.double() - summed).abs().max() > 1e-2


def test_float8_scaling():
    """plan_rules.float8_scaled: per (batch, head), or per row, a power of two that brings the largest
    magnitude into (224, 448], then torch's float8 e4m3 rounding (3 mantissa bits: relative error at most
    2**-4 for normal values); an all-zero head keeps scale 1."""
    x = torch.randn(2, 3, 50, 16) * torch.tensor([1e-3, 1.0, 900.0])[:, None, None]
    x[1, 2] = 0
    x8, scale = plan_rules.float8_scaled(x)
    assert x8.dtype == torch.float8_e4m3fn and scale.shape == (2, 3)
    assert torch.equal(torch.log2(scale).round(), torch.log2(scale))  # powers of two
    amax = x.abs().amax(dim=(-2, -1)) * scale
    live = amax > 0
    assert ((amax > 224) & (amax <= 448))[live].all() and not live[1, 2] and scale[1, 2] == 1
    rounded = plan_rules.float8_rounded(x)
    torch.testing.assert_close(rounded * scale[..., None, None], x8.float(), rtol=0, atol=0)
    normal = (x * scale[..., None, None]).abs() >= 2 ** -6
    err = ((rounded - x).abs() / x.abs().clamp_min(1e-30))[normal]
    assert 0 < err.max() <= 2 ** -4
    rows8, row_scale = plan_rules.float8_scaled(x, dims=(-1,))  # a scale per row
    assert row_scale.shape == (2, 3, 50)
    row_max = x.abs().amax(-1) * row_scale
    assert ((row_max > 224) & (row_max <= 448))[row_max > 0].all()
    torch.testing.assert_close(plan_rules.float8_rounded(x, dims=(-1,)) * row_scale[..., None], rows8.float(),
                               rtol=0, atol=0)


def reference_masses(q, k, perm, cfg, n_b):
    """The reference twin's per-row masses of all query blocks (keys expanded to the query heads)."""
    h_q = q.shape[1]
    return reference.sampled_block_mass(q, k.repeat_interleave(h_q // k.shape[1], 1),
                                        reference.permute_keys(k, perm).repeat_interleave(h_q // perm.shape[1], 1),
                                        cfg, 0, n_b, 1.0 / math.sqrt(q.shape[-1]), per_row=True)


def float8_mma_rtol(q, k):
    """Relative tolerance of masses from an H100's float8 MMA, which keeps about 14 bits of its running sums:
    at most 2**-12 of the summed |products| per logit for head_dim <= 128, in the block maximum and in the
    row's log-sum-exp."""
    qr, kr = plan_rules.float8_rounded(q, dims=(-1,)), plan_rules.float8_rounded(k)
    g = q.shape[1] // k.shape[1]
    bound = (qr.abs() @ kr.abs().repeat_interleave(g, 1).transpose(-1, -2)).max() / math.sqrt(q.shape[-1])
    return math.expm1(2 * 2 ** -12 * bound.item()) + 1e-5

def test_float8_block_maxima_match_reference():
    """score "sampled_max_fp8": the kernel's masses (sampled rows and keys cast to float8, a scale per row and
    per key head, float8 dot products) against the reference twin, which rounds the same way, with keys
    gathered, copied, or read through TMA; and the rounding shows: they are not the fp32 block maxima's
    masses."""
    b, h_q, h_kv, n, bs, s, m, ph = SHAPES[1]
    cfg = PBSConfig(block_size=bs, segment_size=s, score="sampled_max_fp8", sample_rows=m, per_head_permutation=ph)
    q, k = structured_qkv(b, h_q, h_kv, n, 32, seed=11)
    perm = permutation(q, k, cfg)
    n_b = -(-n // bs)
    twin = reference_masses(q, k, perm, cfg, n_b)
    rtol = float8_mma_rtol(q, k) if DEVICE == "cuda" else 1e-5
    for tiles in (SampledTiles(copy_keys=False), SampledTiles(tma=False), SampledTiles()):
        got = sampled.sampled_block_mass(q.to(DEVICE), k.to(DEVICE), perm.to(DEVICE), cfg, 0, n_b, tiles=tiles).cpu()
        torch.testing.assert_close(got, twin, rtol=rtol, atol=2e-6)
    exact = layout_masses(q, k, perm, cfg.replace(score="sampled_max"), 0, n_b)
    assert (got.double() - exact).abs().max() > 1e-3



HOPPER = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not HOPPER, reason="the Gluon scoring kernel needs a Hopper GPU")
@pytest.mark.parametrize("score, b, h_q, h_kv, n, d, segment, heads, key_blocks", [
    ("sampled_max", 1, 9, 3, 2000, 64, 256, 4, 2),  # the SmolLM2 shape's heads: 3 query heads per program
    ("sampled_max", 2, 8, 2, 1537, 128, 256, 4, 2),  # batch 2, a partial last block, 4 query heads per program
    ("sampled_max", 1, 2, 1, 1400, 128, 192, 1, 1),  # 3 blocks per segment: odd block counts in the Gluon loop
    ("sampled_max_fp8", 1, 4, 1, 1777, 128, 256, 1, 2),  # float8 rows and keys
    ("sampled_max_fp8", 1, 2, 2, 300, 64, 256, 1, 2),  # shorter than two segments: no block to score in Gluon
])
def test_gluon_scoring_matches_reference(score, b, h_q, h_kv, n, d, segment, heads, key_blocks):
    """``SampledTiles(gluon=True)``: the Gluon kernel scores the blocks before each program's segments and
    the Triton kernel resumes from its state. Block maxima in bf16 against the fp64 definition (the
    tolerance rule of the low-precision test) and their plan (row_top 2) against the reference's on the
    same inputs, in one chunk of query blocks and in chunks of 5; float8 against the reference twin within
    the float8 MMA's accumulation bound."""
    cfg = PBSConfig(block_size=64, segment_size=segment, **{**DEFAULT, "score": score, "sample_rows": 16,
                                                             "threshold": 0.99})
    tiles = SampledTiles(gluon=True, heads=heads, key_blocks=key_blocks)
    q, k = structured_qkv(b, h_q, h_kv, n, d, seed=n)
    n_b = -(-n // 64)
    if score == "sampled_max":
        q, k = q.to(torch.bfloat16), k.to(torch.bfloat16)
        perm = permutation(q.float(), k.float(), cfg)
        exact = layout_masses(q, k, perm, cfg, 0, n_b, dtype=torch.float64)
        plain = layout_masses(q, k, perm, cfg, 0, n_b, dtype=torch.bfloat16)
        got = sampled.sampled_block_mass(q.to(DEVICE), k.to(DEVICE), perm.to(DEVICE), cfg, 0, n_b, tiles=tiles)
        err, plain_err = (got.cpu().double() - exact).abs().max().item(), (plain - exact).abs().max().item()
        assert err <= 2 * plain_err + 1e-5, f"kernel error {err:.3g} vs plain bf16 error {plain_err:.3g}"
    else:
        perm = permutation(q, k, cfg)
        got = sampled.sampled_block_mass(q.to(DEVICE), k.to(DEVICE), perm.to(DEVICE), cfg, 0, n_b, tiles=tiles)
        torch.testing.assert_close(got.cpu(), reference_masses(q, k, perm, cfg, n_b), rtol=float8_mma_rtol(q, k),
                                   atol=2e-6)
        return
    want = ref_select(q.float(), k.float(), perm, cfg)
    # one chunk, and chunks of 5 query blocks (the Gluon kernel's rows gathered per chunk)
    for buffer_bytes in (sampled._BUFFER_BYTES, 4 * b * h_q * 16 * n_b * 5):
        plan = sampled.select_blocks(q.to(DEVICE), k.to(DEVICE), perm.to(DEVICE), cfg, tiles=tiles,
                                     buffer_bytes=buffer_bytes)
        assert_plans_equal(q.float(), k.float(), perm, cfg, plan, want)



def gluon_twin(q, k_perm, grid, config, r0, r1, scale, out, lse, lpart, topv, topi, rscale, heads, qb, key_blocks,
               row_top):
    """What ``sampled_gluon.launch`` leaves for the Triton kernel to resume from, from the definition in
    fp64 (fp32 rows, no float8): per program of ``qb`` query blocks from r0, the block maxima of key blocks
    [0, n_perm) of the permuted layout (n_perm = the program's first segment start, rounded down to
    ``key_blocks``) into ``out``, each row's running maximum (log2 units) into ``lse``, its sum of
    exp2(block maximum - that maximum) into ``lpart``, and its ``row_top`` best of those blocks (ties:
    the earlier block) into ``topv`` / ``topi``."""
    b, h_q, n, _ = q.shape
    bs, m = config.block_size, config.sample_rows
    per_seg = config.segment_size // bs
    pos = plan_rules.sample_rows(n, bs, m, q.device, config.sample_spacing)
    keys = k_perm.double().repeat_interleave(h_q // k_perm.shape[1], 1)
    out, lse, lpart = out.view(b, h_q, r1 - r0, m, -1), lse.view(b, h_q, r1 - r0, m), lpart.view(b, h_q, r1 - r0, m)
    for i in range(r0, r1):
        g0 = r0 + (i - r0) // qb * qb
        n_perm = g0 // per_seg * per_seg // key_blocks * key_blocks
        logits = q[:, :, pos[i]].double() @ keys[:, :, : n_perm * bs].transpose(-1, -2) * (scale * math.log2(math.e))
        m_b = logits.reshape(b, h_q, m, n_perm, bs).amax(-1)  # (B, H_q, m, n_perm), log2 units
        out[:, :, i - r0, :, :n_perm] = m_b * math.log(2)
        m_i = m_b.amax(-1) if n_perm else torch.full((b, h_q, m), -math.inf, dtype=torch.float64)
        lse[:, :, i - r0] = m_i
        lpart[:, :, i - r0] = (m_b - m_i[..., None]).exp2().sum(-1)
        if row_top:
            order = torch.sort(m_b, dim=-1, descending=True, stable=True)
            v = torch.full((b, h_q, m, row_top), -math.inf, dtype=torch.float64)
            idx = torch.full((b, h_q, m, row_top), -1)
            v[..., : min(row_top, n_perm)] = order.values[..., :row_top] * math.log(2)
            idx[..., : min(row_top, n_perm)] = order.indices[..., :row_top]
            topv.view(b, h_q, r1 - r0, m, row_top)[:, :, i - r0] = v
            topi.view(b, h_q, r1 - r0, m, row_top)[:, :, i - r0] = idx


@pytest.mark.parametrize("rows, key_blocks, keys", [(16, 1, "copy"), (128, 2, "tma"), (64, 1, "tma")])
def test_resuming_after_the_gluon_part_gives_the_reference(monkeypatch, rows, key_blocks, keys):
    """The Triton kernel's RESUME path and its launcher without a Hopper GPU: the Gluon kernel's part
    written by ``gluon_twin``, the rest scored by the Triton kernel from that state; masses and plan
    against the references. Programs start on, before and past segment starts (3 blocks per segment),
    with 1 or 2 key blocks per tile (the Gluon part ends where the Triton kernel's first loop would), in
    one chunk of query blocks and in chunks of 7."""
    monkeypatch.setattr(sampled.sampled_gluon, "supported", lambda *args: True)
    monkeypatch.setattr(sampled.sampled_gluon, "launch", gluon_twin)
    tiles = SampledTiles(rows=rows, key_blocks=key_blocks, copy_keys=True, tma=keys == "tma", gluon=True)
    cfg = PBSConfig(block_size=16, segment_size=48, **{**DEFAULT, "score": "sampled_max", "sample_rows": 4})
    q, k = structured_qkv(1, 4, 2, 601, 32, seed=rows + key_blocks)
    perm = permutation(q, k, cfg)
    n_b = -(-601 // 16)
    got = sampled.sampled_block_mass(q.to(DEVICE), k.to(DEVICE), perm.to(DEVICE), cfg, 0, n_b, tiles=tiles).cpu()
    torch.testing.assert_close(got.double(), layout_masses(q, k, perm, cfg, 0, n_b), rtol=1e-5, atol=2e-6)
    want = ref_select(q, k, perm, cfg)
    for buffer_bytes in (sampled._BUFFER_BYTES, 4 * 4 * 4 * n_b * 7):  # one chunk; chunks of 7 query blocks
        plan = sampled.select_blocks(q.to(DEVICE), k.to(DEVICE), perm.to(DEVICE), cfg, tiles=tiles,
                                     buffer_bytes=buffer_bytes)
        assert_plans_equal(q, k, perm, cfg, plan, want)


def test_broken_layouts_would_fail():
    """The data make the layout visible: reading original keys before the diagonal segment, or
    permuted keys inside it, moves the masses far beyond the fp32 tolerance above."""
    cfg = PBSConfig(block_size=32, segment_size=64, score="sampled", sample_rows=8)
    q, k = structured_qkv(1, 3, 1, 333, 32, seed=5)
    perm = permutation(q, k, cfg)
    n_b = -(-333 // 32)
    got = sampled.sampled_block_mass(q.to(DEVICE), k.to(DEVICE), perm.to(DEVICE), cfg, 0, n_b).cpu().double()
    for broken in ("original", "permuted"):
        wrong = layout_masses(q, k, perm, cfg, 0, n_b, layout=broken)
        assert (got - wrong).abs().max() > 1e-2, f"layout {broken!r} is indistinguishable"


def test_chunk_offsets_and_explicit_scale():
    """A chunk [r0, r1) that starts inside a segment (not at a program group boundary) equals the
    same rows of the whole; an explicit scale is used."""
    cfg = PBSConfig(block_size=16, segment_size=64, score="sampled", sample_rows=4)
    q, k = structured_qkv(1, 2, 1, 200, 32, seed=3)
    perm = permutation(q, k, cfg).to(DEVICE)
    q, k = q.to(DEVICE), k.to(DEVICE)
    whole = sampled.sampled_block_mass(q, k, perm, cfg, 0, 13, scale=0.1)
    part = sampled.sampled_block_mass(q, k, perm, cfg, 5, 11, scale=0.1)
    # the same sums; on a GPU the program groups start at r0, so fp32 additions may run in another order
    torch.testing.assert_close(part, whole[:, :, 5:11], rtol=1e-6, atol=1e-6)
    want = layout_masses(q.cpu() * (0.1 * math.sqrt(32)), k.cpu(), perm.cpu(), cfg, 5, 11)
    torch.testing.assert_close(part.cpu().double(), want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("score, seed", [("sampled", 11), ("sampled_max", 12)])
def test_masses_low_precision_tolerance_rule(score, seed):
    """err(kernel in fp16/bf16 vs fp64) <= 2 * err(plain PyTorch in the same dtype vs fp64) + floor, for
    per-key masses and block maxima."""
    cfg = PBSConfig(block_size=32, segment_size=64, score=score, sample_rows=8)
    q, k = structured_qkv(1, 4, 2, 300, 64, seed=seed)
    q, k = q.to(LOW), k.to(LOW)
    perm = permutation(q.float(), k.float(), cfg)
    n_b = -(-300 // 32)
    exact = layout_masses(q, k, perm, cfg, 0, n_b, dtype=torch.float64)
    plain = layout_masses(q, k, perm, cfg, 0, n_b, dtype=LOW)  # scores and softmax in LOW
    got = sampled.sampled_block_mass(q.to(DEVICE), k.to(DEVICE), perm.to(DEVICE), cfg, 0, n_b).cpu().double()
    err, plain_err = (got - exact).abs().max().item(), (plain - exact).abs().max().item()
    assert err <= 2 * plain_err + 1e-5, f"kernel error {err:.3g} vs plain {LOW} error {plain_err:.3g}"


# -- antidiagonal stripes (score="antidiagonal") ---------------------------------------------------

STRIPES = [
    # (B, H_q, H_kv, N, block, segment, stripes per block, per_head_permutation, key stripes per tile)
    (1, 3, 3, 333, 32, 64, 4, False, 16),   # GQA 1, partial last block
    (2, 4, 1, 300, 32, 96, 8, False, 64),   # GQA 4, three blocks per segment, tiles of 8 key blocks
    (1, 8, 1, 150, 16, 32, 1, True, 16),    # GQA 8, one stripe per block, per-head permutation
    (1, 2, 2, 50, 16, 64, 16, False, 32),   # N shorter than one segment, stripes of one query
]


@pytest.mark.parametrize("case", STRIPES, ids=lambda c: "B{}-Hq{}-Hkv{}-N{}-bs{}-S{}-m{}-ph{}-kt{}".format(*c))
def test_antidiagonal_masses_match_definition_fp32(case):
    """The stripe kernel against the loop oracle of ``selection_oracle`` (and the reference twin)."""
    from selection_oracle import antidiagonal_masses

    b, h_q, h_kv, n, bs, s, m, ph, key_stripes = case
    cfg = PBSConfig(block_size=bs, segment_size=s, score="antidiagonal", sample_rows=m, per_head_permutation=ph)
    q, k = structured_qkv(b, h_q, h_kv, n, 32, seed=n)
    perm = permutation(q, k, cfg)
    n_b = -(-n // bs)
    tiles = SampledTiles(rows=16, key_stripes=key_stripes)
    got = sampled.sampled_block_mass(q.to(DEVICE), k.to(DEVICE), perm.to(DEVICE), cfg, 0, n_b, tiles=tiles).cpu()
    assert got.shape == (b, h_q, n_b, m, n_b) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), antidiagonal_masses(q, k, perm, cfg), rtol=1e-5, atol=2e-6)
    twin = reference.sampled_block_mass(q, k.repeat_interleave(h_q // h_kv, 1),
                                        reference.permute_keys(k, perm).repeat_interleave(h_q // perm.shape[1], 1),
                                        cfg, 0, n_b, 1.0 / math.sqrt(32), per_row=True)
    torch.testing.assert_close(got, twin, rtol=1e-5, atol=2e-6)


def test_antidiagonal_low_precision_inputs():
    """fp16/bf16 inputs, fp32 accumulation: within fp32 rounding of the fp64 masses of the same inputs."""
    from selection_oracle import antidiagonal_masses

    cfg = PBSConfig(block_size=32, segment_size=64, score="antidiagonal", sample_rows=4)
    q, k = (x.to(LOW) for x in structured_qkv(1, 4, 2, 300, 64, seed=11))
    perm = permutation(q.float(), k.float(), cfg)
    n_b = -(-300 // 32)
    got = sampled.sampled_block_mass(q.to(DEVICE), k.to(DEVICE), perm.to(DEVICE), cfg, 0, n_b).cpu().double()
    torch.testing.assert_close(got, antidiagonal_masses(q, k, perm, cfg), rtol=1e-4, atol=2e-5)


# -- plans ---------------------------------------------------------------------------------------

DEFAULT = dict(score="sampled", sample_rows=8, threshold=0.985, threshold_scope="total", row_top=2)
PLANS = [
    # (B, H_q, H_kv, N, block, segment, options)
    (1, 3, 3, 333, 32, 64, DEFAULT),
    (1, 3, 1, 400, 32, 64, {**DEFAULT, "row_top": 0, "threshold": 0.9}),
    (2, 4, 1, 290, 32, 64, {**DEFAULT, "threshold_scope": "offdiag", "per_head_permutation": True}),
    (1, 4, 2, 300, 32, 96, {**DEFAULT, "threshold_scope": "offdiag", "row_top": 0, "local_blocks": 1,
                            "sample_rows": 4}),
    (1, 2, 2, 417, 32, 64, {**DEFAULT, "sink": False, "threshold": 0.5}),
    (1, 3, 1, 45, 16, 64, DEFAULT),  # N shorter than one segment
    (1, 3, 1, 300, 32, 64, {**DEFAULT, "threshold": 0.05, "row_top": 0}),  # forced blocks only
    (1, 3, 1, 300, 32, 64, {"score": "pooled", "threshold_scope": "total", "threshold": 0.9}),
    (1, 4, 2, 555, 32, 64, {**DEFAULT, "sample_spacing": "geometric", "sample_rows": 5, "local_blocks": 2}),
    (1, 4, 1, 333, 32, 64, {**DEFAULT, "score": "antidiagonal", "sample_rows": 4}),
    (2, 3, 3, 290, 32, 96, {**DEFAULT, "score": "antidiagonal", "sample_rows": 2, "local_blocks": 1}),
    (1, 4, 1, 333, 32, 64, {**DEFAULT, "score": "sampled_max", "threshold": 0.99}),
    (1, 3, 3, 301, 32, 64, {**DEFAULT, "score": "sampled_max", "threshold": 0.99, "sample_rows": 16}),
    (2, 4, 2, 290, 16, 64, {**DEFAULT, "score": "sampled_max", "sample_rows": 16, "threshold_scope": "offdiag"}),
    (1, 8, 1, 150, 16, 32, {**DEFAULT, "score": "sampled_max", "sample_rows": 4, "per_head_permutation": True}),
    (1, 4, 2, 333, 32, 64, {**DEFAULT, "score": "sampled_max_fp8", "threshold": 0.99, "sample_rows": 16}),
    (1, 8, 1, 150, 16, 32, {**DEFAULT, "score": "sampled_max_fp8", "sample_rows": 4, "per_head_permutation": True}),
    # a low tau: the rows' own best blocks (3 each, listed by the scoring kernel) decide most of the plan
    (1, 3, 1, 450, 16, 64, {**DEFAULT, "score": "sampled_max", "threshold": 0.3, "row_top": 3, "sink": False}),
    (1, 2, 1, 400, 32, 64, {**DEFAULT, "score": "antidiagonal", "sample_rows": 4, "threshold": 0.2, "row_top": 1}),
]


@pytest.mark.parametrize("case", PLANS, ids=lambda c: "B{}-Hq{}-Hkv{}-N{}-bs{}-S{}-".format(*c[:6])
                         + "-".join(f"{k}={v}" for k, v in c[6].items() if DEFAULT.get(k) != v))
def test_plan_matches_reference(case):
    b, h_q, h_kv, n, bs, s, opts = case
    cfg = PBSConfig(block_size=bs, segment_size=s, **opts)
    q, k = structured_qkv(b, h_q, h_kv, n, 32, seed=n + h_q)
    perm = permutation(q, k, cfg)
    got = sampled.select_blocks(q.to(DEVICE), k.to(DEVICE), perm.to(DEVICE), cfg)
    assert_plans_equal(q, k, perm, cfg, got, ref_select(q, k, perm, cfg))


@pytest.mark.parametrize("dtype", [torch.float32, LOW])
@pytest.mark.parametrize("threshold,sink", [(0.7, True), (0.5, False)])
def test_pooled_total_scope_scores_the_diagonal_segment_in_original_order(dtype, threshold, sink):
    """score="pooled", threshold_scope="total" on this path: the diagonal segment's blocks are scored
    with keys pooled in original order, the order attention reads them (loop oracle of
    ``selection_oracle``; its inputs make the permuted layout give another plan). GQA 2."""
    from selection_oracle import planted_total_case, pooled_total_plan

    from pbs_kernels.block_mask import PermutedBlockMask

    q, k, perm = planted_total_case(seed=1, h_q=4, h_kv=2)
    q, k = q.to(dtype).float(), k.to(dtype).float()  # the oracle sees the values the kernel reads
    cfg = PBSConfig(block_size=16, segment_size=32, score="pooled", threshold_scope="total", threshold=threshold,
                    sink=sink)
    num, idx = (t.cpu() for t in sampled.select_blocks(q.to(DEVICE, dtype), k.to(DEVICE, dtype), perm.to(DEVICE),
                                                       cfg))
    want = pooled_total_plan(q, k, perm, 16, 32, threshold, sink=sink)
    assert torch.equal(PermutedBlockMask(perm, num, idx, 16, 32, 96).to_dense(), want)
    assert not torch.equal(want, pooled_total_plan(q, k, perm, 16, 32, threshold, sink=sink,
                                                   diagonal_layout="permuted"))


def test_plan_comparison_rejects_a_wrong_row():
    """The tie-tolerant comparison above still fails a plan that drops a block the reference keeps."""
    cfg = PBSConfig(block_size=32, segment_size=64, **DEFAULT)
    q, k = structured_qkv(1, 2, 1, 300, 32, seed=9)
    perm = permutation(q, k, cfg)
    num, idx = ref_select(q, k, perm, cfg)
    bad_num, bad_idx = num.clone(), idx.clone()
    row = bad_idx[0, 1, 5]  # query block 5 keeps its own diagonal block 5 (forced); drop it
    kept = [int(x) for x in row[: int(num[0, 1, 5])] if int(x) != 5]
    bad_num[0, 1, 5] = len(kept)
    bad_idx[0, 1, 5] = torch.tensor(kept + sorted(set(range(row.numel())) - set(kept)), dtype=torch.int32)
    with pytest.raises(AssertionError):
        assert_plans_equal(q, k, perm, cfg, (bad_num, bad_idx), (num, idx))


def test_threshold_one_keeps_every_causal_block():
    cfg = PBSConfig(block_size=32, segment_size=64, **{**DEFAULT, "threshold": 1.0})
    q, k = structured_qkv(1, 3, 1, 301, 32, seed=2)
    perm = permutation(q, k, cfg)
    num, idx = (t.cpu() for t in sampled.select_blocks(q.to(DEVICE), k.to(DEVICE), perm.to(DEVICE), cfg))
    n_b = -(-301 // 32)
    assert torch.equal(num, (torch.arange(n_b) + 1).int().expand_as(num))
    assert torch.equal(idx, torch.arange(n_b).int().expand_as(idx))


def test_chunked_plan_equals_one_chunk():
    """A tiny buffer (many chunks, ending inside segments and inside the top-p kernel's row widths of 16, 32
    and 64 blocks) gives the reference's plan, and the same plan as one chunk."""
    cfg = PBSConfig(block_size=16, segment_size=64, **DEFAULT)
    q, k = structured_qkv(1, 2, 1, 600, 32, seed=4)
    perm = permutation(q, k, cfg)
    want = ref_select(q, k, perm, cfg)
    q, k, perm = q.to(DEVICE), k.to(DEVICE), perm.to(DEVICE)
    one = sampled.select_blocks(q, k, perm, cfg)
    n_b = -(-600 // 16)
    for per_chunk in (3, 7):  # query blocks per chunk (groups of 4 blocks share a segment)
        many = sampled.select_blocks(q, k, perm, cfg, buffer_bytes=4 * 2 * 8 * n_b * per_chunk)
        assert_plans_equal(q.cpu(), k.cpu(), perm.cpu(), cfg, many, want)
        assert all(torch.equal(a, b) for a, b in zip(one, many)), f"{per_chunk} blocks per chunk"


def test_transformers_layout_inputs():
    """q, k as transformers hands them over ((B, N, H, D) storage seen as (B, H, N, D)): same plan
    and masses as contiguous inputs."""
    cfg = PBSConfig(block_size=32, segment_size=64, **DEFAULT)
    q, k = structured_qkv(2, 3, 1, 200, 32, seed=6)
    perm = permutation(q, k, cfg).to(DEVICE)
    q, k = q.to(DEVICE), k.to(DEVICE)
    qt, kt = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    assert qt.stride(2) != q.stride(2)
    for a, b_ in zip(sampled.select_blocks(qt, kt, perm, cfg), sampled.select_blocks(q, k, perm, cfg)):
        assert torch.equal(a, b_)
    torch.testing.assert_close(sampled.sampled_block_mass(qt, kt, perm, cfg, 0, 7),
                               sampled.sampled_block_mass(q, k, perm, cfg, 0, 7), rtol=0, atol=0)


# -- dispatch and errors -------------------------------------------------------------------------


def test_dispatch_routes_sampled_to_the_gpu_path(monkeypatch):
    """With PBS_BACKEND=triton, build_plan permutes with the Triton importance and selects with this
    path for the default-like options; options without a GPU path stay on the reference."""
    from pbs_kernels import attention
    from pbs_kernels.triton import permute as tperm

    monkeypatch.setenv("PBS_BACKEND", "triton")
    cfg = PBSConfig(block_size=32, segment_size=64, **DEFAULT)
    assert cfg.beyond_published() and not cfg.needs_reference_selection()
    q, k = structured_qkv(1, 3, 1, 300, 32, seed=8)
    q, k = q.to(DEVICE), k.to(DEVICE)
    calls = []
    real_sel, real_imp = sampled.select_blocks, tperm.key_importance
    monkeypatch.setattr(sampled, "select_blocks", lambda *a, **kw: calls.append("select") or real_sel(*a, **kw))
    monkeypatch.setattr(tperm, "key_importance", lambda *a, **kw: calls.append("perm") or real_imp(*a, **kw))
    plan = attention.build_plan(q, k, cfg)
    assert calls == ["perm", "select"]
    assert_plans_equal(q.cpu(), k.cpu(), plan.perm.cpu(), cfg, (plan.kv_num_blocks, plan.kv_indices),
                       ref_select(q.cpu(), k.cpu(), plan.perm.cpu(), cfg))

    calls.clear()
    for opts in ({"score": "mean_query"}, {"importance_rows": "strided"}, {"permute_heads": "auto"}):
        c = cfg.replace(**opts)
        assert c.needs_reference_selection()
        attention.build_plan(q, k, c)
        assert "select" not in calls, f"{opts} has no GPU selection"
    monkeypatch.setenv("PBS_BACKEND", "reference")
    attention.build_plan(q, k, cfg)
    assert "select" not in calls


def test_rejects_bad_inputs():
    cfg = PBSConfig(block_size=16, segment_size=32, **DEFAULT)
    q, k = structured_qkv(1, 4, 2, 64, 32)
    perm = reference.identity_permutation(1, 3, 64, "cpu")
    with pytest.raises(ValueError, match="heads must nest"):
        sampled.select_blocks(q.to(DEVICE), k.to(DEVICE), perm.to(DEVICE), cfg)
    perm = reference.identity_permutation(1, 2, 64, "cpu").to(DEVICE)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        sampled.sampled_block_mass(q.to(DEVICE), k.to(DEVICE), perm, cfg, 2, 5)
    with pytest.raises(ValueError, match="mean_query"):
        sampled.select_blocks(q.to(DEVICE), k.to(DEVICE), perm, cfg.replace(score="mean_query"))


_COMPILE = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pbs_kernels.triton.sampled_kernel import _sampled_lse_kernel as kernel, _sampled_top_p_kernel as top_p

def compile(fn, sig, consts, warps):
    sig = {**sig, **{name: "constexpr" for name in consts}}
    try:
        return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    except Exception as exc:
        if "ptxas" in str(exc) and "not found" in str(exc).lower():
            print("SKIP", exc); sys.exit(0)
        raise

def scoring_signature(dtype, copy):  # _sampled_lse_kernel (copy: also a permuted K) and _antidiagonal_lse_kernel
    sig = {"Q": "*" + dtype, "K": "*" + dtype, **({"KP": "*" + dtype} if copy else {}), "PERM": "*i32",
           "OUT": "*fp32", "LSE": "*fp32", **({"LPART": "*fp32"} if copy else {}), "TOPV": "*fp32", "TOPI": "*i32",
           **({"RSCALE": "*fp32"} if copy else {}), "scale_log2": "fp32"}
    for name in ("stride_qb", "stride_qh", "stride_qn", "stride_kb", "stride_kh", "stride_kn",
                 *(("stride_pkb", "stride_pkh", "stride_pkn") if copy else ()), "stride_pb",
                 "stride_ph", "n_keys", "n_b", "r0", "r1", "H_q", "G_KV", "G_PERM", "per_seg"):
        sig[name] = "i32"
    return sig

for dtype, head_dim, block_max in (("bf16", 64, False), ("bf16", 128, False), ("bf16", 128, True), ("fp16", 64, True),
                                   ("fp32", 64, False), ("fp8e4nv", 128, True), ("fp8e4nv", 64, True)):
    consts = dict(M=4, M_POW2=4, STEP=32, GEOMETRIC=head_dim == 128, QB=16 // (1 + 3 * block_max),
                  HP=1 + 3 * block_max, BLOCK_R=64, BLOCK_N=128,
                  KB=1 if dtype == "fp32" else 2, MAX=block_max, COPY=block_max, TMA=block_max,
                  FP8=dtype == "fp8e4nv", ROW_TOP=2 * block_max, RT_POW2=2,
                  HEAD_DIM=head_dim, D_POW2=head_dim,
                  IEEE=dtype == "fp32", RESUME=dtype == "fp8e4nv")  # RESUME: after the Gluon kernel
    assert compile(kernel, scoring_signature(dtype, True), consts, 4).asm["cubin"], (dtype, head_dim, block_max)
    print("compiled", dtype, head_dim, "max" if block_max else "sum")
from pbs_kernels.triton.antidiagonal_kernel import _antidiagonal_lse_kernel as stripes
for dtype, head_dim, m in (("bf16", 128, 4), ("bf16", 64, 8), ("fp16", 64, 1), ("fp32", 64, 16)):
    consts = dict(M=m, S=64 // m, QB=64 // m, BLOCK_R=64, KB=max(1, 64 // m), ROW_TOP=m % 3, RT_POW2=2,
                  HEAD_DIM=head_dim, D_POW2=head_dim, IEEE=dtype == "fp32")
    assert compile(stripes, scoring_signature(dtype, False), consts, 4).asm["cubin"], (dtype, head_dim, m)
    print("compiled stripes", dtype, head_dim, m)
sig = {"OUT": "*fp32", "LSE": "*fp32", "TOPV": "*fp32", "TOPI": "*i32", "SINK": "*i32", "NUM": "*i32",
       "IDX": "*i32", "threshold": "fp32"}
sig.update({name: "i32" for name in ("r0", "sub0", "live", "rows", "n_blocks", "H_q", "Q_PER_PERM",
                                      "blocks_per_seg", "local_blocks")})
consts = dict(M=4, ROW_TOP=2, TOTAL=True, KEEP_ALL=False, USE_SINK=True, FORCED_COUNT=True, BLOCK_R=1,
              NB_POW2=1024)
assert compile(top_p, sig, consts, 1).asm["cubin"]
print("compiled top-p")
"""


def test_kernel_compiles_for_h100():
    """The kernels lower to sm_90 cubins (Triton's compiler and ptxas, no GPU needed): the scoring in
    bf16/fp16/fp32, per-key sums and block maxima (4 heads per program), the antidiagonal stripes (1 to 16
    per 64-token block), and the top-p at 128K tokens (1024 blocks of 128): what the interpreter runs is
    also valid GPU code. Runs in a subprocess without TRITON_INTERPRET (the interpreter replaces
    @triton.jit functions)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    if res.stdout.startswith("SKIP"):
        pytest.skip(res.stdout.strip())
    assert res.stdout.count("compiled") == 12, res.stdout


@pytest.mark.parametrize("rows, key_blocks, heads, keys", [(16, 1, 1, "gather"), (128, 1, 1, "gather"),
                                                           (16, 2, 1, "copy"), (128, 4, 1, "tma"),
                                                           (64, 16, 1, "gather"), (128, 2, 2, "copy"),
                                                           (64, 1, 4, "tma"), (256, 2, 4, "tma")])
def test_program_groups_of_any_size_give_the_reference_plan(rows, key_blocks, heads, keys):
    """Sampled rows per program, key blocks per tile and query heads per program (``SampledTiles``, passed
    as ``tiles=``): 16 rows keep a program inside one segment, 128 rows (32 query blocks of 4 rows) span
    many segments and start mid-segment (3 blocks per segment), so tiles inside a group's span are read
    permuted by some rows and in original order by others; tiles of 2, 4 or 16 key blocks straddle segment
    starts and the end of N; 2 heads per program share a key head (GQA 3 with 6 query heads: 4 asked
    gives 3; with 256 rows, 3 heads x 21 query blocks x 4 rows leave 4 padding rows that point past the
    last query head). ``keys``: permuted keys gathered through the permutation, or read from a copy of K
    by pointer loads or through a TMA tensor descriptor."""
    tiles = SampledTiles(rows=rows, key_blocks=key_blocks, heads=heads, copy_keys=keys != "gather", tma=keys == "tma")
    cfg = PBSConfig(block_size=16, segment_size=48, **{**DEFAULT, "sample_rows": 4})
    q, k = structured_qkv(1, 6, 2, 701, 32, seed=rows + key_blocks + heads)
    perm = permutation(q, k, cfg)
    n_b = -(-701 // 16)
    got = sampled.sampled_block_mass(q.to(DEVICE), k.to(DEVICE), perm.to(DEVICE), cfg, 0, n_b, tiles=tiles).cpu()
    torch.testing.assert_close(got.double(), layout_masses(q, k, perm, cfg, 0, n_b), rtol=1e-5, atol=2e-6)
    plan = sampled.select_blocks(q.to(DEVICE), k.to(DEVICE), perm.to(DEVICE), cfg, tiles=tiles)
    assert_plans_equal(q, k, perm, cfg, plan, ref_select(q, k, perm, cfg))
