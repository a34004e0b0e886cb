"""Attend step: causal attention over the kept blocks of a plan, through the Triton kernel or its twin.

``attend`` dispatches one call: the Triton kernel (``pbs_kernels.triton.attention``) where
``backend.use_triton`` chooses Triton and the kernel supports q, the PyTorch reference
(``reference.block_sparse_attention``) elsewhere. ``kernel_read`` tells a caller that plans and attends in
one go (``attention.pbs_prefill_attention``) how the kernel will read q, k and v before the plan exists:
the read mode, whether it reads them in place, and which permuted K/V copies it needs, so that those are
made once per plan (by the selection's pooling pass where it can) and shared by every chunk of rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import reference
from .backend import use_triton
from .block_mask import PermutedBlockMask


def triton_attention(q: torch.Tensor):
    """The Triton attention module (``pbs_kernels.triton.attention``) when it runs q (B, H_q, N, D):
    ``backend.use_triton`` chose Triton and the kernel supports q's head_dim, dtype and device; else
    None (the PyTorch reference runs)."""
    if use_triton(q):
        from .triton import attention as fast

        if fast.supports(q):
            return fast
    return None


def runs_triton(q: torch.Tensor) -> bool:
    """Whether ``attend`` runs the Triton kernel for q (B, H_q, N, D)."""
    return triton_attention(q) is not None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PermutedBlockMask, scale: float | None = None,
           *, window: int | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None,
           out: torch.Tensor | None = None, copies: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal attention over the kept blocks of ``plan`` (arguments as in ``attention.pbs_attention``).

    out: a tensor to write into, and copies: the permuted K/V copies ``KernelRead.copies`` made, are
    for the Triton kernel (row chunks of one plan share both); the reference attends whole plans only.
    """
    fast = triton_attention(q)
    if fast is not None:
        return fast.pbs_attention(q, k, v, plan, scale, out=out, permuted=copies, window=window, softcap=softcap,
                                  sinks=sinks)
    if out is not None or copies is not None:
        raise ValueError("out= and copies= need the Triton attention kernel; the reference returns whole plans: "
                         "call attend without them")
    return reference.block_sparse_attention(q, k, v, plan, scale, window=window, softcap=softcap, sinks=sinks)


@dataclass(frozen=True)
class KernelRead:
    """How the Triton attention kernel reads the q, k, v of one plan (``kernel_read``).

    mode: the read mode (``triton.attention.resolve_perm_mode``). in_place: the kernel reads q, k, v as
    they are (``keeps_layout``), else contiguous copies. copies_in_selection: the mode reads plain permuted
    copies of k and v, which the selection's pooling pass can make on the way (``select.pool_and_copy``).
    """

    mode: str
    in_place: bool
    copies_in_selection: bool

    def inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v as the kernel reads them: as they are, or contiguous (once, not in every chunk's launch)."""
        return (q, k, v) if self.in_place else (q.contiguous(), k.contiguous(), v.contiguous())

    def copies(self, k: torch.Tensor, v: torch.Tensor, perm: torch.Tensor,
               made: tuple[torch.Tensor, torch.Tensor] | None = None):
        """What ``attend(copies=)`` takes for this mode: ``made`` (the selection's copies) when given,
        else the kernel's own copies of k and v in ``perm`` order (None for "remap", which copies nothing)."""
        if made is not None:
            return made
        from .triton import attention as fast

        return fast.copies_for(self.mode, k, v, perm)


def kernel_read(q: torch.Tensor, block_size: int, k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                masked: bool = False) -> KernelRead | None:
    """How the Triton kernel will read q (B, H_q, N, D) with ``block_size``-token plans, or None where
    the reference attends. ``masked``: a window, softcap or sinks (only the tma, gather and remap modes
    apply them). Without k and v, nothing is read in place and the selection makes no copies.
    Reads only shapes, strides and the device."""
    fast = triton_attention(q)
    if fast is None:
        return None
    mode = fast.resolve_perm_mode(q.shape[2], block_size, q, masked=masked)
    both = k is not None and v is not None
    in_place = both and fast.keeps_layout(mode, q, k, v)
    in_selection = both and mode in fast.PLAIN_COPY_MODES and fast.copies_supported(k)
    return KernelRead(mode, in_place, in_selection)


def attention_kernel(q: torch.Tensor, block_size: int, k: torch.Tensor | None = None,
                     v: torch.Tensor | None = None, masked: bool = False) -> str:
    """The implementation ``attend`` runs for q (B, H_q, N, D) with ``block_size``-token plans:
    "reference" (the PyTorch twin) or "triton/MODE", MODE being the Triton read mode (remap, gather,
    tma, persistent; ``PBS_PERM_MODE`` or the "auto" rule; ``masked``: a window, softcap or sinks, which
    only the tma, gather and remap modes apply), with " in place" when k and v are given and the kernel
    reads all three without layout copies (``keeps_layout``). Reads only shapes, strides and the device."""
    read = kernel_read(q, block_size, k, v, masked)
    if read is None:
        return "reference"
    return f"triton/{read.mode}" + (" in place" if read.in_place else "")
