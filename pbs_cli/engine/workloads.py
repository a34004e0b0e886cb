"""Attention workloads for profiling: structured synthetic Q/K/V, or Q/K/V captured from a real model.

Random Gaussian Q and K give near-uniform attention, which no trained head shows and which no
sparse method can exploit; timing or scoring a sparse kernel on them says little. The synthetic
generator builds Q/K from a few interpretable components instead, each a known pattern of real heads:

=============  ==============================================================================
``sink``       every query attends strongly to token 0 (the attention sink).
``local``      a sliding-window head: RoPE-like rotary features make ``q_i . k_j`` peak at
               ``i == j`` and fall off with the distance ``i - j`` (window about ``window`` tokens).
``vertical``   "heavy-hitter" keys at random positions scattered over the whole sequence attract
               attention from every query (vertical lines in the attention map).
``slash``      the same rotary features with a phase offset: the head attends to the token
               ``offset`` positions back (a diagonal line parallel to the main diagonal).
``topic``      a retrieval head: the text is a sequence of spans (mean ``topic_span`` tokens), each
               on one of a few recurring topics; queries attend to earlier keys of their own
               topic, wherever they are (scattered, block-coherent structure).
``uniform``    plain Gaussian Q/K/V (the unfair baseline, for contrast).
``mixed``      each query head gets one dominant pattern (cycling over local, vertical, sink,
               slash, topic in a seeded order) plus weaker amounts of the others; every head keeps
               a sink.
=============  ==============================================================================

Construction (per KV head, fp32, then one cast): the head dimension is split into a sink
coordinate, a heavy-hitter coordinate, ``F`` rotary frequency pairs, ``T`` topic coordinates and
the remaining coordinates that hold Gaussian noise. Keys carry the features (marker 1 at token 0,
weights in [0.5, 1] at the heavy-hitter positions, ``cos/sin(w_f j)``, the one-hot topic of their
span), queries carry per-head amplitudes, so the pre-softmax logit ``q_i . k_j / sqrt(D)`` is, in nats::

    A_sink [j = 0] + A_vert w_j + A_local mean_f cos(w_f (i - j)) + A_slash mean_f cos(w_f (i - offset - j))
    + A_topic [topic(i) = topic(j)] + noise (std ``noise``)

Block selection sees mean-pooled blocks, so isolated needles (vertical) are nearly invisible to
it while local, topic and sink structure survives pooling, as on real models.

Queries of one GQA group share their KV head's keys. Finally each KV head's coordinates are
rotated by a random orthogonal matrix (applied to its queries and keys alike, which leaves every
logit unchanged) so no pattern sits on an axis. V is Gaussian.

Memory: the outputs are allocated once in ``dtype``; temporaries are one head at a time
(``seq_len x head_dim`` fp32), so 128K tokens x 32 heads x 128 dims in bf16 needs about 2 GiB for
q, k and v together plus ~130 MiB of scratch. The same seed on the same device gives the same
tensors; CPU and CUDA streams differ.

This module's public API (``synthetic_qkv``, ``PATTERNS``, ``captured_qkv``) is imported by other
commands (``profile``, ``viz-mask``): keep its signatures stable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

PATTERNS = ("mixed", "sink", "local", "vertical", "slash", "topic", "uniform")

# Default amplitudes (nats of logit) of the dominant component of a head. Chosen so that every
# pattern concentrates most of a row's attention mass on few key blocks at 1K..128K tokens, as
# real long-context heads do: a logit lead of ~log(N) (7..12 nats) over the background is needed
# for a handful of keys to win against N others.
_DOMINANT = {"sink": 12.0, "local": 16.0, "vertical": 11.0, "slash": 16.0, "topic": 9.0}
# Share of the dominant amplitude that a mixed head gives its non-dominant components.
_MINOR = (0.35, 0.7)
_MIXED_ORDER = ("local", "vertical", "sink", "slash", "topic")


@dataclass(frozen=True)
class HeadRecipe:
    """Amplitudes (nats) of one query head's components and its slash offset (tokens)."""

    sink: float = 0.0
    local: float = 0.0
    vertical: float = 0.0
    slash: float = 0.0
    topic: float = 0.0
    offset: int = 0
    kind: str = "uniform"


@dataclass(frozen=True)
class Recipe:
    """What ``synthetic_qkv`` built: one ``HeadRecipe`` per query head and, per batch and KV head, the
    heavy-hitter key positions (int64 tensors on the CPU). Useful for tests and pictures."""

    heads: tuple[HeadRecipe, ...]
    heavy_positions: tuple[tuple[torch.Tensor, ...], ...] = field(repr=False)
    topics: tuple[tuple[torch.Tensor, ...], ...] = field(repr=False, default=())  # int64 (N,) per (b, kv head)


