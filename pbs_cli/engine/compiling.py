"""`--compile`: the model's non-attention work through ``torch.compile``, attention left eager.

In eager mode a small model's prefill at long lengths spends much of its time in memory-bound
elementwise ops (RMSNorm in fp32, RoPE, SiLU, residual adds): about 160 ms of a 640 ms PBS forward
of the embedded model at 128K on an H100 (BENCHMARKS.md, "Where the time goes"), the same in the dense
forward. A compiler fuses them. ``compiled_layers`` compiles each decoder layer (the classes a model
names in ``_no_split_modules``, e.g. ``LlamaDecoderLayer``) for the duration of a block; the attention
functions of ``integration`` are ``torch.compiler.disable``d, so each layer becomes two graphs (before
and after attention) around the eager PBS or dense SDPA call. Both the PBS and the dense forward
compile the same graphs: a speedup measured with ``--compile`` compares compiled against compiled.

Only the decoder layers are compiled, not the model's own forward: under ``torch.compile`` (before
torch 2.14) transformers builds a full (N, N) causal mask instead of passing ``is_causal``, which
would send every layer to the dense fallback and take 16 GiB at 128K.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..errors import PBSError, UnsupportedError

DEFAULT_BACKEND = "inductor"


def decoder_layers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute name, layer) of every decoder layer of ``model``, in order.

    The layer classes are the model's ``_no_split_modules`` (the unit accelerate never splits).
    Raises UnsupportedError when the model names none or none is found."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = []
    for parent in model.modules():
        for attr, child in parent.named_children():
            if type(child).__name__ in names:
                found.append((parent, attr, child))
    if not found:
        raise UnsupportedError(f"--compile: {type(model).__name__} names no decoder-layer class "
                               "(_no_split_modules); run without --compile")
    return found


@contextlib.contextmanager
def compiled_layers(model: torch.nn.Module, enabled: bool = True, backend: str | None = None) -> Iterator[None]:
    """Within this block every decoder layer of ``model`` runs through ``torch.compile(layer)``;
    the original modules are put back on exit. The compiled code is shared by all layers (one
    graph pair per attention implementation and input shape); the first forward compiles it.
    With ``enabled`` False the block changes nothing. ``backend``: torch.compile's (default
    ``DEFAULT_BACKEND``)."""
    if not enabled:
        yield
        return
    backend = backend or DEFAULT_BACKEND
    layers = decoder_layers(model)
    for parent, attr, layer in layers:
        parent.register_module(attr, torch.compile(layer, backend=backend))
    try:
        yield
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        first = (str(exc).splitlines() or [""])[0][:200]
        raise PBSError(f"torch.compile ({backend}) failed: {first}; run without --compile") from None
    finally:
        for parent, attr, layer in layers:
            parent.register_module(attr, layer)
