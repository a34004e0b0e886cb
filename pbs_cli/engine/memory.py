"""Free memory, for the pre-checks that refuse work which cannot fit (exit 4) before it starts."""

from __future__ import annotations

import os


def free_memory_bytes(device) -> int:
    """Free memory where tensors of ``device`` (a torch.device) live: CUDA free memory, else MemAvailable."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def gib(n: int | float) -> str:
    """Bytes as GiB for an error line: 1.5 -> '1.5 GiB'."""
    return f"{n / 2**30:.1f} GiB"
