"""Launcher of ``sampled_gluon_kernel``: the block maxima of the sampled rows over the key blocks before
each program's own segments, warp-specialized for Hopper, ahead of ``_sampled_lse_kernel`` (launched
with RESUME), which scores the rest. Chosen with ``SampledTiles.gluon``.

Twin of the Triton kernel's first loop (``sampled._block_lse`` without ``gluon``): the same programs,
rows and outputs, so the two paths give the same masses up to the order of the float sums. Memory: one
fp32 value per sampled row (LPART) besides the Triton path's buffers.
"""

from __future__ import annotations

import math

import torch

from .. import plan_rules
from ..config import PBSConfig

ROWS = 128  # two consumer warp groups of 64 rows
HEAD_DIMS = (64, 128)
BLOCK_SIZES = (64, 128)
STAGES = 4  # key-block ring: 4 x 16 KiB at head_dim 128 in bf16 beside 32 KiB of rows
MAX_ROW_TOP = 2


def supported(q: torch.Tensor, k_perm: torch.Tensor | None, config: PBSConfig, rows: int, tma: bool) -> bool:
    """Whether the Gluon kernel scores this launch: a Hopper GPU; block maxima; rows (B, H_q, R, D) in
    float8 e4m3, bf16 or fp16 with head_dim 64 or 128; keys from a permuted copy read through TMA (``tma``);
    128 rows per program (``rows``); sample_rows a power of two; row_top at most 2."""
    from .attention import _is_hopper

    m = config.sample_rows
    return (q.is_cuda and tma and k_perm is not None and config.score in PBSConfig.BLOCK_MAXIMA
            and q.dtype in (torch.float8_e4m3fn, torch.bfloat16, torch.float16) and q.shape[-1] in HEAD_DIMS
            and config.block_size in BLOCK_SIZES and rows == ROWS and m & (m - 1) == 0
            and config.row_top <= MAX_ROW_TOP and _is_hopper(q.device.index or 0))


def launch(q: torch.Tensor, k_perm: torch.Tensor, grid: tuple[int, int], config: PBSConfig, r0: int, r1: int,
           scale: float, out: torch.Tensor, lse: torch.Tensor, lpart: torch.Tensor, topv: torch.Tensor,
           topi: torch.Tensor, rscale: torch.Tensor | None, heads: int, qb: int, key_blocks: int,
           row_top: int) -> None:
    """``sampled_gluon_kernel.sampled_max_permuted_fwd`` on the grid of the Triton scoring (``heads`` query
    heads x ``qb`` query blocks per program). q: with float8 (rscale given) the sampled rows alone (B, H_q,
    N_b * m, D), else all of q (B, H_q, N, D), whose sampled rows of query blocks [r0, r1) are gathered
    here (a quarter of those rows with the default's 16 rows of 64); k_perm: the permuted copy (B, H_perm,
    N, D), contiguous."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from . import sampled_gluon_kernel as KS

    b, h_q, _, d = q.shape
    n = k_perm.shape[2]
    bs, m = config.block_size, config.sample_rows
    n_b = (n + bs - 1) // bs
    fp8 = rscale is not None
    q_blocks, q_block0 = n_b, 0
    if not fp8:
        q_blocks, q_block0 = r1 - r0, r0
        q = q[:, :, plan_rules.sample_rows(n, bs, m, q.device, config.sample_spacing)[r0:r1].reshape(-1)]
    dtype = {torch.float8_e4m3fn: gl.float8e4nv, torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[q.dtype]

    def desc(x: torch.Tensor, rows: int) -> TensorDescriptor:
        flat = x.reshape(-1, d)
        layout = gl.NVMMASharedLayout.get_default_for([rows, d], dtype)
        return TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [rows, d], layout)

    with torch.cuda.device(q.device):
        KS.sampled_max_permuted_fwd[grid](
            desc(q.contiguous(), qb * m), desc(k_perm, bs), out, lse, lpart, topv, topi,
            rscale if fp8 else lse, scale * math.log2(math.e),
            n, n_b, r0, r1, h_q, h_q // k_perm.shape[1], config.segment_size // bs, q_blocks, q_block0,
            HP=heads, QB=qb, M=m, KB=key_blocks, BLOCK=bs, HEAD_DIM=d, STAGES=STAGES, FP8=fp8,
            ROW_TOP=row_top, num_warps=4)
