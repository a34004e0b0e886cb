"""Fidelity of a sparse prefill against dense attention, on a real model and real text.

* next-token metrics over every position: perplexity of the text, top-1 agreement with dense, mean
  KL(dense || sparse) (``compare_hidden`` / ``next_token_metrics``). Teacher-forced over one sparse
  forward, so the selection of a position's block has seen later tokens of the same text (the
  permutation is scored by the last query block, block scores pool or sample later rows);
* prefill-then-continue (``continuation_metrics``): the first part of the text prefilled sparse, the
  rest scored with dense attention over the KV cache that prefill made. The selection never sees
  the scored tokens: what a user gets when generating or appending after a sparse prefill;
* per-layer density and per-layer/head attention-mass recall on sampled query rows, by a ``Probe`` that
  observes the run of the "pbs" attention of ``integration`` (``run_forward``);
* passkey retrieval: a random key hidden at a depth of a real filler document (``passkey_prompt``).

Shapes: logits (N, V); hidden (B, N, hidden); recall per layer (H_q, R).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from pbs_kernels import PBSConfig, build_plan
from pbs_kernels.reference import attention_recall

from . import integration
from .capture import Capture

CHUNK = 512  # positions per chunk of full-vocabulary logits (bounded memory)


# -- next-token metrics -----------------------------------------------------------------------


@dataclass
class NextTokenSums:
    """Running sums over positions; ``add`` a chunk at a time, read the means at the end."""

    nll_ref: float = 0.0
    nll: float = 0.0
    targets: int = 0
    agree: float = 0.0
    kl: float = 0.0
    positions: int = 0

    def add(self, ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor | None) -> None:
        """ref_logits, logits (n, V); targets (m,) int64, the next tokens of the first m <= n positions."""
        lr = ref_logits.float().log_softmax(-1)
        ls = logits.float().log_softmax(-1)
        self.agree += (lr.argmax(-1) == ls.argmax(-1)).sum().item()
        self.kl += (lr.exp() * (lr - ls)).sum(-1).clamp_min(0).sum().item()
        self.positions += lr.shape[0]
        if targets is not None and targets.numel():
            m = targets.numel()
            t = targets[:, None].to(lr.device)
            self.nll_ref -= lr[:m].gather(-1, t).sum().item()
            self.nll -= ls[:m].gather(-1, t).sum().item()
            self.targets += m

    def result(self) -> dict[str, float]:
        ppl_ref = math.exp(self.nll_ref / max(1, self.targets))
        ppl = math.exp(self.nll / max(1, self.targets))
        return {"ppl_dense": ppl_ref, "ppl": ppl, "ppl_increase": ppl / ppl_ref - 1.0,
                "top1_agreement": self.agree / max(1, self.positions), "mean_kl": self.kl / max(1, self.positions),
                "positions": self.positions}


def next_token_metrics(ref_logits: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """Metrics of logits (N, V) against ref_logits (N, V) for the token ids (N,) they were computed on.

    Perplexity uses the N-1 next tokens; agreement and KL use all N positions."""
    sums = NextTokenSums()
    sums.add(ref_logits, logits, ids[1:])
    return sums.result()


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary fp32 logits of final hidden states (B, n, hidden) -> (B, n, V)."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return cap * (logits / cap).tanh() if cap else logits


@torch.inference_mode()
def compare_hidden(model, hidden_ref: torch.Tensor, hidden: torch.Tensor, ids: torch.Tensor,
                   chunk: int = CHUNK) -> dict[str, float]:
    """``next_token_metrics`` from final hidden states (1, N, hidden), a chunk of positions at a time."""
    n = hidden.shape[1]
    ids = ids.reshape(-1)
    sums = NextTokenSums()
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        sums.add(output_logits(model, hidden_ref[0, s:e]), output_logits(model, hidden[0, s:e]), ids[s + 1 : e + 1])
    return sums.result()


# -- prefill-then-continue ----------------------------------------------------------------------

CONTINUATION_MAX = 1024  # default cap of the scored continuation, in tokens


def continuation_tokens(n: int, requested: int | None = None) -> int:
    """Tokens of an ``n``-token text scored after the prefix: ``requested``, else the last eighth of
    the text, at most ``CONTINUATION_MAX`` (at least 1). Raises ValueError unless 1 <= tokens < n."""
    tokens = requested if requested is not None else max(1, min(CONTINUATION_MAX, n // 8))
    if not 1 <= tokens < n:
        raise ValueError(f"a continuation of {tokens} tokens needs a text of more tokens (got {n}); "
                         f"choose 1 to {n - 1}")
    return tokens


def cache_of(outputs):
    """The KV cache of a model output (``cache`` in newer transformers, ``past_key_values`` before)."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else getattr(outputs, "past_key_values", None)


