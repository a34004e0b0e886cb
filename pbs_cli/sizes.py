"""Human sizes: ``128k`` = 131072, ``1m`` = 1048576, lists ``4k,32k,128k``."""

from __future__ import annotations

import re

from .errors import UsageError

_UNITS = {"": 1, "k": 1024, "m": 1024**2}
_SIZE = re.compile(r"^\s*(\d+)\s*([kKmM]?)\s*$")


def parse_size(text: str) -> int:
    """'128k' -> 131072; plain integers pass through. Raises UsageError on anything else or <= 0."""
    match = _SIZE.match(str(text))
    if not match:
        raise UsageError(f"invalid size {text!r}: use an integer or a number with k/m (e.g. 8192, 32k, 1m)")
    value = int(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise UsageError(f"size must be positive, got {text!r}")
    return value


def parse_sizes(text: str) -> list[int]:
    """'4k,32k' -> [4096, 32768] (order kept, duplicates dropped)."""
    sizes = [parse_size(part) for part in str(text).split(",") if part.strip()]
    if not sizes:
        raise UsageError(f"no sizes in {text!r}")
    return list(dict.fromkeys(sizes))


def format_size(n: int) -> str:
    """131072 -> '128K' (exact multiples only), else the integer."""
    for unit, mult in (("M", 1024**2), ("K", 1024)):
        if n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)
