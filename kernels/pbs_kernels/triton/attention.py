"""Launcher of the Triton block-sparse attention kernel (``attention_kernel.pbs_attn_fwd``).

On CUDA the kernel runs with the tile configuration measured best on an H100 (or, opt-in, autotuned
over a small set of tile shapes); on CPU tensors it runs in the Triton interpreter
(``TRITON_INTERPRET=1``) with a fixed default configuration, for tests.
The plain PyTorch twin is ``pbs_kernels.reference.block_sparse_attention``.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton

from .. import plan_rules
from ..block_mask import PermutedBlockMask
from . import attention_kernel as K
from .launching import ensure_allocator, interpreting
from .permute_kernel import _gather_rows_kernel

SUPPORTED_HEAD_DIMS = (64, 128, 256)
# head_dim 256 (Gemma): the remap and gather modes only, 64x64 tiles; with TMA descriptors even those need
# more than the H100's shared memory (tests/test_kernel_fits_hopper.py); the persistent kernel takes 64
# and 128. Compiled for sm_90 and tested in the interpreter, not timed on a GPU yet.
WIDE_HEAD_MODES = ("remap", "gather")
PERSISTENT_HEAD_DIMS = (64, 128)
PERSISTENT_BLOCKS = (64, 128)  # plan block sizes: two consumer groups of 64 rows per 128-token tile, one per 64
# 0-2: attention_kernel's PERM_MODE; 4: attention_gluon_kernel (Hopper only)
PERM_MODES = {"tma": 0, "gather": 1, "remap": 2, "persistent": 4}
# Default way of reading permuted keys: "auto" picks "persistent" on Hopper in fp16/bf16 with 128-token
# blocks (head_dim 64 and 128); else "remap" for short sequences and "tma" for long ones (BENCHMARKS.md,
# "Read modes of the attention kernel": the persistent kernel measured faster than "tma" at 16K-128K with
# 5-100% of the blocks kept). PBS_PERM_MODE=remap|gather|tma|persistent overrides it (``default_perm_mode``).
PERM_MODE_ENV = "PBS_PERM_MODE"
# Sequence length from which "auto" reads permuted keys from a copy through TMA instead of remapping
# (when "persistent" does not apply). Measured on an H100 (bf16, 128-token blocks, BENCHMARKS.md, "Read modes of
# the attention kernel"): for head_dim 64 at 32K the copy + TMA is 6-19% faster than remap from
# 20% density up and within 1% at 10%, remap 9% faster at 5%; at 128K the copy wins at every density.
# The rule looks at the length, not at the plan's row lengths, so that choosing costs no host
# synchronization (reading the plan's mean stalled the CPU once per layer).
TMA_MIN_SEQ_LEN = 32768


def default_perm_mode() -> str:
    """The read mode asked for by ``PBS_PERM_MODE`` when the call names none: "auto" when unset or empty,
    else one of ``PERM_MODES``; read at each call (a process may set it after importing the kernels)."""
    value = os.environ.get(PERM_MODE_ENV, "")
    if value in ("", "auto"):
        return "auto"
    if value not in PERM_MODES:
        raise ValueError(f"{PERM_MODE_ENV}={value[:40]!r} is not a valid value; use one of "
                         f"{', '.join(['auto', *PERM_MODES])}, or unset it")
    return value


def autotune_requested() -> bool:
    """``PBS_AUTOTUNE=1``: tile configs autotuned on CUDA instead of the measured defaults."""
    return os.environ.get("PBS_AUTOTUNE", "0") not in ("", "0")


def supports(q: torch.Tensor) -> bool:
    """True when the Triton kernel handles q (B, H_q, N, D): head_dim 64, 128 or 256, and either a CUDA
    tensor in fp16/bf16/fp32 or, under ``TRITON_INTERPRET=1``, a CPU tensor in fp16/fp32 (bf16 is
    wrong in the interpreter)."""
    if q.dim() != 4 or q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return False
    if q.is_cuda:
        return q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    return interpreting() and q.dtype in (torch.float16, torch.float32)


# -- configurations ---------------------------------------------------------------------------


def _default_config(plan_block: int, head_dim: int, mode: str, masked: bool = False) -> dict:
    """Fixed tile config: the measured H100 winners (BENCHMARKS.md, "Design choices"),
    the interpreter's config, and the default on CUDA (autotuning is opt-in, see ``pbs_attention``).

    128-token plans: head_dim 128 -> 128x128 tiles, 8 warps, 3 stages (all modes); head_dim 64 ->
    64x128, 4 warps, 3 stages for remap, 128x128, 4 warps, 4 stages for the copy modes. 64-token
    plans: 64x64, 4 warps, 3 stages (not compared with other tiles). Smaller plan blocks: one tile per block.
    ``masked`` (a window, softcap or sinks): the copy modes ("tma", "gather") at head_dim 128 with 2 stages,
    as 3 need more than the H100's 227 KB of shared memory there. head_dim 256: 64x32 tiles, 8 warps, 2
    stages (64x64 tiles with 2 stages need 256 KB). Both checked by tests/test_kernel_fits_hopper.py, not
    timed yet."""
    if head_dim > 128 and plan_block >= 64:  # 256: the 64x256 fp32 accumulator over 8 warps
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    if plan_block >= 128:
        if head_dim > 64:
            copy = mode in ("tma", "gather")
            return {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2 if masked and copy else 3}
        if mode == "remap":
            return {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}
        return {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 4}
    if plan_block == 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": plan_block, "BLOCK_N": plan_block, "num_warps": 4, "num_stages": 2}


def _cuda_configs(plan_block: int, head_dim: int) -> list[triton.Config]:
    """Autotune candidates (BLOCK_M, BLOCK_N, warps, stages), pruned to those that won a sweep of
    all 2x2x5 shapes on an H100 (BENCHMARKS.md) plus the 64-token tiles that 64-token plans need.
    8 warps hold a 128x128 fp32 accumulator for head_dim 128; 3 stages overlap the next tile's
    loads with this tile's math."""
    if head_dim > 128:
        shapes = [(64, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2)]
    elif head_dim > 64:
        shapes = [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3), (64, 64, 8, 3)]
    else:
        shapes = [(128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 4, 3), (128, 64, 4, 4), (64, 64, 4, 3), (64, 64, 4, 4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in shapes if plan_block % bm == 0 and plan_block % bn == 0]


def _sweep_configs(plan_block: int, head_dim: int) -> list[triton.Config]:
    """Every tile shape of the benchmark's sweep (``benchmarks/kernel_bench.py --sweep``)."""
    configs = []
    for bm in (128, 64):
        for bn in (128, 64):
            if plan_block % bm or plan_block % bn:
                continue
            for warps, stages in ((8, 3), (4, 3), (8, 2), (4, 4), (8, 4)):
                if bm == 128 and warps == 4 and head_dim == 128:
                    continue  # 128x128 fp32 accumulator + scores spill with 4 warps
                configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages))
    return configs


