"""GPU block selection with sampled-row scoring (score "sampled", and "sampled_max" of the ``default``
preset) and the ranking options beyond the published method (threshold_scope "total", row_top, local
blocks).

Twin of ``reference.select_blocks(q, reference.permute_keys(k, perm), perm, config, k=k)``. Two
launches per chunk of query blocks, no host syncs: ``_sampled_lse_kernel`` scores the sampled rows
against every key tile once (no (rows x N) score matrix; keys before a row's segment gathered through
the permutation, or with ``SampledTiles.copy_keys`` read from one permuted copy of K) and stores per row
and tile a log-sum-exp, and per row its ``row_top`` best off-diagonal blocks; ``_sampled_top_p_kernel``
averages the rows' block masses, forces those blocks and ranks top-p (the pooled selection's bisection,
no sort). With ``SampledTiles.gluon`` (block maxima on Hopper) ``sampled_gluon`` scores the key blocks
before each program's own segments first and ``_sampled_lse_kernel`` resumes from its state.
Memory: one fp32 buffer (B, H_q, C, m, N_b) for a chunk of C query blocks, at most ``_BUFFER_BYTES``
(and the copy of K, B x H_perm x N x D, with ``copy_keys``).
"""

from __future__ import annotations

import math

import torch
import triton

from .. import plan_rules
from ..config import PBSConfig
from . import sampled_gluon
from . import select as pooled
from .launching import ensure_allocator, interpreting, last_dim_contiguous
from .antidiagonal_kernel import _antidiagonal_lse_kernel
from .sampled_kernel import _sampled_lse_kernel, _sampled_top_p_kernel
from .tiles import SAMPLED_TILES, SampledTiles

# Upper bound of the per-chunk per-row mass buffer: 256 MiB (SmolLM2 at 32K in one chunk; 64 query
# blocks of 64 tokens per chunk for 32 heads at 128K).
_BUFFER_BYTES = 256 << 20


def _check(q: torch.Tensor, k: torch.Tensor, perm: torch.Tensor, config: PBSConfig) -> None:
    b, h_q, n, _ = q.shape
    h_kv, h_perm = k.shape[1], perm.shape[1]
    if h_q % h_perm or h_perm % h_kv:
        raise ValueError(f"heads must nest: H_q={h_q}, H_perm={h_perm}, H_kv={h_kv} "
                         "(expected H_perm = H_kv or H_q, and H_q a multiple of H_kv)")
    if perm.shape != (b, h_perm, n):
        raise ValueError(f"perm has shape {tuple(perm.shape)}, expected ({b}, {h_perm}, {n})")
    if config.needs_reference_selection():
        raise ValueError("this GPU path has no score=mean_query, importance_rows=strided or "
                         f"permute_heads=auto; run them through pbs_kernels.select (the reference), got {config}")


