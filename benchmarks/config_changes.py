"""``key=value,...`` changes to a ``PBSConfig``, as the benchmark scripts take them on the command line.

Values are parsed as the field's type: booleans from 1 / true / yes (anything else is false),
``dense_layers`` as layer indices separated by "/" (``dense_layers=0/1``).
"""

from __future__ import annotations

from pbs_kernels import PBSConfig


def apply(base: PBSConfig, text: str) -> PBSConfig:
    """``base`` with the changes of ``text`` (empty: ``base`` itself)."""
    changes = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        kind = type(getattr(base, key))
        if key == "dense_layers":
            changes[key] = tuple(int(v) for v in value.split("/") if v)
        elif kind is bool:
            changes[key] = value.lower() in ("1", "true", "yes")
        else:
            changes[key] = kind(value)
    return base.replace(**changes)
