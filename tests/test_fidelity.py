"""Fidelity metrics against hand-computed values; probe/recall/calibration helpers on a tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch
from fixtures import tiny_model_dir  # noqa: F401

from pbs_cli.engine import fidelity as F
from pbs_cli.engine.calibration import search_threshold
from pbs_kernels import PBSConfig
from pbs_kernels import reference as R

SMALL = PBSConfig(block_size=16, segment_size=32, threshold=0.9)


# -- next-token metrics ---------------------------------------------------------------------------


def test_next_token_metrics_match_hand_computation():
    ref = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    out = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    ids = torch.tensor([5, 0, 2])  # next tokens of positions 0 and 1: 0 and 2

    def lsm(row):
        z = math.log(sum(math.exp(x) for x in row))
        return [x - z for x in row]

    lr = [lsm(r) for r in ref.tolist()]
    lo = [lsm(r) for r in out.tolist()]
    nll_ref = -(lr[0][0] + lr[1][2]) / 2
    nll = -(lo[0][0] + lo[1][2]) / 2
    kl = sum(sum(math.exp(a) * (a - b) for a, b in zip(ra, rb)) for ra, rb in zip(lr, lo)) / 3
    m = F.next_token_metrics(ref, out, ids)
    assert m["ppl_dense"] == pytest.approx(math.exp(nll_ref), rel=1e-6)
    assert m["ppl"] == pytest.approx(math.exp(nll), rel=1e-6)
    assert m["ppl_increase"] == pytest.approx(math.exp(nll) / math.exp(nll_ref) - 1, rel=1e-6)
    # argmax: ref (0, 1, 2) vs out (0 (tie, first), 1, 0): two of three agree
    assert m["top1_agreement"] == pytest.approx(2 / 3)
    assert m["mean_kl"] == pytest.approx(kl, rel=1e-5)
    assert m["positions"] == 3


def test_identical_logits_are_perfect_and_chunks_add_up():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 11, generator=g), torch.randn(50, 11, generator=g)
    ids = torch.randint(0, 11, (50,), generator=g)
    same = F.next_token_metrics(a, a, ids)
    assert same["top1_agreement"] == 1.0 and same["mean_kl"] == pytest.approx(0.0, abs=1e-7)
    assert same["ppl"] == pytest.approx(same["ppl_dense"])
    whole = F.next_token_metrics(a, b, ids)
    sums = F.NextTokenSums()
    for s in range(0, 50, 7):  # chunks, the last one without a next token for its last position
        sums.add(a[s : s + 7], b[s : s + 7], ids[s + 1 : s + 8])
    for key, value in sums.result().items():
        assert value == pytest.approx(whole[key], rel=1e-5), key


# -- small helpers --------------------------------------------------------------------------------


def test_sample_query_rows_spread_over_the_range():
    rows = F.sample_query_rows(1000, 5, 256)
    assert rows.tolist() == [256, 442, 628, 813, 999]
    short = F.sample_query_rows(100, 64, 256)  # shorter than the start: sample all of [0, N)
    assert len(short) == 64 and short[0] == 0 and short[-1] == 99
    assert F.sample_query_rows(10, 64, 256).tolist() == list(range(10))


def test_search_threshold_finds_the_smallest_passing_tau():
    calls = []

    def evaluate(tau):
        calls.append(tau)
        return {"density": tau, "recall": tau}

    best, tried = search_threshold(evaluate, lambda r: r["recall"] >= 0.93, steps=12)
    assert best is not None and 0.93 <= best["threshold"] < 0.935
    assert all(not r["meets"] for r in tried if r["threshold"] < 0.93)
    best, _ = search_threshold(evaluate, lambda r: r["recall"] >= 0.2)
    assert best["threshold"] == 0.5  # the low end already meets it
    best, _ = search_threshold(evaluate, lambda r: r["recall"] >= 1.0)
    assert best["threshold"] == 1.0  # only dense does


# -- passkey -------------------------------------------------------------------------------------


class CharTokenizer:
    """One token per character (id = code point); enough to check the prompt arithmetic."""

    bos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_passkey_prompt_has_exact_length_and_the_needle_at_its_depth(depth):
    tok = CharTokenizer()
    filler = "lorem ipsum dolor sit amet. " * 3  # shorter than needed: repeats
    p = F.passkey_prompt(tok, filler, 600, depth, "12345")
    assert len(p.ids) == 600
    text = tok.decode(p.ids[1:])
    needle = F.PASSKEY_NEEDLE.format(key="12345")
    assert text.startswith(F.PASSKEY_INTRO) and text.endswith(F.PASSKEY_QUESTION)
    assert tok.decode(p.ids[p.needle_at : p.needle_at + len(needle)]) == needle
    room = 600 - 1 - len(F.PASSKEY_INTRO) - len(needle) - len(F.PASSKEY_QUESTION)
    assert p.needle_at - 1 - len(F.PASSKEY_INTRO) == round(depth * room)
    with pytest.raises(ValueError, match="too short"):
        F.passkey_prompt(tok, filler, 100, depth, "12345")


def test_passkey_found_takes_the_first_number():
    assert F.passkey_found(" 51444. Remember", "51444")
    assert not F.passkey_found(" 5144. 51444", "51444")
    assert not F.passkey_found(" a function", "51444")
    assert not F.passkey_found(" 514449", "51444")


# -- forwards on the tiny model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from pbs_cli.engine import integration

    integration.register()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    ids = torch.randint(3, model.config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(1))
    return model, ids


def test_threshold_one_equals_dense_with_full_recall(tiny):
    model, ids = tiny
    dense = F.run_forward(model, ids, None)
    res = F.run_forward(model, ids, SMALL.replace(threshold=1.0), recall_rows=32)
    torch.testing.assert_close(res.hidden, dense.hidden, atol=2e-5, rtol=1e-4)
    assert res.density == 1.0 and res.recall == pytest.approx(1.0, abs=1e-5)
    assert [ly["layer"] for ly in res.layers] == [0, 1] and all(ly["path"] == "pbs" for ly in res.layers)
    m = F.compare_hidden(model, dense.hidden, res.hidden, ids, chunk=37)
    assert m["top1_agreement"] == 1.0 and m["mean_kl"] < 1e-6


def test_probe_recall_matches_the_plan_of_each_layer(tiny):
    model, ids = tiny
    cfg = SMALL.replace(threshold=0.5, score="sampled", sample_rows=4, threshold_scope="total")
    hidden, captured = F.capture_qk(model, ids)
    assert sorted(captured) == [0, 1] and captured[0][0].shape == (1, 4, 200, 16)
    stats = F.plan_stats(captured, cfg, rows=32)
    # independent: the recall of the same rows through the reference, layer by layer (dense activations)
    for ly in stats["layers"]:
        q, k = captured[ly["layer"]]
        plan = R.build_plan(q, k, cfg)
        rows = F.sample_query_rows(200, 32, 32)
        assert ly["recall"] == pytest.approx(float(R.attention_recall(q, k, plan, rows).mean()), rel=1e-6)
        assert ly["density"] == pytest.approx(plan.density())
    assert 0.3 < stats["recall"] < 1.0 and stats["density"] < 1.0
    # the probe measures recall on the sparse forward's own activations: layer 0 sees the same q/k
    res = F.run_forward(model, ids, cfg, recall_rows=32)
    assert res.layers[0]["recall"] == pytest.approx(stats["layers"][0]["recall"], rel=1e-4)
    assert res.layers[0]["density"] == pytest.approx(stats["layers"][0]["density"], rel=1e-6)


def test_dense_layers_run_dense_and_count_as_density_one(tiny):
    model, ids = tiny
    cfg = SMALL.replace(threshold=0.3, dense_layers=(0,))
    res = F.run_forward(model, ids, cfg, recall_rows=16)
    assert res.layers[0]["path"] == "dense" and res.layers[0]["density"] == 1.0
    assert res.layers[1]["path"] == "pbs" and res.layers[1]["density"] < 1.0
    stats = F.plan_stats(F.capture_qk(model, ids)[1], cfg, rows=16)
    assert stats["layers"][0]["density"] == 1.0 and stats["layers"][1]["density"] < 1.0


# -- prefill-then-continue -------------------------------------------------------------------------


def test_continuation_length_defaults_to_the_last_eighth_capped():
    assert F.continuation_tokens(200) == 25 and F.continuation_tokens(9000) == 1024 and F.continuation_tokens(5) == 1
    assert F.continuation_tokens(200, 60) == 60
    for bad in (0, 200):
        with pytest.raises(ValueError, match="choose 1 to 199"):
            F.continuation_tokens(200, bad)


def test_continuation_at_threshold_one_equals_dense(tiny):
    model, ids = tiny
    m = F.continuation_metrics(model, ids, SMALL.replace(threshold=1.0), 150)
    assert (m["prefix_tokens"], m["tokens"]) == (150, 50)
    assert m["top1_agreement"] == 1.0 and m["mean_kl"] < 1e-6
    assert m["ppl"] == pytest.approx(m["ppl_dense"], rel=1e-5)


def eager_continuation(model, ids, prefix: int, allowed: torch.Tensor) -> torch.Tensor:
    """Oracle: final hidden states of positions prefix-1 .. N-2 from two explicit eager forwards with
    hand-built additive masks: the prefix with ``allowed`` (bool (P, P)), then the rest over its
    cache, seeing every cached key and the causal part of its own chunk."""
    n = ids.shape[1]
    rest = n - 1 - prefix
    first_mask = torch.zeros(1, 1, prefix, prefix).masked_fill(~allowed, float("-inf"))
    seen = torch.cat([torch.ones(rest, prefix, dtype=torch.bool), torch.ones(rest, rest, dtype=torch.bool).tril()], 1)
    rest_mask = torch.zeros(1, 1, rest, prefix + rest).masked_fill(~seen, float("-inf"))
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            first = model.model(input_ids=ids[:, :prefix], attention_mask=first_mask, use_cache=True)
            after = model.model(input_ids=ids[:, prefix : n - 1], attention_mask=rest_mask, use_cache=True,
                                **{F.cache_kwarg(model.model): F.cache_of(first)})
    finally:
        model.set_attn_implementation("sdpa")
    return torch.cat([first.last_hidden_state[:, -1:], after.last_hidden_state], 1)


def test_continuation_matches_two_eager_forwards_with_hand_built_masks(tiny):
    """A selection whose plan is known in advance: threshold 1e-6 without permutation, sink or local
    blocks keeps each query's own 32-token segment only (the diagonal blocks, causal). The oracle
    builds that mask by hand for an eager prefill of 150 tokens, continues densely over its cache,
    and computes the metrics from the definitions."""
    model, ids = tiny
    prefix, n = 150, ids.shape[1]
    cfg = SMALL.replace(threshold=1e-6, permute=False, sink=False)
    pos = torch.arange(prefix)
    causal = pos[None, :] <= pos[:, None]
    own_segment = causal & (pos[None, :] // 32 == pos[:, None] // 32)
    sparse = eager_continuation(model, ids, prefix, own_segment)
    dense = eager_continuation(model, ids, prefix, causal)
    torch.testing.assert_close(F.continue_after_prefill(model, ids, cfg, prefix), sparse, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(F.continue_after_prefill(model, ids, None, prefix), dense, atol=1e-4, rtol=1e-4)

    assert (sparse - dense).abs().max() > 1e-2  # the sparse prefill's cache really differs
    with torch.no_grad():
        ld = torch.log_softmax(model.lm_head(dense[0]).double(), -1)
        ls = torch.log_softmax(model.lm_head(sparse[0]).double(), -1)
    targets = ids[0, prefix:]
    want_kl = float((ld.exp() * (ld - ls)).sum(-1).mean())
    m = F.continuation_metrics(model, ids, cfg, prefix)
    assert (m["prefix_tokens"], m["tokens"]) == (prefix, n - prefix)
    assert m["mean_kl"] == pytest.approx(want_kl, rel=1e-3) and want_kl > 1e-5
    assert m["top1_agreement"] == pytest.approx(float((ld.argmax(-1) == ls.argmax(-1)).double().mean()))
    assert m["ppl"] == pytest.approx(math.exp(-float(ls.gather(-1, targets[:, None]).mean())), rel=1e-4)
    assert m["ppl_dense"] == pytest.approx(math.exp(-float(ld.gather(-1, targets[:, None]).mean())), rel=1e-4)


# -- the half-precision noise floor ----------------------------------------------------------------


def test_noise_floor_compares_half_precision_dense_with_float32(tiny):
    import copy

    from pbs_cli.engine.evaluation import noise_floor

    model, ids = tiny
    assert noise_floor(model, ids, F.run_forward(model, ids, None).hidden) is None  # float32: no floor
    half = copy.deepcopy(model).to(torch.bfloat16)
    floor = noise_floor(half, ids, F.run_forward(half, ids, None).hidden)
    assert half.dtype == torch.bfloat16  # given back in its own dtype
    # independent: full logits of the bf16 model and of the same (bf16-rounded) weights in float32
    with torch.no_grad():
        lp_half = half(input_ids=ids).logits[0].float().log_softmax(-1)
        lp_ref = copy.deepcopy(half).to(torch.float32)(input_ids=ids).logits[0].log_softmax(-1)
    kl = torch.nn.functional.kl_div(lp_half, lp_ref, log_target=True, reduction="none").sum(-1).clamp_min(0)
    agree = (lp_half.argmax(-1) == lp_ref.argmax(-1)).float().mean().item()
    assert floor["dtype"] == "bfloat16" and floor["reference"] == "float32"
    assert floor["mean_kl"] == pytest.approx(kl.mean().item(), rel=0.05, abs=1e-6)
    assert floor["top1_agreement"] == pytest.approx(agree, abs=0.011)
    assert floor["mean_kl"] > 0.0  # bf16 rounding shows: the floor is not zero
