"""Shared pytest setup. Keep this file tiny.

Triton kernels run on CPU tensors through Triton's interpreter: the variable must be set before any
module imports triton, so it is set here, the first thing pytest loads. A CUDA run can opt out with
TRITON_INTERPRET=0 in the environment.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
