"""`pbs viz-mask`'s work: the views (block masses, kept blocks, recall) of the chosen heads, planned with
the PBS parameters on a structured synthetic workload (no model load) or on the post-RoPE q/k that a
model's forward over a document captured. Refuses, before it starts, an analysis that cannot fit."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any

from .. import console
from ..errors import OutOfMemory, UsageError

SYNTHETIC_HEADS = 4
SYNTHETIC_KV_HEADS = 1
SYNTHETIC_HEAD_DIM = 64
SYNTHETIC_SEQ_LEN = 4096


def parse_indices(text: str, count: int, what: str) -> list[int]:
    """'all', '3', '0-3,8' -> sorted unique indices in [0, count). UsageError names the valid range."""
    spec = text.strip().lower()
    if spec == "all":
        return list(range(count))
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise UsageError(f"invalid {what} selection {text!r}: use 'all', an index, or ranges like 0-3,8")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise UsageError(f"invalid {what} range {part!r}: the end must be >= the start")
        for i in (lo, hi):
            if i >= count:
                raise UsageError(f"{what} {i} out of range: there are {count} {what}s (0-{count - 1})")
        out.update(range(lo, hi + 1))
    if not out:
        raise UsageError(f"no {what}s in {text!r}")
    return sorted(out)


def _selection(single: int | None, multi: str | None, count: int, what: str, default: int) -> list[int]:
    if single is not None and multi is not None:
        raise UsageError(f"pass --{what} or --{what}s, not both")
    if multi is not None:
        return parse_indices(multi, count, what)
    index = default if single is None else single
    if not 0 <= index < count:
        raise UsageError(f"{what} {index} out of range: there are {count} {what}s (0-{count - 1})")
    return [index]


def check_memory(n_tokens: int, block_size: int, heads: int, layers: int, input_bytes: int, device: str) -> None:
    """Refuse (exit 4) an analysis that cannot fit before it starts: its (N/B)^2 block matrices live in host
    memory, the inputs (q/k, or the model forward) on ``device``."""
    import torch

    from .mask_analysis import analysis_bytes
    from .memory import free_memory_bytes, gib

    host = analysis_bytes(n_tokens, block_size, heads, layers)
    dev = torch.device(device)
    needs = [(host + (0 if dev.type == "cuda" else input_bytes), torch.device("cpu"))]
    if dev.type == "cuda":
        needs.append((input_bytes, dev))
    for need, where in needs:
        free = free_memory_bytes(where)
        if need > 0.9 * free:
            raise OutOfMemory(f"{n_tokens} tokens in {block_size}-token blocks need ~{gib(need)} for the mask "
                              f"analysis, {gib(free)} free on {where.type}; try a shorter --seq-len, fewer "
                              "--heads/--layers or a larger --block-size")


@dataclass(frozen=True)
class VizRequest:
    """The options of one `pbs viz-mask` (outputs aside); ``document`` None: the synthetic example."""

    document: str | None = None
    model: str = "llama"
    layer: int | None = None
    head: int | None = None
    layers: str | None = None
    heads: str | None = None
    n_tokens: int | None = None  # parsed --seq-len
    pattern: str = "mixed"
    seed: int = 0
    profile: str | None = None
    overrides: tuple[tuple[str, Any], ...] = ()  # PBS parameters given as options
    device: str = "auto"
    dtype: str = "auto"


@dataclass
class MaskViews:
    """The analysed heads of one request and what they were planned with."""

    views: list
    meta: dict[str, Any]
    config: Any
    profile_name: str
    source: str  # what was analysed, in words

    @property
    def stats(self) -> list:
        return [v.stats for v in self.views]

    def record(self) -> dict[str, Any]:
        """The fields of the JSON record."""
        return dict(source=self.source, profile=self.profile_name, pbs=self.config.to_dict(), **self.meta,
                    heads=[s.to_dict() for s in self.stats])


def run(req: VizRequest) -> MaskViews:
    """Plan and measure the chosen heads: of the synthetic example, or of a model's forward over a document."""
    from . import presets

    overrides = dict(req.overrides)
    if req.document is None:
        if req.layer is not None or req.layers is not None:
            raise UsageError("the synthetic example has no layers; pass a DOC to choose --layer/--layers")
        from .workloads import PATTERNS

        if req.pattern not in PATTERNS:
            raise UsageError(f"unknown --pattern {req.pattern!r}; use one of {', '.join(PATTERNS)}")
        config, profile_name = presets.resolve_config(req.profile, **overrides)
        head_ids = _selection(req.head, req.heads, SYNTHETIC_HEADS, "head", 0)
        n = req.n_tokens or SYNTHETIC_SEQ_LEN
        check_memory(n, config.block_size, len(head_ids), 1,
                     (SYNTHETIC_HEADS + 2 * SYNTHETIC_KV_HEADS) * n * SYNTHETIC_HEAD_DIM * 4, _device(req.device))
        views, meta = _synthetic(config, head_ids, n, req.pattern, req.seed, req.device, req.dtype)
        return MaskViews(views, meta, config, profile_name, f"synthetic {req.pattern} (seed {req.seed})")
    from pathlib import Path

    from .documents import read_document

    text, doc_name = read_document(req.document)
    views, meta, config, profile_name = _from_model(text, req.model, req.profile, overrides, req.layer, req.layers,
                                                    req.head, req.heads, req.n_tokens, req.device, req.dtype)
    return MaskViews(views, meta, config, profile_name, f"{Path(doc_name).name} · {meta['model']['name']}")