def cache_kwarg(model) -> str:
    """The name of the cache argument of ``model.forward`` (``cache`` or ``past_key_values``)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def continue_after_prefill(model, ids: torch.Tensor, config: PBSConfig | None, prefix: int) -> torch.Tensor:
    """Final hidden states (1, N - prefix, hidden) of positions prefix-1 .. N-2, which predict tokens
    prefix .. N-1 of ids (1, N).

    ids[:, :prefix] is prefilled with the "pbs" attention under ``config`` (dense SDPA when None, or
    when ``prefix`` is below ``config.dense_below``, where a PBS prefill is the dense one), keeping
    its KV cache; then ids[:, prefix:N-1] runs over that cache with transformers' own SDPA
    attention (dense by construction, whatever the integration would route). The last prefix
    position comes from the prefill itself: its block has no later rows to see.
    """
    backbone = model.base_model
    n = ids.shape[1]
    try:
        if config is None or prefix < config.dense_below:
            integration.set_attention(model, "sdpa")
            first = backbone(input_ids=ids[:, :prefix], use_cache=True)
        else:
            integration.set_attention(model, integration.NAME)
            with integration.pbs_run(config):
                first = backbone(input_ids=ids[:, :prefix], use_cache=True)
        hidden = [first.last_hidden_state[:, -1:].clone()]  # a copy: the prefix's states can go
        cache = cache_of(first)
        del first
        if prefix < n - 1:
            integration.set_attention(model, "sdpa")
            rest = backbone(input_ids=ids[:, prefix : n - 1], use_cache=True, **{cache_kwarg(backbone): cache})
            hidden.append(rest.last_hidden_state)
    finally:
        integration.set_attention(model, integration.NAME)
    return torch.cat(hidden, 1)


def continuation_metrics(model, ids: torch.Tensor, config: PBSConfig, prefix: int,
                         dense_hidden: torch.Tensor | None = None, chunk: int = CHUNK) -> dict[str, float]:
    """Prefill-then-continue: the next-token metrics of tokens prefix .. N-1 of ids (1, N) after a
    prefill of the first ``prefix`` tokens with ``config``, against the same with a dense prefill
    (``dense_hidden``: ``continue_after_prefill(model, ids, None, prefix)``, computed when None).

    Returns prefix_tokens, tokens (N - prefix: every scored token is a target), ppl, ppl_dense,
    ppl_increase, top1_agreement and mean_kl over those tokens."""
    if dense_hidden is None:
        dense_hidden = continue_after_prefill(model, ids, None, prefix)
    hidden = continue_after_prefill(model, ids, config, prefix)
    # hidden position t predicts token prefix + t: the ids that compare_hidden shifts by one
    m = compare_hidden(model, dense_hidden, hidden, ids[:, prefix - 1 :], chunk)
    return {"prefix_tokens": prefix, "tokens": ids.shape[1] - prefix, "ppl": m["ppl"], "ppl_dense": m["ppl_dense"],
            "ppl_increase": m["ppl_increase"], "top1_agreement": m["top1_agreement"], "mean_kl": m["mean_kl"]}


# -- the recall probe: an observer of a run ---------------------------------------------------


@dataclass
class Probe:
    """Observes a run: the attention-mass recall of sampled query rows on the plan of every sparse layer
    that selects blocks (a sliding-window layer's band keeps all its window sees: recall 1)."""

    config: PBSConfig
    rows: int = 64  # sampled query rows per layer for recall; 0 = no recall
    recall: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> fp32 (H_q, R)

    def __call__(self, call: integration.AttentionCall) -> None:
        if not self.rows or call.plan is None or call.window is not None or call.stat.layer is None:
            return
        q, k = call.query, call.key
        plan = call.plan if call.plan.kv_indices is not None else build_plan(q, k, self.config, call.scaling)
        rows = sample_query_rows(q.shape[2], self.rows, self.config.segment_size, q.device)
        self.recall[call.stat.layer] = attention_recall(q, k, plan, rows, call.scaling).mean(0).float().cpu()


def sample_query_rows(n: int, rows: int, start: int, device=None) -> torch.Tensor:
    """int64 (R,): ``rows`` query positions spread evenly over [start, N) (all of [0, N) when N <= start)."""
    lo = start if n > start else 0
    count = min(rows, n - lo)
    return torch.unique(torch.linspace(lo, n - 1, count, device=device).round().long())


@dataclass
class ForwardResult:
    hidden: torch.Tensor  # (1, N, hidden)
    layers: list[dict[str, Any]]  # per layer: layer, path, density, recall (mean), recall_min_head, recall_heads
    density: float  # kept causal blocks / all causal blocks, averaged over layers (dense layers count 1.0)
    recall: float | None  # mean over layers, heads and sampled rows


@torch.inference_mode()
def run_forward(model, ids: torch.Tensor, config: PBSConfig | None, recall_rows: int = 64) -> ForwardResult:
    """One forward over ids (1, N): dense attention when ``config`` is None ("pbs_dense": SDPA, or the family's
    eager attention for soft-capped or sink layers), else "pbs" observed by a recall ``Probe``."""
    backbone = model.base_model
    if config is None:
        integration.set_attention(model, integration.DENSE_NAME)
        hidden = backbone(input_ids=ids, use_cache=False).last_hidden_state
        return ForwardResult(hidden, [], 1.0, None)
    integration.set_attention(model, integration.NAME)
    probe = Probe(config, recall_rows)
    with integration.pbs_run(config, observers=[probe]) as run:
        hidden = backbone(input_ids=ids, use_cache=False).last_hidden_state
    layers = []
    for stat in run.recorder.prefill_layers():
        rec = probe.recall.get(stat.layer) if stat.path == "pbs" else None
        reason = "dense_layers" if config.for_layer(stat.layer) is None else stat.reason
        layers.append({"layer": stat.layer, "path": stat.path, "reason": reason, "density": stat.density,
                       "recall": float(rec.mean()) if rec is not None else 1.0,
                       "recall_min_head": float(rec.mean(-1).min()) if rec is not None else 1.0,
                       "recall_heads": [round(float(x), 5) for x in rec.mean(-1)] if rec is not None else None})
    dens = [ly["density"] for ly in layers]
    recalls = [ly["recall"] for ly in layers] if recall_rows else []
    return ForwardResult(hidden, layers, sum(dens) / max(1, len(dens)),
                         sum(recalls) / len(recalls) if recalls else None)


# -- passkey retrieval ------------------------------------------------------------------------

PASSKEY_INTRO = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it; "
                 "you will be asked for it at the end.\n\n")
