"""Documented exit codes and the one-line error policy.

Commands raise ``PBSError`` (or a subclass) with a message that says what was seen and what to do;
``app.main`` prints it as one line on stderr and exits with its code. ``--debug`` shows tracebacks.
"""

from __future__ import annotations

OK = 0
RUNTIME = 1
USAGE = 2
UNSUPPORTED = 3
OUT_OF_MEMORY = 4
INTERRUPTED = 130

EXIT_CODES = {
    OK: "success",
    RUNTIME: "runtime error (model failed to load, a computation failed)",
    USAGE: "usage error (bad option, bad input file, output path refused)",
    UNSUPPORTED: "unsupported environment (no GPU where one is needed, missing package)",
    OUT_OF_MEMORY: "out of memory (try a shorter --seq-len, a smaller --dtype, or fewer layers)",
    INTERRUPTED: "interrupted (Ctrl-C); finished results were kept, nothing half-written",
}


_OOM_TEXT = ("out of memory", "can't allocate memory", "not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for running out of memory anywhere: torch's CUDA allocator (``torch.OutOfMemoryError``),
    the CPU allocator (a RuntimeError "DefaultCPUAllocator: can't allocate memory"), Python's MemoryError."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    text = str(exc).lower()
    return any(t in text for t in _OOM_TEXT)


class PBSError(Exception):
    """An error for the user: one clear line, a documented exit code."""

    exit_code = RUNTIME

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(PBSError):
    exit_code = USAGE


class UnsupportedError(PBSError):
    exit_code = UNSUPPORTED


class OutOfMemory(PBSError):
    exit_code = OUT_OF_MEMORY
