"""Which implementation runs: Triton on CUDA tensors, the PyTorch reference elsewhere.

``PBS_BACKEND=reference`` forces the reference everywhere (debugging, comparisons);
``PBS_BACKEND=triton`` forces Triton (with ``TRITON_INTERPRET=1`` it then runs on CPU tensors).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(x: torch.Tensor) -> bool:
    choice = os.environ.get("PBS_BACKEND", "auto").lower()
    if choice == "reference":
        return False
    if choice == "triton":
        return triton_available()
    return x.is_cuda and triton_available()