@functools.cache
def _autotuned(plan_block: int, head_dim: int, row_bucket: int):
    """One autotuner per (plan block, head_dim, power-of-two bucket of mean kept blocks per row):
    each bucket is tuned on its first call, so a tune at a short length does not serve long ones."""
    keys = ["HEAD_DIM", "PLAN_BLOCK", "PERM_MODE", "SEG_BLOCKS", "WINDOWED", "SOFTCAP", "SINKS"]
    return triton.autotune(configs=_cuda_configs(plan_block, head_dim), key=keys)(K.pbs_attn_fwd)


@functools.cache
def _interpreted(kernel):
    """``kernel`` as an interpreted function, also when this module was imported before
    TRITON_INTERPRET was set (``triton.jit`` decides at decoration time)."""
    from triton.runtime.interpreter import InterpretedFunction

    return kernel if isinstance(kernel, InterpretedFunction) else InterpretedFunction(kernel.fn)


# -- entry point ------------------------------------------------------------------------------


def permuted_copy(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Keys or values in permuted order: x (B, H_kv, N, D) (a strided view is fine when its last dim is
    contiguous), perm (B, H_perm, N) -> (B, H_perm, N, D) contiguous. One Triton row gather
    (``permute_kernel._gather_rows_kernel``) for head_dim a power of two; twin and fallback:
    ``reference.permute_keys``."""
    return permuted_copies((x,), perm)[0]


def permuted_copies(xs: tuple[torch.Tensor, ...], perm: torch.Tensor) -> tuple:
    """``permuted_copy`` of each tensor of ``xs`` (keys and values), one Triton launch per pair of
    tensors of the same shape and dtype: the pair shares its permutation-index loads, and a launch
    less matters where copies take microseconds (CUDA-graph replays at 32K)."""
    b, h_perm, n = perm.shape
    h_kv, d = xs[0].shape[1], xs[0].shape[-1]
    if not copies_supported(xs[0]):
        return tuple(plan_rules.permute_keys(x, perm).contiguous() for x in xs)
    if len(xs) > 2 or len(xs) == 2 and (xs[0].shape != xs[1].shape or xs[0].dtype != xs[1].dtype):
        return tuple(out for x in xs for out in permuted_copies((x,), perm))
    xs = tuple(x if x.stride(-1) == 1 else x.contiguous() for x in xs)
    perm = perm.to(torch.int32).contiguous()
    outs = tuple(torch.empty(b, h_perm, n, d, dtype=x.dtype, device=x.device) for x in xs)
    x, y = xs[0], xs[-1]
    block = 64 if not interpreting() else 1024
    grid = (triton.cdiv(n, block), b * h_perm)
    kernel = _gather_rows_kernel if x.is_cuda else _interpreted(_gather_rows_kernel)
    kernel[grid](x, y, perm, outs[0], outs[-1], n, h_kv, h_perm, *x.stride()[:3], *y.stride()[:3], BLOCK=block,
                 HEAD_DIM=d, PAIR=len(xs) == 2, **({"num_warps": 4} if x.is_cuda else {}))
    return outs


# read modes whose copies are K and V in permuted order and nothing else (what the selection's pooling
# pass can make on the way: ``select.pool_and_copy``)
PLAIN_COPY_MODES = ("gather", "tma", "persistent")


def copies_supported(x: torch.Tensor) -> bool:
    """Whether the Triton row gather copies x (B, H, N, D): head_dim a power of two, on CUDA (or in the
    interpreter); otherwise ``permuted_copies`` falls back to the reference gather."""
    d = x.shape[-1]
    return not d & (d - 1) and (x.is_cuda or interpreting())


def copies_for(mode: str, k: torch.Tensor, v: torch.Tensor, perm: torch.Tensor):
    """What ``pbs_attention(..., permuted=)`` takes for read mode ``mode`` (None for "remap"): the
    permuted copies of k and v ("persistent" reads the original k and v for the query's own segment)."""
    if mode == "remap":
        return None
    return permuted_copies((k, v), perm)


def choose_perm_mode(plan: PermutedBlockMask, q: torch.Tensor) -> str:
    """The "auto" read mode for ``plan`` and queries ``q``. On Hopper with 128-token blocks:
    "persistent" (the persistent Gluon kernel) in fp16/bf16, where it measured fastest for head_dim 64
    and 128 at 32K and 128K with 5-100% of the blocks kept. Otherwise "tma" (permuted copy, descriptor loads) for long sequences,
    where rows keep many blocks, and "remap" for short ones (BENCHMARKS.md). Reads only shapes and the
    device: no host synchronization."""
    return _auto_mode(plan.seq_len, plan.block_size, q)


@functools.cache
def _is_hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] == 9


@functools.cache
def _l2_bytes(index: int) -> int:
    return torch.cuda.get_device_properties(index).L2_cache_size


def copies_fit_l2(q: torch.Tensor, kv_heads: int, seq_len: int) -> bool:
    """Whether the permuted K and V copies of all heads (2 x B x kv_heads x seq_len x D elements of
    q's dtype) fit in the L2 cache of q's GPU. When they do not, the persistent kernel runs the tiles
    of one K/V head together (``_launch_persistent``'s "head_major"), so that the blocks its programs
    read at one time come from L2 more often."""
    copy = 2 * q.shape[0] * kv_heads * seq_len * q.shape[-1] * q.element_size()
    return copy <= _l2_bytes(q.device.index or 0)


def _auto_mode(seq_len: int, block_size: int, q: torch.Tensor) -> str:
    if block_size == 128 and persistent_supported(q, block_size):
        return "persistent"
    return "tma" if seq_len >= TMA_MIN_SEQ_LEN else "remap"


def token_major(x: torch.Tensor) -> bool:
    """Whether x (B, H, N, D) is a view of a (B, N, H, D)-contiguous tensor, as transformers' q, k and
    v are (its projections give (B, N, H·D), viewed and transposed)."""
    return x.dim() == 4 and not x.is_contiguous() and x.transpose(1, 2).is_contiguous()


def keeps_layout(mode: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether read mode ``mode`` reads q, k, v as they are, without contiguous copies: the persistent
    kernel reads (B, N, H, D)-contiguous views directly (and writes its output in that layout), when
    all three are such views; every other case copies them to (B, H, N, D) first."""
    return mode == "persistent" and all(token_major(x) for x in (q, k, v))


# Read modes whose kernel (``attention_kernel.pbs_attn_fwd``) applies a sliding window, soft-capping and sinks;
# "persistent" (its own kernel) does not: ``resolve_perm_mode`` routes such calls here.
MASKING_MODES = ("tma", "gather", "remap")


def resolve_perm_mode(seq_len: int, block_size: int, q: torch.Tensor, perm_mode: str | None = None,
                      masked: bool = False) -> str:
    """The read mode ``pbs_attention`` uses for ``perm_mode`` (None: ``default_perm_mode()``; "auto":
    ``choose_perm_mode``'s rule on CUDA, "remap" in the interpreter) on a plan of ``seq_len`` tokens in
    ``block_size``-token blocks. ``masked`` (a window, a softcap or sinks): "persistent" becomes "tma"
    from ``TMA_MIN_SEQ_LEN`` tokens on, "remap" below, the modes of the kernel that masks. A head_dim over
    128 runs "remap" unless "gather" is asked for (``WIDE_HEAD_MODES``)."""
    name = perm_mode or default_perm_mode()
    if name == "auto":
        name = _auto_mode(seq_len, block_size, q) if q.is_cuda else "remap"
    if name not in PERM_MODES:
        raise ValueError(f"perm_mode must be one of {sorted(PERM_MODES) + ['auto']}, got {name!r}")
    if masked and name not in MASKING_MODES:
        name = "tma" if seq_len >= TMA_MIN_SEQ_LEN else "remap"
    if q.shape[-1] > 128 and name not in WIDE_HEAD_MODES:
        name = "remap"
    return name


def pbs_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PermutedBlockMask,
                  scale: float | None = None, *, perm_mode: str | None = None,
                  config: dict | str | None = None, out: torch.Tensor | None = None,
                  permuted: tuple[torch.Tensor, torch.Tensor] | None = None, window: int | None = None,
                  softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention over the kept key blocks of ``plan`` (Triton).

    q: (B, H_q, N, D); k, v: (B, H_kv, N, D) in original order; H_q a multiple of H_kv.
    plan: ``PermutedBlockMask`` for these shapes, whole or a chunk of rows (``row_offset``): then
        only the query rows of those blocks are computed (and written into ``out``).
        scale: softmax scale (default 1/sqrt(D)).
    perm_mode: how permuted keys are read: "remap" (through ``plan.perm`` inside the kernel, no
        copy), "gather" (one permuted copy of K/V, contiguous tiles), "tma" (the copy, read with
        tensor descriptors), "persistent" (the persistent Gluon kernel
        ``attention_gluon_kernel``: a permuted copy for earlier segments, k and v themselves for the
        query's own segment; Hopper, fp16/bf16, 64- or 128-token blocks) or "auto"
        (``choose_perm_mode``). Default ``default_perm_mode()`` (``PBS_PERM_MODE``, else "auto").
    config: tile config {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}; None = the measured
        default (``_default_config``); "autotune" = tune on CUDA over ``_cuda_configs`` (also when
        ``PBS_AUTOTUNE=1``), once per plan block, head_dim and row-length bucket.
    out: optional contiguous (B, H_q, N, D) tensor of q's dtype to write into (with
        ``keeps_layout``: a view of a (B, N, H_q, D)-contiguous one, like q).
    permuted: the copies ``copies_for(mode, k, v, plan.perm)`` when the caller already has them (row
        chunks of one plan share them); used by "gather", "tma" and "persistent".
    window: sliding window W (query q sees original keys q - W < k <= q), masked per token in every kept
        block; softcap: scores become ``softcap * tanh(scores / softcap)``; sinks: (H_q,) per-head sink
        logits (gpt-oss), one extra term in each row's softmax denominator. All three are applied by
        ``attention_kernel.pbs_attn_fwd`` only (the "tma", "gather" and "remap" modes, tested in the
        interpreter): a call with any of them that would run "persistent" (the Hopper-only persistent Gluon
        kernel, which implements plain causal attention) runs "tma" or
        "remap" instead (``resolve_perm_mode(masked=True)``).
    Returns (B, H_q, N, D) in q's dtype: contiguous, or laid out like q when ``keeps_layout``.
    """
    if not supports(q):
        raise ValueError(
            f"Triton PBS attention needs head_dim in {SUPPORTED_HEAD_DIMS} and a CUDA tensor (or TRITON_INTERPRET=1 "
            f"with fp16/fp32); got head_dim={q.shape[-1]}, dtype={q.dtype}, device={q.device}"
        )
    b, h_q, n, d = q.shape
    h_kv = k.shape[1]
    h_perm = plan.perm.shape[1]
    bs = plan.block_size
    n_rows, n_kb, qb0 = plan.kv_num_blocks.shape[-1], plan.num_blocks, plan.row_offset
    if h_q % h_kv or h_q % h_perm or h_perm % h_kv and h_kv % h_perm:
        raise ValueError(f"heads must nest: H_q={h_q}, H_kv={h_kv}, plan perm heads={h_perm}")
    if (tuple(plan.kv_num_blocks.shape) != (b, h_q, n_rows) or n_kb != -(-n // bs)
            or tuple(plan.kv_indices.shape) != (b, h_q, n_rows, n_kb) or qb0 + n_rows > n_kb):
        raise ValueError(f"plan shape {tuple(plan.kv_indices.shape)} (rows from {qb0}) does not fit q "
                         f"{tuple(q.shape)} with block_size {bs}: expected ({b}, {h_q}, <= {-(-n // bs)} rows, "
                         f"{-(-n // bs)})")
    masked = window is not None or softcap is not None or sinks is not None
    if sinks is not None and tuple(sinks.shape) != (q.shape[1],):
        raise ValueError(f"sinks must hold one logit per query head, shape ({q.shape[1]},), got {tuple(sinks.shape)}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive number of tokens or None, got {window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    mode_name = resolve_perm_mode(plan.seq_len, bs, q, perm_mode, masked)
    mode = PERM_MODES[mode_name]
    if mode_name == "persistent" and not persistent_supported(q, bs):
        raise ValueError("perm_mode 'persistent' needs a Hopper GPU, fp16/bf16, head_dim 64 or 128 and 64- or "
                         f"128-token plan blocks; got {q.dtype} head_dim={d} block={bs} on {q.device}: "
                         "use perm_mode='auto'")
    scale = scale if scale is not None else 1.0 / math.sqrt(d)

    strided = keeps_layout(mode_name, q, k, v) and (out is None or token_major(out))
    if not strided:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    perm = plan.perm.to(torch.int32).contiguous()
    num = plan.kv_num_blocks.to(torch.int32).contiguous()
    idx = plan.kv_indices.to(torch.int32).contiguous()
    if mode == 2:
        kp, vp = k, v  # unused
    elif permuted is not None:
        kp, vp = (x.contiguous() for x in permuted)
    else:
        kp, vp = copies_for(mode_name, k, v, perm)
    if out is None:
        out = torch.empty_like(q)  # q's layout: (B, H, N, D)- or, when strided, (B, N, H, D)-contiguous
    elif (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
          or not (out.is_contiguous() or strided)):
        raise ValueError(f"out must be a contiguous {tuple(q.shape)} {q.dtype} tensor on {q.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")

    seg_blocks = plan.segment_size // bs
    if mode == 4:
        if kp.shape[2] != n:
            raise ValueError(f"perm_mode {mode_name!r} reads the copies of copies_for({mode_name!r}, ...): pass "
                             f"permuted=copies_for({mode_name!r}, k, v, perm)")
        return _launch_persistent(q, k, v, kp, vp, out, num, idx, scale, qb0, n_rows, n_kb, bs, seg_blocks,
                                  config, strided)
    # with a softcap, scores are capped in natural units first: tanh(qk * scale / cap), then scaled by cap * log2(e)
    qk_scale = (softcap if softcap is not None else scale) * math.log2(math.e)
    cap_in = scale / softcap if softcap is not None else 1.0
    sink = num if sinks is None else sinks.to(device=q.device, dtype=torch.float32).contiguous()  # num: never read
    args = (q, k, v, kp, vp, perm, out, num, idx, sink, qk_scale, cap_in, window or 0, n, h_q, h_kv, h_perm, qb0,
            n_rows, n_kb)
    consts = dict(PLAN_BLOCK=bs, SEG_BLOCKS=seg_blocks, SEG_POW2=triton.next_power_of_2(seg_blocks),
                  HEAD_DIM=d, PERM_MODE=mode, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
                  WINDOWED=window is not None, SOFTCAP=softcap is not None, SINKS=sinks is not None)

    if config is None and autotune_requested():
        config = "autotune"
    if config is not None and config != "autotune" and not isinstance(config, dict):
        raise ValueError(f'config must be a dict of tile sizes, "autotune" or None, got {config!r}')
    if not q.is_cuda:
        cfg = config if isinstance(config, dict) else _default_config(bs, d, mode_name, masked)
        grid = (n_rows * (bs // cfg["BLOCK_M"]) * (h_q // h_kv), b * h_kv)
        _interpreted(K.pbs_attn_fwd)[grid](*args, **consts, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
        return out

    if mode == 0:
        ensure_allocator()
    with torch.cuda.device(q.device):
        if config == "autotune":
            bucket = triton.next_power_of_2(max(1, math.ceil(num.float().mean().item())))
            grid = lambda meta: (n_rows * (bs // meta["BLOCK_M"]) * (h_q // h_kv), b * h_kv)  # noqa: E731
            _autotuned(bs, d, bucket)[grid](*args, **consts)
        else:
            cfg = config or _default_config(bs, d, mode_name, masked)
            grid = (n_rows * (bs // cfg["BLOCK_M"]) * (h_q // h_kv), b * h_kv)
            K.pbs_attn_fwd[grid](*args, **consts, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                 num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3))
    return out


def persistent_supported(q: torch.Tensor, block_size: int) -> bool:
    """Whether the persistent Gluon kernel (``attention_gluon_kernel``) runs q (B, H_q, N, D): a Hopper
    GPU, fp16/bf16, head_dim 64 or 128, 64- or 128-token plan blocks. ("auto" picks it for 128-token
    blocks only: with 64-token blocks it is not yet measured.)"""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in PERSISTENT_HEAD_DIMS
            and block_size in PERSISTENT_BLOCKS and _is_hopper(q.device.index or 0))


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _persistent_stages(head_dim: int, block_size: int = 128) -> tuple[int, int]:
    """K and V ring slots of the persistent kernel: what fits the H100's 227 KB of shared memory beside
    two q buffers (head_dim 128: 2 x 32 KB q + 3 x 32 KB K + 2 x 32 KB V = 224 KB; head_dim 64: 16 KB
    tiles, 4 + 4). K gets the deeper ring: a K tile is read first in a block's step, V last. With
    64-token blocks the tiles are half as large, and the rings stay under half of that memory (head_dim
    128: 2 + 2 slots, 97 KiB a program; 64: 4 + 4, 81 KiB) so that two programs (one consumer group each)
    share an SM."""
    if block_size == 64:
        return (2, 2) if head_dim > 64 else (4, 4)
    return (3, 2) if head_dim > 64 else (4, 4)


def _persistent_registers(block_size: int) -> dict:
    """Launch options of the persistent kernel. With 64-token blocks a program has one consumer group (4
    warps) and two loader warps in 8 warps' room: 128 registers a thread at launch let two programs share
    an SM's 65,536, and the kernel's own split moves them to the consumers (232 each, 24 for the rest)."""
    return {"maxnreg": 128} if block_size == 64 else {}


def _launch_persistent(q, k, v, kc, vc, out, num, idx, scale, qb0, n_rows, n_kb, bs, seg_blocks, config,
                       strided=False):
    """``attention_gluon_kernel.pbs_attn_fwd_persistent`` over plan rows qb0 .. qb0 + n_rows - 1: one
    program per SM, descriptors built here once per call; ``pbs_attention`` has checked
    ``persistent_supported``. q, k, v and out are (B, H, N, D)-contiguous, or with ``strided`` views
    of (B, N, H, D)-contiguous tensors (``keeps_layout``); the copies kc, vc are contiguous.
    ``config`` (benchmarks, tests): "programs"
    (grid size; more than the tiles = one tile per program), "dynamic" (tiles from an atomic counter,
    default True: it measured faster than a fixed stride on the H100, BENCHMARKS.md), "head_major"
    (tile order with the copy head slowest; default: when the copies do not fit in L2,
    ``copies_fit_l2``; False: query block slowest), "k_stages",
    "v_stages"."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from . import attention_gluon_kernel as KG

    b, h_q, n, d = q.shape
    layout = gl.NVMMASharedLayout.get_default_for([bs, d], gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16)

    def desc(x, token_major=False):  # 2-D descriptor, [bs, D] tiles: rows (B·H·N, D), or (B·N, H·D)
        rows = x.transpose(1, 2).reshape(-1, x.shape[1] * d) if token_major else x.view(-1, d)
        return TensorDescriptor(rows, list(rows.shape), list(rows.stride()), [bs, d], layout)

    cfg = config if isinstance(config, dict) else {}
    n_tiles = n_rows * b * h_q
    per_sm = 128 // bs  # 64-token blocks: one consumer group per program, two programs per SM
    grid = (max(1, min(n_tiles, cfg.get("programs", per_sm * _num_sms(q.device.index or 0)))),)
    dynamic = bool(cfg.get("dynamic", True))
    k_stages, v_stages = _persistent_stages(d, bs)
    counter = torch.zeros(1, dtype=torch.int32, device=q.device) if dynamic else num  # num: never read
    with torch.cuda.device(q.device):
        KG.pbs_attn_fwd_persistent[grid](
            desc(q, strided), desc(kc), desc(vc), desc(k, strided), desc(v, strided), out, num, idx, counter,
            scale * math.log2(math.e), n, h_q,
            kc.shape[1], k.shape[1], qb0,
            n_rows, n_kb, n_tiles, SEG_BLOCKS=seg_blocks, BLOCK=bs, HEAD_DIM=d, DYNAMIC=dynamic,
            HEAD_MAJOR=bool(cfg.get("head_major", not copies_fit_l2(q, kc.shape[1], n))), TOKEN_MAJOR=strided,
            K_STAGES=cfg.get("k_stages", k_stages), V_STAGES=cfg.get("v_stages", v_stages), num_warps=4,
            **_persistent_registers(bs))
    return out
