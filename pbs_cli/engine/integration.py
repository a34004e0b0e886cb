"""PBS-Attn inside transformers, through its supported extension points.

``register()`` adds an attention implementation named ``"pbs"`` to ``transformers.AttentionInterface``
and the matching mask builder (SDPA's) to ``AttentionMaskInterface``. A model then uses it with
``from_pretrained(..., attn_implementation="pbs")`` or ``model.set_attn_implementation("pbs")``;
no model class is patched.

Which parameters a forward pass uses, and where per-layer statistics go, is set per run::

    with pbs_run(PBSConfig(threshold=0.9)) as run:
        model(input_ids)
    run.recorder.prefill_layers()   # one LayerStat per attention call

Outside any ``pbs_run`` block the attention uses ``PBSConfig()`` defaults and records nothing. A run with
config None is dense: every call takes the dense path. Observers of a run (``pbs_run(..., observers=[f])``)
see every call: ``f(call)`` with an ``AttentionCall`` (the layer's q/k/v, the path taken and, for a sparse
layer, its plan); capturing activations and measuring recall are observers, not attention functions.

The sparse path runs only for a plain causal prefill: more than one query, as many queries as keys
(empty cache), no attention mask (transformers passes ``None`` when there is no padding), causal,
no dropout, no position bias, and N >= ``config.dense_below``.
Everything else (decode steps, padded batches, chunked prefill over a cache) delegates to
transformers' own SDPA attention function, unchanged, or, for layers that soft-cap their logits or
carry sinks (which SDPA cannot apply), to the model family's own eager attention function.

Sliding-window layers (Mistral, Gemma-2/3 local layers, Qwen with ``use_sliding_window``) run a band
plan (``pbs_kernels.band``: exact, no selection) with the window masked in the kernel; the others, and
sliding-window layers whose window covers the whole prompt, run PBS selection. So that a sliding-window
layer's prefill reaches the attention function without an N x N mask, the "pbs" mask builder
(``pbs_mask``) returns None for a sliding-window mask of an unpadded prefill from position 0 once it has
checked that the mask is exactly the window the layer then passes as ``sliding_window``; every other
mask is SDPA's. Soft-capped layers (Gemma-2) and layers with learned
attention sinks (gpt-oss's ``s_aux``) run either plan with the cap or the sinks applied in the kernel
(without CUDA graphs for sinks: a graph would keep the first layer's sink tensor).

On CUDA each ``pbs_run`` replays the layers' PBS work from a CUDA graph captured in the run
(``pbs_kernels.graphs.LayerGraphs``: the first sparse layer eager, the second captured, the rest
replayed; ``PBS_CUDA_GRAPHS=0`` turns it off). The graphs are freed when the block ends, so every
forward pays its own capture, as a one-off prefill of a document does.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from pbs_kernels import PBSConfig, PermutedBlockMask, pbs_prefill_attention
from pbs_kernels.attention import attention_kernel, band_attention
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
class AttentionCall:
    """What an observer of a run sees of one attention call: the layer's inputs, the path taken and, for a
    sparse layer, the plan it ran (``window``: the band of a sliding-window layer, whose plan keeps all it sees)."""

    stat: LayerStat
    query: torch.Tensor  # (B, H_q, N, D), RoPE applied
    key: torch.Tensor  # (B, H_kv, N_kv, D), GQA not repeated
    value: torch.Tensor  # (B, H_kv, N_kv, D)
    scaling: float | None
    plan: PermutedBlockMask | None = None
    window: int | None = None


Observer = Callable[[AttentionCall], None]


@dataclass
class PBSRun:
    config: PBSConfig | None  # None: a dense run
    recorder: Recorder
    dense: dense_sdpa.DenseChoice | None = None  # SDPA backend of every dense call (None: PyTorch's choice)
    record_dense: str | None = None  # "pbs_dense" calls are recorded as dense layers with this reason
    graphs: LayerGraphs | None = None  # CUDA graphs of the sparse layers' work, for this run
    observers: list[Observer] = field(default_factory=list)  # called with every AttentionCall, in order
    plain_causal: bool = False  # "pbs_dense" drops windows, soft-caps and sinks: plain causal SDPA, not the model

    def notify(self, call: AttentionCall) -> None:
        for observer in self.observers:
            observer(call)


_current: contextvars.ContextVar[PBSRun | None] = contextvars.ContextVar("pbs_run", default=None)
_DEFAULT_CONFIG = PBSConfig()


@contextlib.contextmanager
def pbs_run(config: PBSConfig | None, recorder: Recorder | None = None,
            dense: dense_sdpa.DenseChoice | None = None, record_dense: str | None = None,
            observers: Sequence[Observer] = (), plain_causal: bool = False) -> Iterator[PBSRun]:
    """Within this block, "pbs" attention uses ``config`` (None: dense in every layer) and records into
    ``recorder`` (a new one if None); dense calls of "pbs" and "pbs_dense" use SDPA backend ``dense`` first.
    With ``record_dense``, "pbs_dense" calls are recorded too, as dense layers for that reason (a whole prompt
    below ``dense_below`` runs on "pbs_dense": the dense forward itself, with no per-layer dispatch).
    ``observers`` see every call of either. With ``plain_causal``, "pbs_dense" is plain causal SDPA in every
    layer (sliding windows, soft-caps and sinks dropped: what the fastest SDPA kernels cost, not the model)."""
    graphs = LayerGraphs() if graphs_enabled() and config is not None else None
    run = PBSRun(config, recorder if recorder is not None else Recorder(), dense, record_dense, graphs,
                 list(observers), plain_causal)
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
    if kwargs.get("position_bias") is not None:
        return "position_bias not supported"
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
    if config is None:
        reason = "dense run"
    else:
        reason = _dense_reason(module, query, key, attention_mask, dropout, is_causal, config, kwargs)
    layer = getattr(module, "layer_idx", None)
    b, _, q_len, _ = query.shape
    if reason is not None:
        if run is not None:
            _observe(run, LayerStat(layer, "dense", reason, q_len, key.shape[2], b), query, key, value, scaling)
        return dense_forward(run, module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                             is_causal=is_causal, **kwargs)
    window, softcap, sinks = layer_window(kwargs), kwargs.get("softcap"), kwargs.get("s_aux")
    covered = window is not None and window >= q_len  # the window sees the whole prompt: a global layer here
    window = None if covered else window
    ctx = torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext()
    with ctx, torch.profiler.record_function("pbs.attention"):  # groups the layer's PBS work in traces
        if window is not None:
            out, plan = band_attention(query, key, value, config, window, scaling, softcap, sinks)
        elif query.is_cuda and run is not None and run.graphs is not None and sinks is None:
            out, plan = run.graphs(query, key, value, config, scaling, softcap)
        else:
            out, plan = pbs_prefill_attention(query, key, value, config, scale=scaling, softcap=softcap, sinks=sinks)
    if run is not None:
        why = f"sliding window {window}" if window is not None else "causal prefill"
        why += f" (window {layer_window(kwargs)} covers the prompt)" if covered else ""
        why += (f", softcap {softcap:g}" if softcap is not None else "") + (", sinks" if sinks is not None else "")
        masked = window is not None or softcap is not None or sinks is not None
        stat = LayerStat(layer, "pbs", why, q_len, key.shape[2], b, plan.kv_num_blocks.sum(), plan.causal_blocks(),
                         attention_kernel(query, config.block_size, key, value, masked=masked))
        _observe(run, stat, query, key, value, scaling, plan, window)
    # a no-op where the kernel wrote transformers' (B, N, H, D) layout itself (triton.attention.keeps_layout),
    # replays included: the caller's o_proj reads the graph's output before the next layer's replay rewrites it
    return out.transpose(1, 2).contiguous(), None


@torch.compiler.disable  # as "pbs": the dense and PBS forwards compile the same non-attention graphs
def dense_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The "pbs_dense" implementation: transformers' SDPA attention on the current run's SDPA backend."""
    run = _current.get()
    if run is not None and (run.record_dense is not None or run.observers):
        b, _, q_len, _ = query.shape
        stat = LayerStat(getattr(module, "layer_idx", None), "dense", run.record_dense or "dense", q_len,
                         key.shape[2], b)
        _observe(run, stat, query, key, value, kwargs.get("scaling"), record=run.record_dense is not None)
    if run is not None and run.plain_causal:
        for name in ("sliding_window", "softcap", "s_aux"):
            kwargs.pop(name, None)
        attention_mask = None
    return dense_forward(run, module, query, key, value, attention_mask, **kwargs)