def _device(device: str) -> str:
    from .models import resolve_device

    return resolve_device(device)


def _synthetic(config, head_ids: list[int], n: int, pattern: str, seed: int, device: str, dtype: str):
    from . import mask_analysis, models
    from .workloads import synthetic_qkv

    dev = models.resolve_device(device)
    torch_dtype = models.resolve_dtype(dtype, dev)
    q, k, _ = synthetic_qkv(1, SYNTHETIC_HEADS, SYNTHETIC_KV_HEADS, n, SYNTHETIC_HEAD_DIM, seed=seed, pattern=pattern,
                            device=dev, dtype=torch_dtype)
    views = mask_analysis.analyze(q, k, config, head_ids)
    meta = {"shape": {"heads": SYNTHETIC_HEADS, "kv_heads": SYNTHETIC_KV_HEADS, "seq_len": n,
                      "head_dim": SYNTHETIC_HEAD_DIM}, "device": dev, "dtype": str(torch_dtype).removeprefix("torch."),
            "workload": {"kind": "synthetic", "pattern": pattern, "seed": seed}}
    return views, meta


def _from_model(text: str, model_spec: str, profile, overrides, layer, layers, head, heads, n_tokens, device, dtype):
    from . import mask_analysis, models, presets
    from .workloads import captured_qkv

    models.quiet_transformers(console.debug_enabled())
    spec = models.resolve_model(model_spec)
    config, profile_name = presets.resolve_config(profile or spec.profile, **overrides)
    source = models.ModelSource(spec)
    cfg = source.config()
    n_layers = int(cfg.num_hidden_layers)
    n_heads = int(cfg.num_attention_heads)
    layer_ids = _selection(layer, layers, n_layers, "layer", n_layers // 2)
    head_ids = _selection(head, heads, n_heads, "head", 0)
    dev = models.resolve_device(device)
    torch_dtype = models.resolve_dtype(dtype, dev)
    tokens = source.tokenizer()(text, return_tensors="pt", add_special_tokens=True)["input_ids"]
    limit = n_tokens or source.max_positions() or tokens.shape[1]
    tokens = tokens[:, :limit]
    n, hidden = int(tokens.shape[1]), int(getattr(cfg, "hidden_size", n_heads * 64))
    kv_heads, head_dim = int(getattr(cfg, "num_key_value_heads", n_heads)), hidden // n_heads
    # the forward's activations (a few hidden-size copies, fp32 at most) and the captured q/k/v of each layer
    inputs = n * (8 * hidden + len(layer_ids) * (n_heads + 2 * kv_heads) * head_dim) * 4
    check_memory(n, config.block_size, len(head_ids), len(layer_ids), inputs, dev)
    console.err.print(f"model: {spec.describe()} · {tokens.shape[1]} tokens · layers {_ranges(layer_ids)} · "
                      f"heads {_ranges(head_ids)}", highlight=False)
    loaded = source.load(torch_dtype, dev, attn_implementation="sdpa")
    with models.progress(f"running {spec.name} over {tokens.shape[1]} tokens"):
        captured = captured_qkv(loaded.model, tokens.to(loaded.device), layer_ids)
    views = []
    with _layer_progress(len(layer_ids), len(head_ids)) as advance:
        for li in layer_ids:
            q, k, _ = captured.pop(li)
            views.extend(mask_analysis.analyze(q, k, config, head_ids, layer=li))
            advance()
    meta = {"shape": {"layers": n_layers, "heads": n_heads, "kv_heads": kv_heads,
                      "seq_len": int(tokens.shape[1]), "head_dim": views[0].head_dim},
            "model": spec.to_dict(), "device": dev, "dtype": str(torch_dtype).removeprefix("torch."),
            "workload": {"kind": "document", "tokens": int(tokens.shape[1])}}
    return views, meta, config, profile_name


@contextlib.contextmanager
def _layer_progress(n_layers: int, n_heads: int):
    """A Rich progress bar on stderr (terminal only) advanced once per analysed layer."""
    if not console.err.is_terminal or n_layers == 1:
        with contextlib.nullcontext():
            yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(f"planning and measuring {n_heads} head(s) per layer"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=console.err, transient=True) as bar:
        task = bar.add_task("layers", total=n_layers)
        yield lambda: bar.advance(task)


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts, start = [], None
    for i, x in enumerate(ids):
        if start is None:
            start = x
        if i + 1 == len(ids) or ids[i + 1] != x + 1:
            parts.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(parts)
