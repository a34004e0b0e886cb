"""Shared pytest setup. Keep this file tiny.

Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter; the variable must be
set before any module imports triton, so it is set here, the first thing pytest loads. On a CUDA
machine the kernels compile for real (force the interpreter there with TRITON_INTERPRET=1).
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
