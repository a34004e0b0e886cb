"""What every Triton launcher asks before it launches: whether kernels run in the interpreter, tensors
in the layout the kernels index (the last dimension contiguous), and scratch memory for device-side
tensor descriptors."""

from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (any value but empty or "0"): kernels run on CPU tensors, and
    launchers pick fewer, larger tiles (the interpreter's cost is per operation, not per element)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dimension is contiguous (the kernels take the other strides), else a
    contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


_allocator_set = False


def ensure_allocator() -> None:
    """Device-side tensor descriptors (TMA) need global scratch memory from an allocator: set one, once."""
    global _allocator_set
    if not _allocator_set:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _allocator_set = True
