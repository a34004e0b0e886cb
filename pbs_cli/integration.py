"""PBS-Attn inside transformers, through its supported extension points.

``register()`` adds an attention implementation named ``"pbs"`` to ``transformers.AttentionInterface``
and the matching mask builder (SDPA's) to ``AttentionMaskInterface``. A model then uses it with
``from_pretrained(..., attn_implementation="pbs")`` or ``model.set_attn_implementation("pbs")``;
no model class is patched.

Which parameters a forward pass uses, and where per-layer statistics go, is set per run::

    with pbs_run(PBSConfig(threshold=0.9)) as run:
        model(input_ids)
    run.recorder.prefill_layers()   # one LayerStat per attention call

Outside any ``pbs_run`` block the attention uses ``PBSConfig()`` defaults and records nothing.

The sparse path runs only for a plain causal prefill: more than one query, as many queries as keys
(empty cache), no attention mask (transformers passes ``None`` when there is no padding), causal,
no dropout, no softcap / sliding window / attention sinks, and N >= ``config.dense_below``.
Everything else (decode steps, padded batches, chunked prefill over a cache) delegates to
transformers' own SDPA attention function, unchanged.

On CUDA each ``pbs_run`` replays the layers' PBS work from a CUDA graph captured in the run
(``pbs_kernels.graphs.LayerGraphs``: the first sparse layer eager, the second captured, the rest
replayed; ``PBS_CUDA_GRAPHS=0`` turns it off). The graphs are freed when the block ends, so every
forward pays its own capture, as a one-off prefill of a document does.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from pbs_kernels import PBSConfig, pbs_prefill_attention
from pbs_kernels.attention import attention_kernel
from pbs_kernels.graphs import LayerGraphs
from pbs_kernels.graphs import enabled as graphs_enabled

from . import dense_sdpa

NAME = "pbs"
DENSE_NAME = "pbs_dense"  # dense SDPA on the run's chosen backend (the baseline of --compare-dense)


@dataclass
class LayerStat:
    """One attention call. ``density`` is kept causal blocks / all causal blocks (1.0 for dense prefill,
    None for decode steps, where blocks do not apply)."""

    layer: int | None
    path: str  # "pbs" or "dense"
    reason: str  # why this path: "causal prefill", "decode (q_len=1)", "attention mask (padding)", ...
    q_len: int
    kv_len: int
    batch: int
    _kept: torch.Tensor | None = field(default=None, repr=False)  # lazily synced block count
    _total: int = 0
    kernel: str | None = None  # sparse calls: the attention implementation that ran (attention_kernel)

    @property
    def phase(self) -> str:
        return "prefill" if self.q_len > 1 else "decode"

    @property
    def density(self) -> float | None:
        if self._kept is not None:
            return float(self._kept.item()) / max(1, self._total)
        return 1.0 if self.phase == "prefill" else None

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "path": self.path, "reason": self.reason, "phase": self.phase,
                "seq_len": self.kv_len, "q_len": self.q_len, "batch": self.batch, "density": self.density,
                "kernel": self.kernel}


class Recorder:
    """Collects one ``LayerStat`` per attention call. Densities stay on the device until read,
    so recording adds no host synchronisation to timed runs."""

    def __init__(self) -> None:
        self.stats: list[LayerStat] = []
        self.graph_replays = 0  # sparse calls replayed from a CUDA graph (pbs_kernels.graphs)
        self.graph_failure: str | None = None  # why capturing stopped, if it did

    def add(self, stat: LayerStat) -> None:
        self.stats.append(stat)

    def reset(self) -> None:
        self.stats.clear()

    def prefill_layers(self) -> list[LayerStat]:
        return [s for s in self.stats if s.phase == "prefill"]

    def decode_calls(self) -> list[LayerStat]:
        return [s for s in self.stats if s.phase == "decode"]

    def density(self) -> float | None:
        """Overall prefill density: kept blocks / causal blocks over all prefill calls (dense calls count as 1.0)."""
        layers = self.prefill_layers()
        if not layers:
            return None
        return sum(s.density for s in layers) / len(layers)  # type: ignore[misc]


@dataclass
class PBSRun:
    config: PBSConfig
    recorder: Recorder
    dense: dense_sdpa.DenseChoice | None = None  # SDPA backend of every dense call (None: PyTorch's choice)
    record_dense: str | None = None  # "pbs_dense" calls are recorded as dense layers with this reason
    graphs: LayerGraphs | None = None  # CUDA graphs of the sparse layers' work, for this run


_current: contextvars.ContextVar[PBSRun | None] = contextvars.ContextVar("pbs_run", default=None)
_DEFAULT_CONFIG = PBSConfig()


@contextlib.contextmanager
def pbs_run(config: PBSConfig, recorder: Recorder | None = None,
            dense: dense_sdpa.DenseChoice | None = None, record_dense: str | None = None) -> Iterator[PBSRun]:
    """Within this block, "pbs" attention uses ``config`` and records into ``recorder`` (a new one if None);
    dense calls of "pbs" and "pbs_dense" use SDPA backend ``dense`` first. With ``record_dense``,
    "pbs_dense" calls are recorded too, as dense layers for that reason (a whole prompt below
    ``dense_below`` runs on "pbs_dense": the dense forward itself, with no per-layer dispatch)."""
    run = PBSRun(config, recorder if recorder is not None else Recorder(), dense, record_dense,
                 LayerGraphs() if graphs_enabled() else None)
    token = _current.set(run)
    try:
        yield run
    finally:
        _current.reset(token)
        if run.graphs is not None:
            run.recorder.graph_replays += run.graphs.replays
            run.recorder.graph_failure = run.recorder.graph_failure or run.graphs.failed
            run.graphs.close()


def current_run() -> PBSRun | None:
    return _current.get()


def _dense_reason(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: Any,
                  dropout: float, is_causal: bool | None, config: PBSConfig, kwargs: dict[str, Any]) -> str | None:
    """Why this call must run dense, or None when the sparse path applies."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if q_len == 1:
        return "decode (q_len=1)"
    if q_len != kv_len:
        return f"q_len {q_len} != kv_len {kv_len} (prefill over a cache)"
    if attention_mask is not None:
        return "attention mask (padding or custom mask)"
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        return "not causal"
    if dropout and module.training:
        return "dropout"
    for name in ("softcap", "sliding_window", "s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            return f"{name} not supported"
    if q_len < config.dense_below:
        return f"seq_len {q_len} < dense_below {config.dense_below}"
    layer = getattr(module, "layer_idx", None)
    for_layer = getattr(config, "for_layer", None)
    if for_layer is not None and for_layer(layer) is None:
        return f"layer {layer} in dense_layers"
    return None


@torch.compiler.disable  # runs eagerly inside a compiled model (`--compile` compiles the rest of each layer)
def pbs_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The "pbs" attention implementation (transformers' attention-function signature).

    query (B, H_q, N, D) with RoPE applied; key/value (B, H_kv, N_kv, D), GQA not repeated.
    Returns ((B, N, H_q, D), None).
    """
    run = _current.get()
    config = run.config if run is not None else _DEFAULT_CONFIG
    reason = _dense_reason(module, query, key, attention_mask, dropout, is_causal, config, kwargs)
    layer = getattr(module, "layer_idx", None)
    b, _, q_len, _ = query.shape
    if reason is not None:
        if kwargs.get("softcap") is not None:
            # SDPA (the dense fallback) cannot soft-cap logits either: refuse clearly rather than fail inside it
            from .errors import UnsupportedError

            raise UnsupportedError(
                f"{type(module).__name__} soft-caps attention logits (softcap={kwargs['softcap']}), which neither "
                "the PBS kernel nor its dense SDPA fallback implements; pbs cannot run this model")
        if run is not None:
            run.recorder.add(LayerStat(layer, "dense", reason, q_len, key.shape[2], b))
        return dense_sdpa.attention_forward(run.dense if run is not None else None, module, query, key, value,
                                            attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                                            **kwargs)
    ctx = torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext()
    with ctx, torch.profiler.record_function("pbs.attention"):  # groups the layer's PBS work in traces
        if query.is_cuda and run is not None and run.graphs is not None:
            out, plan = run.graphs(query, key, value, config, scaling)
        else:
            out, plan = pbs_prefill_attention(query, key, value, config, scale=scaling)
    if run is not None:
        run.recorder.add(LayerStat(layer, "pbs", "causal prefill", q_len, key.shape[2], b,
                                   plan.kv_num_blocks.sum(), plan.causal_blocks(),
                                   attention_kernel(query, config.block_size, key, value)))
    # a no-op where the kernel wrote transformers' (B, N, H, D) layout itself (triton.attention.keeps_layout),
    # replays included: the caller's o_proj reads the graph's output before the next layer's replay rewrites it
    return out.transpose(1, 2).contiguous(), None


@torch.compiler.disable  # as "pbs": the dense and PBS forwards compile the same non-attention graphs
def dense_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The "pbs_dense" implementation: transformers' SDPA attention on the current run's SDPA backend."""
    run = _current.get()
    if run is not None and run.record_dense is not None:
        b, _, q_len, _ = query.shape
        run.recorder.add(LayerStat(getattr(module, "layer_idx", None), "dense", run.record_dense, q_len, key.shape[2], b))
    return dense_sdpa.attention_forward(run.dense if run is not None else None, module, query, key, value,
                                        attention_mask, **kwargs)


_registered = False


def register() -> None:
    """Register "pbs" with transformers' attention and mask interfaces (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, pbs_attention_forward)
    AttentionInterface.register(DENSE_NAME, dense_attention_forward)
    # the mask builder of SDPA: None for plain causal inputs (what the sparse path needs), else a bool mask
    for name in (NAME, DENSE_NAME):
        AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping["sdpa"])
    _registered = True


def set_attention(model: torch.nn.Module, name: str) -> None:
    """Switch a loaded model between "pbs", "pbs_dense" and any built-in implementation (e.g. "sdpa")."""
    if name in (NAME, DENSE_NAME):
        register()
    model.set_attn_implementation(name)
