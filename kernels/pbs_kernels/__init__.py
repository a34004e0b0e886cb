"""pbs_kernels: Permuted Block-Sparse Attention (PBS-Attn) compute library.

Needs only torch (and triton for the GPU path); never imports the CLI.
"""

from .attention import build_plan, pbs_attention, pbs_prefill_attention
from .block_mask import PermutedBlockMask
from .config import PBSConfig

__all__ = ["PBSConfig", "PermutedBlockMask", "build_plan", "pbs_attention", "pbs_prefill_attention"]
