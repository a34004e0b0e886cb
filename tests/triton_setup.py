"""Where the Triton tests run: compiled on CUDA when a GPU is present, else on CPU tensors under the
Triton interpreter (``TRITON_INTERPRET=1``, set by conftest.py). Import it before ``pbs_kernels.triton``:
it skips the importing test module when neither is available."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not (CUDA or INTERPRET):
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cuda" if CUDA and not INTERPRET else "cpu"
