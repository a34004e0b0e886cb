"""Dense attention through PyTorch SDPA, one named backend at a time, and picking the fastest.

Dense SDPA is the baseline every PBS speed-up is measured against, and the path PBS itself takes
for short prompts (``dense_below``), decode steps and padded batches. Which SDPA backend is fastest
depends on the GPU, dtype, head_dim and whether it accepts grouped K/V (``enable_gqa``) natively:
PyTorch's default priority does not always pick it (on an H100 cuDNN beats flash by ~1.7x at
head_dim 128), so ``pbs prefill`` times each backend on the real model and uses the winner for both
the dense comparison and PBS's own dense fallback.

Backend names: ``sdpa-cudnn``, ``sdpa-flash``, ``sdpa-efficient``, ``sdpa-math``.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

GPU_CANDIDATES = ("sdpa-cudnn", "sdpa-flash", "sdpa-efficient")
REPEAT_BELOW_MS = 100.0  # forwards shorter than this are timed up to SHORT_REPEATS times (minimum kept)
SHORT_REPEATS = 5


def sdpa_backend(name: str):
    """The ``torch.nn.attention.SDPBackend`` of a backend name."""
    from torch.nn.attention import SDPBackend

    return {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
            "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-math": SDPBackend.MATH}[name]


def sdpa_call(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool, scale: float | None):
    """Causal SDPA restricted to backend ``name``. q (B, H_q, N, D); k, v (B, H_kv, N, D). Raises
    RuntimeError when that backend cannot run these inputs."""
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(sdpa_backend(name)):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                enable_gqa=gqa)


_probe_cache: dict[tuple, tuple[str | None, str | None]] = {}


def probe_sdpa(name: str, device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int,
               head_dim: int) -> tuple[str | None, str | None]:
    """Can SDPA backend ``name`` run this shape here? Returns (mode, reason): mode "gqa" (native),
    "expand" (needs K/V repeated to H_q heads) or None with the reason it cannot run."""
    key = (name, str(device), dtype, heads, kv_heads, head_dim)
    if key in _probe_cache:
        return _probe_cache[key]
    if device.type != "cuda" and name in ("sdpa-cudnn", "sdpa-efficient"):
        return None, "needs a CUDA GPU"
    q = torch.randn(1, heads, 256, head_dim, device=device, dtype=dtype)
    k = torch.randn(1, kv_heads, 256, head_dim, device=device, dtype=dtype)
    modes = ["gqa", "expand"] if heads != kv_heads else ["gqa"]
    reason = None
    answer: tuple[str | None, str | None] = (None, None)
    for mode in modes:
        kk = k if mode == "gqa" else k.repeat_interleave(heads // kv_heads, 1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                sdpa_call(name, q, kk, kk, mode == "gqa" and heads != kv_heads, None)
                answer = (mode, None)
                break
            except RuntimeError as exc:
                why = [str(w.message).splitlines()[0] for w in caught if "kernel not used" in str(w.message)
                       or "not supported" in str(w.message) or "because" in str(w.message)]
                reason = (why[0] if why else str(exc).splitlines()[0])[:200]
    if answer[0] is None:
        answer = (None, f"not available for {str(dtype).removeprefix('torch.')}, head_dim {head_dim} on "
                        f"{device.type}: {reason}")
    _probe_cache[key] = answer
    return answer


# -- inside transformers --------------------------------------------------------------------------


@dataclass(frozen=True)
class DenseChoice:
    """The SDPA backend dense attention uses: ``name`` (see ``profile_records.DENSE_BACKENDS``), ``mode`` "gqa" or
    "expand" (K/V repeated to H_q heads before the call, inside the timed forward), and what was measured."""

    name: str
    mode: str
    strict: bool = False  # True: that backend alone (timing trials); False: it first, then PyTorch's order
    times_ms: dict[str, float] = field(default_factory=dict)  # one timed forward per candidate
    skipped: dict[str, str] = field(default_factory=dict)  # candidate -> why it could not run

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.name, "gqa_mode": self.mode, "probe_forward_ms": self.times_ms,
                "skipped": self.skipped}


def _transformers_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


@contextlib.contextmanager
def _prefer(name: str):
    """SDPA tries backend ``name`` first and falls back to PyTorch's usual order when it cannot run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [sdpa_backend(name)] + [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                                SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
                                    if b != sdpa_backend(name)]
    try:
        ctx = sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch without priorities: restrict to the chosen backend
        ctx = sdpa_kernel(order[:1])
    with ctx:
        yield


def attention_forward(choice: DenseChoice | None, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention function, run with ``choice``'s backend first (unchanged when None).

    query (B, H_q, N, D); key/value (B, H_kv, N_kv, D). Returns ((B, N, H_q, D), None)."""
    sdpa = _transformers_sdpa()
    if choice is None:
        return sdpa(module, query, key, value, attention_mask, **kwargs)
    plain_prefill = attention_mask is None and query.shape[2] == key.shape[2] > 1
    if choice.mode == "expand" and plain_prefill and key.shape[1] != query.shape[1]:
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    if choice.strict:
        from torch.nn.attention import sdpa_kernel

        ctx = sdpa_kernel(sdpa_backend(choice.name))
    else:
        ctx = _prefer(choice.name)
    with ctx:
        return sdpa(module, query, key, value, attention_mask, **kwargs)


def pick_fastest(run_forward: Callable[[DenseChoice], None], device: torch.device, dtype: torch.dtype,
                 heads: int, kv_heads: int, head_dim: int,
                 candidates: tuple[str, ...] = GPU_CANDIDATES) -> DenseChoice | None:
    """Time each SDPA backend that can run this shape on whole forwards; the fastest.

    Per backend: one untimed forward, then timed ones, the minimum kept: one when it takes at least
    ``REPEAT_BELOW_MS``, else up to ``SHORT_REPEATS`` (short forwards are noisy). ``run_forward(choice)``
    runs the model's forward with dense attention on ``choice``. Returns None off CUDA (one backend
    there matters: PyTorch's own choice)."""
    if device.type != "cuda":
        return None
    times: dict[str, float] = {}
    skipped: dict[str, str] = {}
    modes: dict[str, str] = {}
    for name in candidates:
        mode, reason = probe_sdpa(name, device, dtype, heads, kv_heads, head_dim)
        if mode is None:
            skipped[name] = reason or "cannot run"
            continue
        trial = DenseChoice(name, mode, strict=True)
        best = math.inf
        try:
            run_forward(trial)
            for _ in range(SHORT_REPEATS):
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                run_forward(trial)
                torch.cuda.synchronize(device)
                best = min(best, (time.perf_counter() - t0) * 1e3)
                if best >= REPEAT_BELOW_MS:
                    break
        except RuntimeError as exc:  # e.g. a backend that accepts the probe but not a longer input
            skipped[name] = str(exc).splitlines()[0][:200]
            continue
        times[name] = best
        modes[name] = mode
    if not times:
        return None
    winner = min(times, key=times.__getitem__)
    return DenseChoice(winner, modes[winner], times_ms=times, skipped=skipped)