def _rotary_frequencies(n_pairs: int, window: int, seq_len: int) -> torch.Tensor:
    """fp64 (F,): geometric frequencies from 1 rad/token down to ~pi/window rad/token.

    The mean of ``cos(w_f * d)`` is ~1 for ``d << 1`` and falls to noise beyond ~``window`` tokens,
    with a power-law decay in between (like RoPE's long-term decay)."""
    if n_pairs <= 0:
        return torch.zeros(0, dtype=torch.float64)
    w_max = 1.0
    w_min = min(w_max, math.pi / max(2, min(window, seq_len)))
    if n_pairs == 1:
        return torch.tensor([w_min], dtype=torch.float64)
    return torch.logspace(math.log10(w_max), math.log10(w_min), n_pairs, dtype=torch.float64)


def _layout(head_dim: int) -> tuple[int, int, int]:
    """(F rotary pairs, T topic coordinates, noise coordinates) for a head dimension: 2 marker
    coordinates, about a quarter for topics and noise, the rest rotary pairs."""
    if head_dim < 8:
        raise ValueError(f"head_dim must be >= 8 for the synthetic workload, got {head_dim}")
    n_content = max(4, head_dim // 4)
    n_pairs = (head_dim - 2 - n_content) // 2
    n_content = head_dim - 2 - 2 * n_pairs
    n_topics = min(8, n_content // 2)
    return n_pairs, n_topics, n_content - n_topics


def head_recipes(heads: int, pattern: str, generator: torch.Generator, seq_len: int, *,
                 sink: float | None = None, local: float | None = None, vertical: float | None = None,
                 slash: float | None = None, topic: float | None = None,
                 max_offset: int = 2048) -> tuple[HeadRecipe, ...]:
    """Per query head amplitudes for ``pattern`` (see the module docstring). Amplitude arguments
    override the dominant defaults (nats); ``max_offset`` bounds the slash offsets."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; choose one of {', '.join(PATTERNS)}")
    amp = dict(_DOMINANT)
    for name, value in (("sink", sink), ("local", local), ("vertical", vertical), ("slash", slash), ("topic", topic)):
        if value is not None:
            amp[name] = float(value)

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    def offset() -> int:
        hi = max(2, min(max_offset, seq_len // 2))
        return int(torch.randint(1, hi, (), generator=generator))

    recipes = []
    order = [_MIXED_ORDER[i] for i in torch.randperm(len(_MIXED_ORDER), generator=generator).tolist()]
    for h in range(heads):
        if pattern == "uniform":
            recipes.append(HeadRecipe())
            continue
        if pattern == "mixed":
            kind = order[h % len(order)]
            parts = {name: amp[name] * uniform(*_MINOR) for name in _MIXED_ORDER}
            parts["slash"] *= 0.5  # slash components are rare outside slash heads
            parts[kind] = amp[kind] * uniform(0.85, 1.1)
            parts["sink"] = max(parts["sink"], 0.5 * amp["sink"])  # every real head has a sink
        else:
            kind = pattern
            parts = {name: 0.0 for name in _MIXED_ORDER}
            parts[kind] = amp[kind]
        recipes.append(HeadRecipe(sink=parts["sink"], local=parts["local"], vertical=parts["vertical"],
                                  slash=parts["slash"], topic=parts["topic"],
                                  offset=offset() if parts["slash"] else 0, kind=kind))
    return tuple(recipes)


def _heavy_positions(seq_len: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """int64 (count,) distinct key positions in [1, seq_len), scattered uniformly."""
    count = max(0, min(count, seq_len - 1))
    if count == 0:
        return torch.zeros(0, dtype=torch.int64)
    return (torch.randperm(seq_len - 1, generator=generator)[:count] + 1).sort().values


def _topic_of_positions(seq_len: int, n_topics: int, span: int, generator: torch.Generator) -> torch.Tensor:
    """int64 (seq_len,): the topic of each position; spans of exponential length (mean ``span``)."""
    if n_topics <= 0:
        return torch.zeros(seq_len, dtype=torch.int64)
    n_spans = seq_len // max(1, span) + 8
    lengths = (torch.empty(n_spans).exponential_(1.0 / max(1, span), generator=generator).long() + 1)
    while int(lengths.sum()) < seq_len:  # rare: make sure the spans cover the sequence
        lengths = torch.cat([lengths, torch.full((n_spans,), max(1, span), dtype=torch.int64)])
    topics = torch.randint(0, n_topics, (lengths.numel(),), generator=generator)
    return torch.repeat_interleave(topics, lengths)[:seq_len]


def synthetic_qkv(batch: int, heads: int, kv_heads: int, seq_len: int, head_dim: int, *, seed: int = 0,
                  dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  pattern: str = "mixed", window: int = 1024, heavy_per_1k: float = 4.0, topic_span: int = 384,
                  noise: float = 1.0, sink: float | None = None, local: float | None = None,
                  vertical: float | None = None, slash: float | None = None, topic: float | None = None,
                  max_offset: int = 2048, return_recipe: bool = False):
    """Structured synthetic attention inputs.

    Args:
        batch, heads, kv_heads, seq_len, head_dim: shapes; ``heads`` must be a multiple of ``kv_heads``;
            ``head_dim`` >= 8.
        seed: all randomness (recipes, positions, topics, noise, rotations) derives from it.
        dtype, device: of the returned tensors (generation runs in fp32 on ``device``).
        pattern: one of ``PATTERNS`` (default "mixed": a different dominant pattern per head).
        window: tokens over which a local head's logit falls off (rotary lowest frequency ~pi/window).
        heavy_per_1k: heavy-hitter keys per 1024 tokens, per batch row and KV head.
        topic_span: mean length (tokens) of a topic span.
        noise: std (nats) of the noise part of every logit.
        sink, local, vertical, slash, topic: override the dominant amplitudes (nats of logit lead).
        max_offset: largest slash offset (tokens).
        return_recipe: also return the ``Recipe`` (per-head amplitudes, heavy positions, topics).

    Returns:
        (q, k, v): q (batch, heads, seq_len, head_dim); k, v (batch, kv_heads, seq_len, head_dim);
        plus the ``Recipe`` when ``return_recipe``.
    """
    if min(batch, heads, kv_heads, seq_len) <= 0:
        raise ValueError(f"shapes must be positive, got batch={batch} heads={heads} kv_heads={kv_heads} "
                         f"seq_len={seq_len}")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    device = torch.device(device)
    n_pairs, n_topics, n_noise = _layout(head_dim)
    g = heads // kv_heads
    cpu_gen = torch.Generator().manual_seed(seed)
    dev_gen = torch.Generator(device=device).manual_seed(seed + 1)
    recipes = head_recipes(heads, pattern, cpu_gen, seq_len, sink=sink, local=local, vertical=vertical,
                           slash=slash, topic=topic, max_offset=max_offset)
    freqs = _rotary_frequencies(n_pairs, window, seq_len).to(device)
    pos = torch.arange(seq_len, device=device, dtype=torch.float64)
    root_d = math.sqrt(head_dim)
    ks = math.sqrt(root_d)  # keys carry D^(1/4) of the 1/sqrt(D) scale, queries the rest
    qs = root_d / ks
    # noise: q_n . k_n / sqrt(D) has std sigma^2 sqrt(n_noise) / sqrt(D) = noise
    sigma = math.sqrt(max(noise, 0.0) * root_d / math.sqrt(max(1, n_noise)))

    q = torch.empty(batch, heads, seq_len, head_dim, dtype=dtype, device=device)
    k = torch.empty(batch, kv_heads, seq_len, head_dim, dtype=dtype, device=device)
    v = torch.empty(batch, kv_heads, seq_len, head_dim, dtype=dtype, device=device)
    n_heavy = int(round(heavy_per_1k * seq_len / 1024))
    heavy_all, topics_all = [], []
    r0, r1 = 2, 2 + 2 * n_pairs  # rotary coordinates [r0, r1)
    t0, t1 = r1, r1 + n_topics  # topic coordinates [t0, t1); noise [t1, D)

    # rotary features of every position, once: (N, 2F) fp32 = [cos(w_f i), sin(w_f i)]
    ang = torch.remainder(pos[:, None] * freqs[None, :], 2 * math.pi)
    rotary = torch.cat([ang.cos(), ang.sin()], -1).float() if n_pairs else None
    del ang

    def shifted(offset: int) -> torch.Tensor:  # (N, 2F): features of position i - offset
        c, s = torch.cos(freqs * offset).float(), torch.sin(freqs * offset).float()
        cos_i, sin_i = rotary[:, :n_pairs], rotary[:, n_pairs:]
        return torch.cat([cos_i * c + sin_i * s, sin_i * c - cos_i * s], -1)

    for b in range(batch):
        heavy_b, topics_b = [], []
        for hk in range(kv_heads):
            rot = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=cpu_gen))[0].to(device)
            if pattern == "uniform":
                heavy = torch.zeros(0, dtype=torch.int64)
                topic_of = torch.zeros(seq_len, dtype=torch.int64)
                kf = torch.randn(seq_len, head_dim, generator=dev_gen, device=device)
            else:
                heavy = _heavy_positions(seq_len, n_heavy, cpu_gen)
                topic_of = _topic_of_positions(seq_len, n_topics, topic_span, cpu_gen)
                # -- keys: features without amplitudes (queries carry those) --
                kf = torch.zeros(seq_len, head_dim, device=device)
                kf[0, 0] = 1.0  # sink marker
                if heavy.numel():
                    w = 0.5 + 0.5 * torch.rand(heavy.numel(), generator=cpu_gen)
                    kf[heavy.to(device), 1] = w.to(device)
                kf[:, r0:r1] = rotary
                if n_topics:
                    kf[:, t0:t1] = torch.nn.functional.one_hot(topic_of.to(device), n_topics).float()
                kf[:, t1:] = torch.randn(seq_len, n_noise, generator=dev_gen, device=device) * sigma
                kf *= ks
            heavy_b.append(heavy)
            topics_b.append(topic_of)
            # one random rotation per KV head, shared by its queries, leaves every logit unchanged
            k[b, hk] = (kf @ rot).to(dtype)
            del kf
            v[b, hk] = torch.randn(seq_len, head_dim, generator=dev_gen, device=device).to(dtype)

            for hq in range(hk * g, (hk + 1) * g):
                r = recipes[hq]
                if pattern == "uniform":
                    q[b, hq] = torch.randn(seq_len, head_dim, generator=dev_gen, device=device).to(dtype)
                    continue
                # -- queries: amplitudes (nats) times the remaining scale --
                qf = torch.zeros(seq_len, head_dim, device=device)
                qf[:, 0] = r.sink * qs
                qf[:, 1] = r.vertical * qs
                if n_pairs and (r.local or r.slash):
                    if r.local:
                        qf[:, r0:r1] = rotary * (r.local * qs / n_pairs)
                    if r.slash:
                        qf[:, r0:r1] += shifted(r.offset) * (r.slash * qs / n_pairs)
                if n_topics and r.topic:
                    qf[:, t0:t1] = torch.nn.functional.one_hot(topic_of.to(device), n_topics).float() * (r.topic * qs)
                qf[:, t1:] = torch.randn(seq_len, n_noise, generator=dev_gen, device=device) * (sigma / ks)
                q[b, hq] = (qf @ rot).to(dtype)
                del qf
        heavy_all.append(tuple(heavy_b))
        topics_all.append(tuple(topics_b))
    if return_recipe:
        return q, k, v, Recipe(heads=recipes, heavy_positions=tuple(heavy_all), topics=tuple(topics_all))
    return q, k, v


# -- captured from a real model ------------------------------------------------------------------


def captured_qkv(model, tokens: torch.Tensor,
                 layers: Sequence[int] | Iterable[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Run ``model`` over ``tokens`` and return the real post-RoPE q/k/v of the requested layers.

    model: a transformers causal LM whose attention goes through ``ALL_ATTENTION_FUNCTIONS``
    (Llama, Qwen, Mistral, Gemma, ...). tokens: int64 (B, N) on the model's device.
    layers: 0-based decoder layer indices; negative indices count from the end.

    Returns {layer: (q (B, H_q, N, D), k (B, H_kv, N, D), v (B, H_kv, N, D))} in the model's dtype,
    exactly what the attention function receives (RoPE applied, K/V not repeated for GQA). The
    forward stops after the last requested layer, so later layers cost nothing.
    """
    from . import integration
    from .capture import Capture, CaptureDone

    n_layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    wanted = sorted({(l + n_layers if l < 0 else l) for l in layers})
    if not wanted:
        raise ValueError("no layers requested")
    bad = [l for l in wanted if l < 0 or (n_layers and l >= n_layers)]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    capture = Capture(values=True, layers=wanted)
    previous = getattr(model.config, "_attn_implementation", None) or "sdpa"
    integration.set_attention(model, integration.NAME)
    try:
        with torch.inference_mode(), integration.pbs_run(None, observers=[capture]):
            model(input_ids=tokens, use_cache=False)
    except CaptureDone:
        pass
    finally:
        integration.set_attention(model, previous)
    captured = capture.store
    missing = [l for l in wanted if l not in captured]
    if missing:
        raise RuntimeError(f"the forward never reached layer(s) {missing}; does the model route attention "
                           "through transformers' AttentionInterface?")
    return {l: captured[l] for l in wanted}
