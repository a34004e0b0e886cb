"""Benchmark timing: warm-up, then repeats; median and spread; peak memory.

CUDA: one pair of CUDA events around each repeat (the device's own clock, no host sync inside the
loop), like ``triton.testing.do_bench``. CPU: ``time.perf_counter`` around each repeat. The number
of repeats adapts to the cost of one call (at least ``min_repeats``, about ``budget_s`` seconds in
all, at most ``max_repeats``), so 1 ms kernels get many samples and 1 s kernels a few.
Peak memory on CUDA: ``torch.cuda.max_memory_allocated`` over one call minus what was allocated
before it (the call's own working memory, outputs included); ``None`` on CPU.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call over ``repeats`` timed calls after ``warmup`` untimed ones."""

    median_ms: float
    q25_ms: float
    q75_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    warmup: int
    peak_mem_mib: float | None = None

    @property
    def iqr_ms(self) -> float:
        return self.q75_ms - self.q25_ms

    def to_dict(self) -> dict:
        return asdict(self)


def quantile(values: list[float], p: float) -> float:
    """Linear-interpolated quantile, p in [0, 1] (numpy's default 'linear' method)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("no samples")
    pos = p * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples_ms: list[float], warmup: int, peak_mem_mib: float | None = None) -> Timing:
    return Timing(
        median_ms=statistics.median(samples_ms),
        q25_ms=quantile(samples_ms, 0.25),
        q75_ms=quantile(samples_ms, 0.75),
        min_ms=min(samples_ms),
        max_ms=max(samples_ms),
        repeats=len(samples_ms),
        warmup=warmup,
        peak_mem_mib=peak_mem_mib,
    )


def _is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def peak_memory_mib(fn: Callable[[], object], device: torch.device | str) -> float | None:
    """Working memory of one call of ``fn`` on a CUDA device (MiB), ``None`` elsewhere."""
    if not _is_cuda(device):
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return max(0, peak - before) / 2**20


def bench(fn: Callable[[], object], device: torch.device | str = "cpu", *, warmup: int = 1,
          min_repeats: int = 3, max_repeats: int = 50, budget_s: float = 1.0, memory: bool = True) -> Timing:
    """Time ``fn()`` on ``device``: ``warmup`` untimed calls, then adaptive repeats.

    The last warm-up call also estimates the cost of one call; repeats = clamp(budget_s / cost,
    min_repeats, max_repeats). ``memory``: also measure the peak working memory (CUDA only, one
    extra call).
    """
    device = torch.device(device)
    cuda = _is_cuda(device)
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    warmup = max(1, warmup)
    for _ in range(warmup):  # the last warm-up call, alone, estimates the cost (earlier ones may autotune)
        sync()
        start = time.perf_counter()
        fn()
        sync()
    per_call = max(1e-6, time.perf_counter() - start)
    repeats = int(max(min_repeats, min(max_repeats, budget_s / per_call)))
    samples: list[float] = []
    if cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for begin, end in events:
            begin.record()
            fn()
            end.record()
        sync()
        samples = [begin.elapsed_time(end) for begin, end in events]
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    peak = peak_memory_mib(fn, device) if memory else None
    return summarize(samples, warmup, peak)