def _observe(run: PBSRun, stat: LayerStat, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             scaling: float | None, plan: PermutedBlockMask | None = None, window: int | None = None,
             record: bool = True) -> None:
    """Record one call (``record``) and hand it to the run's observers."""
    if record:
        run.recorder.add(stat)
    if run.observers:
        run.notify(AttentionCall(stat, query, key, value, scaling, plan, window))


def layer_window(kwargs: dict[str, Any]) -> int | None:
    """The sliding window (tokens) transformers passes a layer's attention function, or None (a global layer)."""
    window = kwargs.get("sliding_window")
    return int(window) if window else None


def window_mask(q_len: int, window: int, device: torch.device) -> torch.Tensor:
    """Bool (1, 1, N, N): causal attention inside a window of ``window`` tokens (transformers' convention:
    query i sees keys i - window < j <= i)."""
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(q_len, device=device)[None, :]
    return ((j <= i) & (j > i - window))[None, None]


def family_eager(module: torch.nn.Module):
    """The eager attention function of ``module``'s model family (``eager_attention_forward`` of its
    modeling module), which applies soft-capping and sinks where SDPA cannot."""
    import importlib

    fn = getattr(importlib.import_module(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        from ..errors import UnsupportedError

        raise UnsupportedError(f"{type(module).__name__} soft-caps its attention logits or uses attention sinks, "
                               "which SDPA cannot apply, and its model family has no eager attention function to "
                               "run instead; pbs cannot run this model")
    return fn


def dense_forward(run: PBSRun | None, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Dense attention of one layer: SDPA on the run's backend, or the family's eager function for layers
    that soft-cap or carry sinks. A sliding-window prefill whose mask ``pbs_mask`` left out gets it back."""
    q_len, kv_len = query.shape[2], key.shape[2]
    window = layer_window(kwargs)
    plain = attention_mask is None and q_len == kv_len > 1
    if plain and window is not None and window < q_len:
        attention_mask = window_mask(q_len, window, query.device)
    if kwargs.get("softcap") is None and kwargs.get("s_aux") is None:
        return dense_sdpa.attention_forward(run.dense if run is not None else None, module, query, key, value,
                                            attention_mask, **kwargs)
    if attention_mask is None and plain:
        attention_mask = window_mask(q_len, q_len, query.device)
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # eager adds its mask to the scores
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min)
    kwargs.pop("is_causal", None)
    out, _ = family_eager(module)(module, query, key, value, attention_mask, **kwargs)
    return out, None


def _sliding_window_prefill(q_length: int, kv_length: int, q_offset: Any, kv_offset: Any, mask_function: Any,
                            attention_mask: torch.Tensor | None, local_size: int | None,
                            allow_is_causal_skip: bool) -> bool:
    """Whether a mask asked of ``pbs_mask`` is the plain sliding-window causal mask of ``local_size`` tokens
    over an unpadded prefill from position 0: checked on the mask function itself, at the rows where a window
    shows (its first full row and its neighbours, the middle and the last)."""
    if local_size is None or not allow_is_causal_skip or not (q_length == kv_length > 1):
        return False
    if not (isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == kv_offset == 0):
        return False
    if attention_mask is not None:
        from transformers.masking_utils import prepare_padding_mask

        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if padding is not None and not bool(padding.all()):
            return False
    rows = torch.tensor(sorted({min(q_length - 1, r) for r in (0, local_size - 1, local_size, local_size + 1,
                                                                q_length // 2, q_length - 1)}))
    cols = torch.arange(kv_length)
    zero = torch.zeros((), dtype=torch.long)
    try:
        got = mask_function(zero, zero, rows[:, None], cols[None, :])
    except Exception:  # noqa: BLE001 - a mask function that cannot be probed is left to SDPA's builder
        return False
    want = (cols[None, :] <= rows[:, None]) & (cols[None, :] > rows[:, None] - local_size)
    return isinstance(got, torch.Tensor) and got.shape == want.shape and bool((got == want).all())


def pbs_mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: Any = 0,
             mask_function: Any = None, attention_mask: torch.Tensor | None = None, local_size: int | None = None,
             allow_is_causal_skip: bool = True, **kwargs: Any) -> torch.Tensor | None:
    """The "pbs" mask builder: SDPA's (``transformers.masking_utils.sdpa_mask``), except that the sliding-window
    mask of an unpadded prefill from position 0 is None (the layer's attention applies its ``sliding_window``
    itself: a band plan, or the mask rebuilt for a dense fallback) instead of an N x N tensor."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    mask_function = mask_function if mask_function is not None else causal_mask_function
    if _sliding_window_prefill(q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, local_size,
                               allow_is_causal_skip):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     local_size=local_size, allow_is_causal_skip=allow_is_causal_skip, **kwargs)


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
    # SDPA's mask builder: None for plain causal inputs (what the sparse path needs), else a bool mask;
    # "pbs" also leaves out the sliding-window masks its attention applies itself
    AttentionMaskInterface.register(NAME, pbs_mask)
    AttentionMaskInterface.register(DENSE_NAME, dense_mask)
    _registered = True


def dense_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """The "pbs_dense" mask builder: SDPA's, or none at all in a ``plain_causal`` run (causal, unpadded)."""
    from transformers.masking_utils import sdpa_mask

    run = _current.get()
    return None if run is not None and run.plain_causal else sdpa_mask(*args, **kwargs)


def set_attention(model: torch.nn.Module, name: str) -> None:
    """Switch a loaded model between "pbs", "pbs_dense" and any built-in implementation (e.g. "sdpa")."""
    if name in (NAME, DENSE_NAME):
        register()
    model.set_attn_implementation(name)
