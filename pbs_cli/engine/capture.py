"""Capturing a forward's attention inputs: an observer of a "pbs" run (``integration.pbs_run(observers=...)``)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from . import integration


class CaptureDone(Exception):
    """Raised by a ``Capture`` once every requested layer is kept: the rest of the forward is not needed."""


class Capture:
    """Keeps each layer's post-RoPE q (B, H_q, N, D), k (B, H_kv, N, D) and, with ``values``, v of prefill calls,
    keyed by layer index (the call's order where a layer has none). With ``layers``, only those, and
    ``CaptureDone`` is raised once all are kept."""

    def __init__(self, values: bool = False, layers: Iterable[int] | None = None) -> None:
        self.values = values
        self.layers = set(layers) if layers is not None else None
        self.store: dict[int, tuple[torch.Tensor, ...]] = {}
        self.calls = 0

    def __call__(self, call: integration.AttentionCall) -> None:
        if call.query.shape[2] == 1:
            return
        layer = call.stat.layer if call.stat.layer is not None else self.calls
        self.calls += 1
        if self.layers is not None and layer not in self.layers:
            return
        qkv = (call.query, call.key, call.value) if self.values else (call.query, call.key)
        self.store[layer] = tuple(t.detach().clone() for t in qkv)
        if self.layers is not None and self.layers <= self.store.keys():
            raise CaptureDone
