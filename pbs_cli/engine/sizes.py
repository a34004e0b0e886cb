"""Human sizes: ``128k`` = 131072, ``1m`` = 1048576, lists ``4k,32k,128k``."""

from __future__ import annotations

import re

from ..errors import UsageError

_UNITS = {"": 1, "k": 1024, "m": 1024**2}
_SIZE = re.compile(r"^\s*([0-9]{1,12})\s*([kKmM]?)\s*$", re.ASCII)
MAX_SIZE = 2**31 - 1  # token positions are int32 in the kernels


def _shown(text: str) -> str:
    """The user's text for an error line: repr, cut to 40 characters."""
    shown = repr(str(text))
    return shown if len(shown) <= 40 else shown[:37] + "...'"


def parse_size(text: str) -> int:
    """'128k' -> 131072; plain integers pass through. Raises UsageError on anything else or <= 0."""
    match = _SIZE.match(str(text))
    if not match:
        raise UsageError(f"invalid size {_shown(text)}: use an integer or a number with k/m (e.g. 8192, 32k, 1m)")
    value = int(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise UsageError(f"size must be positive, got {_shown(text)}")
    if value > MAX_SIZE:
        raise UsageError(f"size {_shown(text)} = {value} is larger than the maximum {MAX_SIZE} (2**31 - 1)")
    return value


def parse_sizes(text: str) -> list[int]:
    """'4k,32k' -> [4096, 32768] (order kept, duplicates dropped)."""
    sizes = [parse_size(part) for part in str(text).split(",") if part.strip()]
    if not sizes:
        raise UsageError(f"no sizes in {_shown(text)}")
    return list(dict.fromkeys(sizes))


def format_size(n: int) -> str:
    """131072 -> '128K' (exact multiples only), else the integer."""
    for unit, mult in (("M", 1024**2), ("K", 1024)):
        if n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)