PASSKEY_NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    ids: list[int]
    key: str
    depth: float  # requested depth in [0, 1]
    needle_at: int  # token index where the needle starts


def passkey_prompt(tokenizer, filler: str, length: int, depth: float, key: str) -> PasskeyPrompt:
    """Exactly ``length`` tokens: intro, filler, the needle at ``depth`` of the filler, filler, question.

    The filler (real text) is tokenized once and cut at token boundaries; it repeats when too short.
    Raises ValueError when ``length`` cannot hold the fixed parts.
    """
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    intro, needle, question = enc(PASSKEY_INTRO), enc(PASSKEY_NEEDLE.format(key=key)), enc(PASSKEY_QUESTION)
    room = length - len(bos) - len(intro) - len(needle) - len(question)
    if room < 0:
        raise ValueError(f"passkey length {length} is too short: the fixed parts take {length - room} tokens")
    fill = enc(filler)
    if not fill:
        raise ValueError("the filler document has no tokens")
    while len(fill) < room:
        fill = fill + fill
    fill = fill[:room]
    cut = int(round(depth * room))
    ids = bos + intro + fill[:cut] + needle + fill[cut:] + question
    return PasskeyPrompt(ids, key, depth, len(bos) + len(intro) + cut)


def random_key(rng: random.Random, digits: int = 5) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def passkey_found(text: str, key: str) -> bool:
    """True when the first number in the generated text is the key."""
    m = re.search(r"\d+", text)
    return m is not None and m.group(0) == key


# -- calibration helpers: plans on dense activations ------------------------------------------

@torch.inference_mode()
def capture_qk(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """One dense forward over ids (1, N) (a dense run of "pbs": SDPA, or the family's eager attention for
    soft-capped or sink layers). Returns (final hidden (1, N, hidden), {layer: (q, k)})."""
    capture = Capture()
    integration.set_attention(model, integration.NAME)
    with integration.pbs_run(None, observers=[capture]):
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    return hidden, capture.store  # type: ignore[return-value]


@torch.inference_mode()
def plan_stats(captured: dict[int, tuple[torch.Tensor, torch.Tensor]], config: PBSConfig, rows: int = 64,
               scale: float | None = None) -> dict[str, Any]:
    """Density and attention recall of ``config``'s plans on captured dense activations, per layer.

    Dense layers (``config.dense_layers``) count density 1 and recall 1. Returns density and recall
    averaged over layers (recall also over heads and ``rows`` sampled query rows), the lowest head
    recall, and the per-layer values."""
    layers = []
    for layer, (q, k) in sorted(captured.items()):
        if config.for_layer(layer) is None:
            layers.append({"layer": layer, "density": 1.0, "recall": 1.0, "recall_min_head": 1.0})
            continue
        plan = build_plan(q, k, config, scale)
        sample = sample_query_rows(q.shape[2], rows, config.segment_size, q.device)
        rec = attention_recall(q, k, plan, sample, scale).mean(0)  # (H_q, R)
        layers.append({"layer": layer, "density": plan.density(), "recall": float(rec.mean()),
                       "recall_min_head": float(rec.mean(-1).min())})
    n = max(1, len(layers))
    return {"density": sum(x["density"] for x in layers) / n, "recall": sum(x["recall"] for x in layers) / n,
            "recall_min_head": min((x["recall_min_head"] for x in layers), default=1.0), "layers": layers}
