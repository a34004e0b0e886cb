"""torch.profiler traces: run a callable under the profiler, save a Chrome trace, summarize the ops.

Used by ``pbs profile --trace`` (one attention pass) and ``pbs prefill --trace`` (one whole forward).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import shutil
import sys
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
    prof = profile(activities=acts)
    with _native_chatter_dropped():
        prof.start()
    try:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    finally:
        with _native_chatter_dropped():
            prof.stop()
    return prof


# what the profiler's C++ side (Kineto) writes straight to file descriptor 2 when it starts and stops
_CHATTER = re.compile(rb"^(USDT|STAGE):\S+ \S+ \S+ \S+\] ")


@contextlib.contextmanager
def _native_chatter_dropped():
    """Keep the profiler's start/stop log lines off stderr (one line per diagnostic, README): file
    descriptor 2 goes to a temporary file meanwhile; any other line written there is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [line for line in sink.read().splitlines(keepends=True) if not _CHATTER.match(line)]
            if kept:
                sys.stderr.write(b"".join(kept).decode(errors="replace"))
                sys.stderr.flush()


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
    kernel rows count: an op row carries its kernels' time again, which would count it twice. Ranges
    such as "pbs.attention" are listed with the time of the kernels inside them, but not added to the
    total.)"""
    from torch.autograd import DeviceType

    events = prof.key_averages()
    if cuda:
        rows = [(e.key, e.count, e.self_device_time_total or 0.0) for e in events if e.device_type == DeviceType.CUDA]
        ranges = {e.key for e in events if getattr(e, "is_user_annotation", False)}  # e.g. "pbs.attention"
    else:
        rows = [(e.key, e.count, e.self_cpu_time_total or 0.0) for e in events]
        ranges = set()
    total = sum(us for name, _, us in rows if name not in ranges) or 1.0  # a range's time is its kernels' again
    rows.sort(key=lambda r: -r[2])
    return [{"name": name, "calls": calls, "ms": us / 1e3, "share": us / total} for name, calls, us in rows[:limit]]


def gpu_busy(prof) -> dict[str, float] | None:
    """How busy the GPU was in a traced run: {"span_ms": from the first traced CPU op to the last
    kernel's end, "busy_ms": the union of kernel intervals}; None without kernel events. A busy share
    well below 1 means the run waited on the host (Python, launches), not on the GPU. The profiler
    slows the host too, so the share is a lower bound of the untraced run's."""
    from torch.autograd import DeviceType

    kernels, cpu_start = [], None
    for e in prof.events():
        start, end = e.time_range.start, e.time_range.end
        if e.device_type == DeviceType.CUDA:
            if not getattr(e, "is_user_annotation", False):  # a range like "pbs.attention", not a kernel
                kernels.append((start, end))
        elif cpu_start is None or start < cpu_start:
            cpu_start = start
    if not kernels or cpu_start is None:
        return None
    kernels.sort()
    busy, cur_start, cur_end = 0.0, *kernels[0]
    for start, end in kernels[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    return {"span_ms": (cur_end - cpu_start) / 1e3, "busy_ms": busy / 1e3}
