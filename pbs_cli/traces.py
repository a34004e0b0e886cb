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


def record(fn: Callable[[], object], cuda: bool):
    """Run ``fn`` once under torch.profiler (CPU, plus CUDA when ``cuda``); returns the profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
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
    """The ops that took the most self time (device time on CUDA, CPU time elsewhere), most first:
    [{"name", "calls", "ms", "share"}], share = of all ops' self time."""
    events = prof.key_averages()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = [(e.key, e.count, getattr(e, attr, 0.0) or 0.0) for e in events]
    total = sum(us for _, _, us in rows) or 1.0
    rows.sort(key=lambda r: -r[2])
    return [{"name": name, "calls": calls, "ms": us / 1e3, "share": us / total} for name, calls, us in rows[:limit]]
