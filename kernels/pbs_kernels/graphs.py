"""CUDA graphs for the per-layer PBS work: one capture, replayed by the layers after it.

At 32K tokens the embedded model's GPU work per layer is about 1.5 ms, and the host needs about as
long again to issue it: a dozen Triton launches (importance, sort, pooling, block scores, top-p,
the K/V copy, attention) plus their PyTorch glue, each with its Python cost. A whole-model trace
showed the GPU busy for half of the forward (BENCHMARKS.md, "CUDA graphs"). Every layer of a
forward issues the same launches on tensors of the same shapes, so ``LayerGraphs`` runs the first
call eagerly (it compiles and warms the kernels), captures the second in a CUDA graph, and replays
that graph for every later call: per layer the host then copies q, k, v into the graph's input
buffers and replays.

The input buffers keep the layout of the first inputs they are captured for (``torch.empty_like``):
with transformers' (B, N, H, D)-contiguous q, k, v the per-layer copies are plain, and the persistent
kernel reads the buffers in place (``triton.attention.keeps_layout``) and writes its output in that
layout, which the integration then hands on without a transpose copy. The outputs (attention output,
plan) live in the graph's memory: valid until the next replay, so callers consume them first.
Graphs are used only where the plan is built without host synchronization (Triton on CUDA, a
selection with a GPU path: ``PBSConfig.needs_reference_selection`` False); anything else runs eagerly, as does every call after a capture failed,
and so do layers of ``GRAPHS_BELOW`` tokens or more, which keep the GPU busy for longer than the host
takes to issue their launches (``PBS_CUDA_GRAPHS=1`` captures them too).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .block_mask import PermutedBlockMask
from .config import PBSConfig


# Layers this long (tokens) run eagerly unless PBS_CUDA_GRAPHS=1: their GPU work (about 16 ms per layer
# for the embedded model at 128K) hides the host's launch work anyway, and a graph adds a copy of q, k, v
# into its buffers per layer (BENCHMARKS.md, "CUDA graphs").
GRAPHS_BELOW = 65536


def enabled() -> bool:
    """CUDA graphs on unless ``PBS_CUDA_GRAPHS=0``."""
    return os.environ.get("PBS_CUDA_GRAPHS", "1") not in ("", "0")


def worth_capturing(seq_len: int) -> bool:
    """Whether layers of ``seq_len`` tokens are replayed from a graph: below ``GRAPHS_BELOW`` tokens,
    or at any length with ``PBS_CUDA_GRAPHS=1``."""
    return seq_len < GRAPHS_BELOW or os.environ.get("PBS_CUDA_GRAPHS") == "1"


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # q, k, v the graph reads (the inputs' strides)
    out: torch.Tensor
    plan: PermutedBlockMask


class LayerGraphs:
    """Graphs of ``pbs_prefill_attention`` for one model forward (or any run of same-shape calls).

    ``__call__(q, k, v, config, scale, softcap)``: q (B, H_q, N, D), k and v (B, H_kv, N, D), any strides;
    returns what ``pbs_prefill_attention`` returns, (out (B, H_q, N, D), plan), both in the graph's
    memory once replayed: read them before the next call. ``close()`` frees the graphs and their
    memory. Graphed calls are counted in ``replays``; at most ``max_graphs`` shapes are kept."""

    def __init__(self, max_graphs: int = 2):
        self.max_graphs = max_graphs
        self._seen: set[tuple] = set()
        self._graphs: dict[tuple, _Captured] = {}
        self.failed: str | None = None  # why capturing stopped, if it did
        self.replays = 0

    @staticmethod
    def eligible(q: torch.Tensor, config: PBSConfig) -> bool:
        """True where a call can be captured and a graph pays: the Triton attention on CUDA, with
        selection options that have a GPU path (pooled or sampled; it never synchronizes with the
        host), no autotuning (which times candidates from the host), and a length ``worth_capturing``."""
        from .attend import triton_attention

        fast = triton_attention(q)
        return (q.is_cuda and fast is not None and not config.needs_reference_selection()
                and not fast.autotune_requested()
                and worth_capturing(q.shape[2]))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: PBSConfig,
                 scale: float | None = None, softcap: float | None = None) -> tuple[torch.Tensor, PermutedBlockMask]:
        from .attention import pbs_prefill_attention

        if self.failed is not None or not self.eligible(q, config):
            return pbs_prefill_attention(q, k, v, config, scale, softcap=softcap)
        key = (*((tuple(x.shape), x.stride()) for x in (q, k, v)), q.dtype, q.device, config, scale, softcap)
        entry = self._graphs.get(key)
        if entry is None:
            if key not in self._seen or len(self._graphs) >= self.max_graphs:
                self._seen.add(key)  # first call of this shape: eager, compiles and warms the kernels
                return pbs_prefill_attention(q, k, v, config, scale, softcap=softcap)
            entry = self._capture(key, q, k, v, config, scale, softcap)
            if entry is None:
                return pbs_prefill_attention(q, k, v, config, scale, softcap=softcap)
        for buf, x in zip(entry.inputs, (q, k, v)):
            buf.copy_(x)
        entry.graph.replay()
        self.replays += 1
        return entry.out, entry.plan

    def _capture(self, key, q, k, v, config, scale, softcap=None) -> _Captured | None:
        from .attention import pbs_prefill_attention

        # capturing records the launches without running them: the buffers' contents do not matter yet
        # the inputs' strides (dense layouts, as transformers' are), so the kernel reads what it would have read eagerly
        inputs = tuple(torch.empty_like(x) for x in (q, k, v))
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out, plan = pbs_prefill_attention(*inputs, config, scale, softcap=softcap)
        except RuntimeError as exc:  # e.g. a host synchronization inside the capture
            self.failed = (str(exc).splitlines() or [""])[0][:200]
            torch.cuda.synchronize(q.device)
            return None
        entry = _Captured(graph, inputs, out, plan)
        self._graphs[key] = entry
        return entry

    def close(self) -> None:
        self._graphs.clear()
        self._seen.clear()
