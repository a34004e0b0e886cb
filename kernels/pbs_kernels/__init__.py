"""pbs_kernels: Permuted Block-Sparse Attention (PBS-Attn) compute library.

Needs only torch (and triton for the GPU path); never imports the CLI. The names below are imported
when first used (PEP 562), so ``pbs_kernels.config`` (``PBSConfig``, no torch) costs no torch import.
"""

import importlib

_HOMES = {
    "PBSConfig": "config",
    "PermutedBlockMask": "block_mask",
    "build_plan": "attention",
    "pbs_attention": "attention",
    "pbs_prefill_attention": "attention",
}

__all__ = ["PBSConfig", "PermutedBlockMask", "build_plan", "pbs_attention", "pbs_prefill_attention"]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