def _block_lse(q: torch.Tensor, k: torch.Tensor, perm: torch.Tensor, config: PBSConfig, r0: int, r1: int,
               scale: float, out: torch.Tensor, lse: torch.Tensor, tiles: SampledTiles,
               k_perm: torch.Tensor | None = None, top: tuple[torch.Tensor, torch.Tensor] | None = None,
               rscale: torch.Tensor | None = None) -> None:
    """Run the kernel for query blocks [r0, r1) into ``out`` fp32 (B*H_q, C, m, N_b) (per-tile
    log-sum-exp) and ``lse`` fp32 (B*H_q, C, m) (per-row log-sum-exp), launched with ``tiles``. q, k
    last-dim contiguous; k_perm: k in ``perm`` order (B, H_perm, N, D), read instead of gathering
    through perm; top: fp32 / int32 (B*H_q, C, m, row_top), each row's ``config.row_top`` best
    off-diagonal blocks (None: not listed); rscale: fp32 (B, H_q, N_b * m) with float8 sampled rows and k
    (``_float8_inputs``)."""
    tiles = tiles.fitting(q.element_size()) if q.is_cuda else tiles  # the interpreter has no shared-memory bound
    row_top = config.row_top if top is not None else 0
    topv, topi = top if top is not None else (lse, lse)  # unread without row_top
    if config.score == "antidiagonal":
        _stripe_lse(q, k, perm, config, r0, r1, scale, out, lse, topv, topi, row_top, tiles)
        return
    b, h_q, _, d = q.shape  # with float8, q holds the sampled rows alone
    n = k.shape[2]
    bs = config.block_size
    m = config.sample_rows
    m_pow2 = triton.next_power_of_2(m)
    heads = _heads_per_program(tiles.heads, h_q // perm.shape[1])
    qb = max(1, tiles.rows // (heads * m_pow2))  # query blocks per program
    block_r = max(16, triton.next_power_of_2(heads * qb * m_pow2))
    kp = k if k_perm is None else k_perm
    grid = (triton.cdiv(r1 - r0, qb), b * h_q // heads)
    tma = _descriptor_loads(kp, k_perm is not None, tiles)
    lpart = lse  # unread without the Gluon kernel
    resume = tiles.gluon and sampled_gluon.supported(q, k_perm, config, block_r, tma)
    if resume:  # the key blocks before each program's own segments, in Gluon; the Triton kernel resumes
        lpart = torch.empty_like(lse)
        sampled_gluon.launch(q, k_perm, grid, config, r0, r1, scale, out, lse, lpart, topv, topi, rscale, heads, qb,
                             tiles.key_blocks, row_top)
    _sampled_lse_kernel[grid](
        q, k, kp, perm, out, lse, lpart, topv, topi, rscale if rscale is not None else lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        kp.stride(0), kp.stride(1), kp.stride(2),
        perm.stride(0), perm.stride(1),
        n, triton.cdiv(n, bs), r0, r1, h_q, h_q // k.shape[1], h_q // perm.shape[1], config.segment_size // bs,
        scale * math.log2(math.e),
        M=m, M_POW2=m_pow2, STEP=bs // m, GEOMETRIC=config.sample_spacing == "geometric", QB=qb, HP=heads,
        BLOCK_R=block_r,
        BLOCK_N=bs, KB=tiles.key_blocks, MAX=config.score in PBSConfig.BLOCK_MAXIMA, COPY=k_perm is not None,
        TMA=tma, FP8=rscale is not None,
        ROW_TOP=row_top, RT_POW2=triton.next_power_of_2(max(1, row_top)), HEAD_DIM=d,
        D_POW2=max(16, triton.next_power_of_2(d)), IEEE=q.dtype == torch.float32, RESUME=resume,
        **tiles.launch_options(),
    )


def _descriptor_loads(kp: torch.Tensor, copied: bool, tiles: SampledTiles) -> bool:
    """Whether the scoring reads the permuted copy of K through a TMA tensor descriptor: ``tiles.tma``, a
    contiguous copy with a power-of-two head_dim (the descriptor's tile is whole rows)."""
    d = kp.shape[-1]
    if not (tiles.tma and copied and kp.is_contiguous() and d & (d - 1) == 0):
        return False
    if kp.is_cuda:
        ensure_allocator()
    return True


def _heads_per_program(wanted: int, shared: int) -> int:
    """Query heads per scoring program: the largest divisor of ``shared`` (query heads per permutation,
    which also share a key head) that is at most ``wanted``."""
    return max(h for h in range(1, min(wanted, shared) + 1) if shared % h == 0)


def _stripe_lse(q: torch.Tensor, k: torch.Tensor, perm: torch.Tensor, config: PBSConfig, r0: int, r1: int,
                scale: float, out: torch.Tensor, lse: torch.Tensor, topv: torch.Tensor, topi: torch.Tensor,
                row_top: int, tiles: SampledTiles) -> None:
    """``_block_lse`` for score "antidiagonal": ``tiles.rows`` query stripes x ``tiles.key_stripes`` key
    stripes per tile (at least one block's m stripes)."""
    b, h_q, n, d = q.shape
    m = config.sample_rows  # a power of two: it divides block_size
    qb = max(1, tiles.rows // m)
    block_r = max(16, triton.next_power_of_2(qb * m))
    kb = max(1, max(16, tiles.key_stripes) // m)
    _antidiagonal_lse_kernel[(triton.cdiv(r1 - r0, qb), b * h_q)](
        q, k, perm, out, lse, topv, topi,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        perm.stride(0), perm.stride(1),
        n, triton.cdiv(n, config.block_size), r0, r1, h_q, h_q // k.shape[1], h_q // perm.shape[1],
        config.segment_size // config.block_size, scale / (config.block_size // m) * math.log2(math.e),
        M=m, S=config.block_size // m, QB=qb, BLOCK_R=block_r, KB=kb,
        ROW_TOP=row_top, RT_POW2=triton.next_power_of_2(max(1, row_top)), HEAD_DIM=d,
        D_POW2=max(16, triton.next_power_of_2(d)), IEEE=q.dtype == torch.float32,
        **tiles.launch_options(),
    )


def sampled_block_mass(q: torch.Tensor, k: torch.Tensor, perm: torch.Tensor, config: PBSConfig,
                       r0: int, r1: int, scale: float | None = None, *,
                       tiles: SampledTiles = SAMPLED_TILES) -> torch.Tensor:
    """fp32 (B, H_q, C, m, N_b): softmax mass of each sampled row of query blocks [r0, r1) on every
    key block, in the layout that the row's query block reads (each row sums to 1).

    q (B, H_q, N, D), k (B, H_kv, N, D) in ORIGINAL order, perm int32 (B, H_perm, N). Twin of
    ``reference.sampled_block_mass(q, k_all, kp_all, config, r0, r1, scale, per_row=True)`` (k_all,
    kp_all: original and permuted keys expanded to the query heads).
    """
    _check(q, k, perm, config)
    b, h_q, n, d = q.shape
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    n_b = triton.cdiv(n, config.block_size)
    if not 0 <= r0 < r1 <= n_b:
        raise ValueError(f"query blocks [r0, r1) = [{r0}, {r1}) must lie in [0, {n_b}) with r0 < r1")
    c, m = r1 - r0, config.sample_rows
    # -inf where the kernel writes nothing: key blocks after a program's last query block
    out = torch.full((b * h_q, c, m, n_b), float("-inf"), dtype=torch.float32, device=q.device)
    lse = torch.empty(b * h_q, c, m, dtype=torch.float32, device=q.device)
    q, k, perm = last_dim_contiguous(q), last_dim_contiguous(k), perm.to(torch.int32).contiguous()
    q, k, rscale = _float8_inputs(q, k, config)
    k_perm = _permuted_keys(k, perm, config, tiles)
    _block_lse(q, k, perm, config, r0, r1, scale, out, lse, tiles, k_perm, rscale=rscale)
    return out.sub_(lse[..., None]).exp_().view(b, h_q, c, m, n_b)


def select_blocks(q: torch.Tensor, k: torch.Tensor, perm: torch.Tensor, config: PBSConfig,
                  scale: float | None = None, buffer_bytes: int = _BUFFER_BYTES, *,
                  tiles: SampledTiles = SAMPLED_TILES) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_num_blocks int32 (B, H_q, N_qb), kv_indices int32 (B, H_q, N_qb, N_kb)), equal to the
    reference's plan (up to exact ties of the block masses).

    q (B, H_q, N, D); k (B, H_kv, N, D) in ORIGINAL order; perm int32 (B, H_perm, N). Handles
    score "sampled", "sampled_max", "antidiagonal" and "pooled" with any threshold_scope / row_top /
    local_blocks / sink (for the published pooled options ``pbs_kernels.triton.select`` is the faster,
    fused path). ``tiles``: the launch of the sampled-row scoring (``pbs_kernels.triton.tiles``).
    """
    _check(q, k, perm, config)
    b, h_q, n, d = q.shape
    bs = config.block_size
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    n_b = triton.cdiv(n, bs)
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    perm = perm.to(torch.int32).contiguous()
    g = h_q // perm.shape[1]
    q, k, rscale = _float8_inputs(q, k, config)
    k_perm = _permuted_keys(k, perm, config, tiles)
    num = torch.empty(b, h_q, n_b, dtype=torch.int32, device=q.device)

    if config.score == "pooled":  # pooled means (Triton), scores and ranking in torch (plan_rules)
        sink = plan_rules.sink_block(perm, bs).repeat_interleave(g, dim=1)  # (B, H_q)
        q_bar = pooled.pool_blocks(q, bs)  # (B, H_q, N_b, D)
        k_bar = pooled.pool_blocks(k, bs, perm).repeat_interleave(g, dim=1)  # (B, H_q, N_b, D), permuted
        # scope "total" also scores the diagonal segment, which attention reads in original order
        k_orig = pooled.pool_blocks(k, bs, heads=h_q) if config.threshold_scope == "total" else None
        rows = max(1, min(n_b, buffer_bytes // (4 * b * h_q * n_b)))
        idx = torch.empty(b, h_q, n_b, n_b, dtype=torch.int32, device=q.device)
        for r0 in range(0, n_b, rows):
            r1 = min(n_b, r0 + rows)
            candidate, causal, forced = plan_rules.chunk_blocks(n_b, r0, r1, config, sink, q.device)
            probs = plan_rules.pooled_block_probs(q_bar[:, :, r0:r1], k_bar, k_orig, candidate, causal, config, scale)
            num[:, :, r0:r1], idx[:, :, r0:r1] = plan_rules.rank_blocks(probs, candidate, forced, config)
        return num, idx

    sink = pooled.sink_block(perm, bs).contiguous()  # (B, H_perm) int32
    # each row's entries past its causal blocks are those blocks in order (the top-p kernel writes each row
    # only up to a power of two above its causal blocks)
    idx = torch.arange(n_b, dtype=torch.int32, device=q.device).expand(b, h_q, n_b, n_b).contiguous()
    m = config.sample_rows
    # query blocks per chunk: as many as the buffer holds
    rows = max(1, min(n_b, buffer_bytes // (4 * b * h_q * m * n_b)))
    buf = torch.empty(b * h_q * rows * m * n_b, dtype=torch.float32, device=q.device)
    lse_buf = torch.empty(b * h_q * rows * m, dtype=torch.float32, device=q.device)
    rt = max(1, config.row_top)
    top_buf = (torch.empty(b * h_q * rows * m * rt, dtype=torch.float32, device=q.device),
               torch.empty(b * h_q * rows * m * rt, dtype=torch.int32, device=q.device))
    for r0 in range(0, n_b, rows):  # fixed host-side chunking: no data-dependent branching
        r1 = min(n_b, r0 + rows)
        c = r1 - r0
        out = buf[: b * h_q * c * m * n_b].view(b * h_q, c, m, n_b)
        lse = lse_buf[: b * h_q * c * m].view(b * h_q, c, m)
        top = tuple(x[: b * h_q * c * m * rt].view(b * h_q, c, m, rt) for x in top_buf)
        _block_lse(q, k, perm, config, r0, r1, scale, out, lse, tiles, k_perm, top, rscale)
        _top_p(out, lse, top, sink, num, idx, config, r0, r1, h_q, g, tiles)
    return num, idx


def _float8_inputs(q: torch.Tensor, k: torch.Tensor, config: PBSConfig):
    """(q, k, rscale) as the scoring reads them. For score "sampled_max_fp8": the sampled rows of q alone
    (B, H_q, N_b * m, D; ``plan_rules.sample_rows``) and k, as float8 with a power-of-two scale per row and
    per key head (``plan_rules.float8_scaled``, the reference's rounding), and rscale fp32 (B, H_q, N_b * m)
    = 1 / (row scale x key scale). Else the inputs as they are and rscale None. A permuted copy of the
    float8 keys (``_permuted_keys``) is the float8 copy of the permuted keys: one scale per key head."""
    if config.score != "sampled_max_fp8":
        return q, k, None
    pos = plan_rules.sample_rows(q.shape[2], config.block_size, config.sample_rows, q.device, config.sample_spacing)
    q8, q_scale = plan_rules.float8_scaled(q[:, :, pos.reshape(-1)], dims=(-1,))
    k8, k_scale = plan_rules.float8_scaled(k)
    rscale = 1.0 / (q_scale * k_scale.repeat_interleave(q.shape[1] // k.shape[1], dim=1)[..., None])
    return q8, k8, rscale.contiguous()


def _permuted_keys(k: torch.Tensor, perm: torch.Tensor, config: PBSConfig, tiles: SampledTiles) -> torch.Tensor | None:
    """With ``tiles.copy_keys``, k in ``perm`` order (B, H_perm, N, D), one copy that the scoring reads in
    place of gathers through perm (score "sampled" / "sampled_max" / "sampled_max_fp8"); else None."""
    if not tiles.copy_keys or config.score not in ("sampled", *PBSConfig.BLOCK_MAXIMA):
        return None
    from .attention import permuted_copies

    return permuted_copies((k,), perm)[0]


def _top_p(out: torch.Tensor, lse: torch.Tensor, top: tuple[torch.Tensor, torch.Tensor], sink: torch.Tensor,
           num: torch.Tensor, idx: torch.Tensor, config: PBSConfig, r0: int, r1: int, h_q: int, g: int,
           tiles: SampledTiles) -> None:
    """Plan rows [r0, r1) into ``num`` / ``idx`` from the per-row tile log-sum-exps and best blocks
    (``top``) of ``_block_lse``. sink int32 (B, H_perm) (H_q = g * H_perm)."""
    n_b = out.shape[-1]
    for lo, hi, nb_pow2 in _causal_widths(r0, r1, n_b):
        # a row per program, a warp per 512 blocks and at least two (H100, Llama shape, sampled_bench --sweep:
        # at 32K 5.03 ms against 6.28 for one warp per two rows; at 128K 97.7 ms with 4 warps, 107.3 with 2);
        # the interpreter takes many rows
        warps = tiles.top_p_warps or max(2, min(16, nb_pow2 // 512))
        rows = tiles.top_p_rows or ((1 << 16) // nb_pow2 if interpreting() else 1)
        block_r = max(1, min(rows, triton.next_power_of_2(hi - lo)))
        _sampled_top_p_kernel[(triton.cdiv(hi - lo, block_r), out.shape[0])](
            out, lse, *top, sink, num, idx,
            r0, lo - r0, hi - lo, r1 - r0, n_b, h_q, g, config.segment_size // config.block_size,
            config.local_blocks,
            config.threshold - 1e-6,  # the reference compares fp32 masses against fp32(threshold - 1e-6)
            M=config.sample_rows, ROW_TOP=config.row_top, TOTAL=config.threshold_scope == "total",
            KEEP_ALL=config.threshold >= 1.0, USE_SINK=config.sink, FORCED_COUNT=config.forced_in_top_p,
            BLOCK_R=block_r, NB_POW2=nb_pow2, num_warps=warps,
        )


def _causal_widths(r0: int, r1: int, n_b: int) -> list[tuple[int, int, int]]:
    """Query blocks [r0, r1) split by the power of two that holds their causal rows: (lo, hi, width) with
    width >= i + 1 for every i in [lo, hi) (at least 16, at most n_b's power of two), so that the top-p kernel
    works on about the causal half of the (rows x N_b) table instead of all of it."""
    full = max(16, triton.next_power_of_2(n_b))
    parts, lo = [], r0
    while lo < r1:
        width = min(full, max(16, triton.next_power_of_2(lo + 1)))
        hi = min(r1, width)
        parts.append((lo, hi, width))
        lo = hi
    return parts
