"""torch.profiler traces: run a callable under the profiler, save a Chrome trace, summarize the ops.

Used by ``pbs profile --trace`` (one attention pass) and ``pbs prefill --trace`` (one whole forward).
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from . import reports


def record(fn: Callable[[], object], device):
    """Run ``fn`` once under torch.profiler (CPU, plus CUDA when ``device`` is a CUDA device, which
    is synchronized before the profiler stops); returns the profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    return prof


def save(prof, path: Path) -> None:
    """The profiler's Chrome trace JSON at ``path`` (gzip-compressed when it ends in .gz), atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".json", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, reports.new_file_mode())  # mkstemp's 0o600 -> what open() would give
    try:
        prof.export_chrome_trace(tmp)
        if path.name.endswith(".gz"):
            with open(tmp, "rb") as src, gzip.open(tmp + ".gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp + ".gz", path)
        else:
            os.replace(tmp, path)
    finally:
        for p in (tmp, tmp + ".gz"):
            Path(p).unlink(missing_ok=True)


def top_ops(prof, cuda: bool, limit: int = 12) -> list[dict]:
    """What took the most time, most first: on CUDA the GPU kernels by their time, elsewhere the ops
    by their self CPU time; [{"name", "calls", "ms", "share"}], share = of all of them. (On CUDA only
    kernel rows count: an op row carries its kernels' time again, which would count it twice.)"""
    from torch.autograd import DeviceType

    events = prof.key_averages()
    if cuda:
        rows = [(e.key, e.count, e.self_device_time_total or 0.0) for e in events if e.device_type == DeviceType.CUDA]
    else:
        rows = [(e.key, e.count, e.self_cpu_time_total or 0.0) for e in events]
    total = sum(us for _, _, us in rows) or 1.0
    rows.sort(key=lambda r: -r[2])
    return [{"name": name, "calls": calls, "ms": us / 1e3, "share": us / total} for name, calls, us in rows[:limit]]
