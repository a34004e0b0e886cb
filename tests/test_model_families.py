"""Every verified family (pbs_cli.engine.families) on a tiny random-weight model built from its transformers config
class: at threshold 1.0 the "pbs" attention gives the family's own eager attention (token level, fp32,
every layer's hidden states and the logits), and below 1.0 every layer takes the PBS path, sliding-window
layers as band plans of their window. Plus the fallbacks around windows and soft-capping: padded batches,
decode steps, short prompts, the mask builder.

Tolerance rule (FlashAttention's): err(pbs fp32 vs eager fp64) <= 2 * err(eager fp32 vs eager fp64) + floor.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from pbs_cli.engine import families, integration
from pbs_kernels import PBSConfig
from test_integration import with_cache

FLOOR = 1e-5
N = 150  # tokens: three windows of W and a bit, an odd number of 16-token blocks
W = 50  # the sliding window of the windowed layers: not a multiple of the block size
SMALL = dict(block_size=16, segment_size=32)
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.2,  # sharp attention
            bos_token_id=0, eos_token_id=0, pad_token_id=0)

# model_type -> (config class, model class, config fields, sliding window of each layer (None: global))
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(head_dim=16), [None, None]),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=W, max_window_layers=1),
              [None, W]),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16), [None, None]),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(head_dim=16, sliding_window=W), [W, W]),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                                            experts_implementation="eager"),  # fp64 reference
                [None, None]),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=W), [W, W]),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(head_dim=16, sliding_window=W, attn_logit_softcapping=2.0, query_pre_attn_scalar=16),
               [W, None]),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(head_dim=16, sliding_window=W, num_local_experts=4, num_experts_per_tok=2,
                     layer_types=["sliding_attention", "full_attention"], experts_implementation="eager"),
                [W, None]),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    dict(head_dim=16, sliding_window=W, layer_types=["sliding_attention", "full_attention"]),
                    [W, None]),
}


def build(model_type: str, seed: int = 0):
    config_cls, model_cls, fields, windows = CASES[model_type]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**TINY, **fields)
    return getattr(transformers, model_cls)(config).eval(), windows


def run(model, ids, attn: str, config: PBSConfig | None = None, **kw):
    integration.set_attention(model, attn)
    with torch.no_grad(), integration.pbs_run(config or PBSConfig(**SMALL)) as pbs:
        out = model(ids, output_hidden_states=True, **kw)
    return out, pbs.recorder


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_matches_eager(model, ids, out, **kw):
    """``out`` (a fp32 forward) against the family's eager attention in fp64, by the tolerance rule, at every
    token that is not padding (a padding query sees no key)."""
    ref, _ = run(copy.deepcopy(model).double(), ids, "eager", **kw)
    eager, _ = run(model, ids, "eager", **kw)
    real = kw["attention_mask"].bool() if "attention_mask" in kw else torch.ones_like(ids, dtype=torch.bool)
    for h_ref, h_eager, h_out in zip(ref.hidden_states, eager.hidden_states, out.hidden_states):
        assert max_err(h_out[real], h_ref[real]) <= 2 * max_err(h_eager[real], h_ref[real]) + FLOOR
    assert max_err(out.logits[real], ref.logits[real]) <= 2 * max_err(eager.logits[real], ref.logits[real]) + FLOOR


def band_density(n: int, window: int, block: int) -> float:
    """Share of the causal blocks that hold a (query, key) pair of the window, counted token by token."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    inside = (j <= i) & (j > i - window)
    n_b = -(-n // block)
    pad = n_b * block - n
    blocks = torch.nn.functional.pad(inside, (0, pad, 0, pad)).reshape(n_b, block, n_b, block).any(3).any(1)
    return blocks.sum().item() / (n_b * (n_b + 1) / 2)


def test_every_listed_family_has_a_case():
    assert sorted(t for f in families.FAMILIES for t in f.model_types) == sorted(CASES)
    assert {f.architecture for f in families.FAMILIES} == {case[1] for case in CASES.values()}


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_family_equals_its_eager_attention_and_runs_sparse(model_type):
    model, windows = build(model_type)
    ids = torch.randint(0, 300, (1, N), generator=torch.Generator().manual_seed(1))

    exact, rec = run(model, ids, integration.NAME, PBSConfig(threshold=1.0, **SMALL))
    assert_matches_eager(model, ids, exact)
    layers = rec.prefill_layers()
    assert [s.layer for s in layers] == list(range(len(windows)))
    for stat, window in zip(layers, windows):
        assert stat.path == "pbs", stat
        if window is None:
            assert stat.reason.startswith("causal prefill") and stat.density == pytest.approx(1.0)
        else:  # the band: exactly the blocks the window touches
            assert stat.reason.startswith(f"sliding window {window}")
            assert stat.density == pytest.approx(band_density(N, window, SMALL["block_size"]))
        assert ("softcap" in stat.reason) == (model_type == "gemma2")
        assert stat.reason.endswith(", sinks") == (model_type == "gpt_oss")

    _, rec = run(model, ids, integration.NAME, PBSConfig(threshold=0.5, **SMALL))
    layers = rec.prefill_layers()
    assert len(layers) == len(windows) and all(s.path == "pbs" for s in layers)
    assert [s.reason.startswith("sliding window") for s in layers] == [w is not None for w in windows]


def test_a_window_that_covers_the_prompt_runs_pbs_selection():
    """A window of at least N tokens masks nothing: the layer runs PBS selection like a global one (a band
    would keep every block) and says why; at threshold 1.0 still the eager output."""
    model, _ = build("mistral")
    model.config.sliding_window = N
    ids = torch.randint(0, 300, (1, N), generator=torch.Generator().manual_seed(6))
    exact, rec = run(model, ids, integration.NAME, PBSConfig(threshold=1.0, **SMALL))
    assert [s.reason for s in rec.prefill_layers()] == [f"causal prefill (window {N} covers the prompt)"] * 2
    assert_matches_eager(model, ids, exact)
    _, rec = run(model, ids, integration.NAME, PBSConfig(threshold=0.3, **SMALL))
    assert all(s.path == "pbs" and s.density < 1.0 for s in rec.prefill_layers())


@pytest.mark.parametrize("model_type,head_dim", [("mistral", 64), ("gemma2", 64), ("gpt_oss", 64),
                                                 ("gemma3_text", 256)])
def test_family_through_the_triton_kernel(model_type, head_dim, monkeypatch):
    """The same equality with the Triton attention kernel (the interpreter on a CPU, fp32) at head_dims it
    takes: band plans with the window, soft-capped and sink layers through the launcher."""
    monkeypatch.setenv("PBS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    config_cls, model_cls, fields, windows = CASES[model_type]
    torch.manual_seed(0)
    sizes = {**TINY, "num_attention_heads": 2, "num_key_value_heads": 1, "hidden_size": 128}
    config = getattr(transformers, config_cls)(**sizes, **{**fields, "head_dim": head_dim})
    model = getattr(transformers, model_cls)(config).eval()
    ids = torch.randint(0, 300, (1, N), generator=torch.Generator().manual_seed(5))
    out, rec = run(model, ids, integration.NAME, PBSConfig(threshold=1.0, block_size=32, segment_size=64))
    assert [s.kernel.startswith("triton/") for s in rec.prefill_layers()] == [True] * len(windows)
    assert [s.reason.startswith("sliding window") for s in rec.prefill_layers()] == [w is not None for w in windows]
    assert_matches_eager(model, ids, out)


@pytest.mark.parametrize("model_type", ["mistral", "gemma2", "gpt_oss"])
def test_padded_batch_runs_dense_with_the_window(model_type):
    """A padding mask is not the plain window: the mask builder gives SDPA's mask and the layer runs dense
    (the family's eager function where logits are soft-capped or sinks are learned), equal to eager attention."""
    model, windows = build(model_type)
    ids = torch.randint(0, 300, (2, 120), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, -7:] = 0  # right padding: the fp64 eager reference fills padding rows with NaN, which no real token reads
    out, rec = run(model, ids, integration.NAME, PBSConfig(threshold=0.5, **SMALL), attention_mask=mask)
    assert all(s.path == "dense" and s.reason.startswith("attention mask") for s in rec.prefill_layers())
    assert_matches_eager(model, ids, out, attention_mask=mask)


@pytest.mark.parametrize("model_type", ["mistral", "gemma2", "gemma3_text", "gpt_oss"])
def test_decode_after_a_band_prefill_equals_eager(model_type):
    """Prefill with band plans, then decode steps (dense, with the cache's window mask; soft-capped or with
    sinks in the family's eager function): the steps' logits equal an eager forward over the whole sequence."""
    model, _ = build(model_type)
    ids = torch.randint(0, 300, (1, 120), generator=torch.Generator().manual_seed(3))
    integration.set_attention(model, integration.NAME)
    steps = []
    with torch.no_grad(), integration.pbs_run(PBSConfig(threshold=1.0, **SMALL)) as pbs:
        out = model(ids, use_cache=True)
        seq = ids
        for _ in range(3):
            nxt = out.logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, nxt], 1)
            out = model(nxt, use_cache=True, **with_cache(model, out))
            steps.append(out.logits[:, -1])
    assert all(s.path == "dense" and s.reason.startswith("decode") for s in pbs.recorder.decode_calls())
    integration.set_attention(model, "eager")
    with torch.no_grad():
        full = model(seq).logits
    for i, step in enumerate(steps):
        torch.testing.assert_close(step, full[:, 120 + i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["mistral", "gemma2"])
def test_short_prompt_runs_dense_with_the_window_rebuilt(model_type):
    """Below dense_below the layer runs dense; the window the mask builder left out is applied there."""
    model, _ = build(model_type)
    ids = torch.randint(0, 300, (1, N), generator=torch.Generator().manual_seed(4))
    out, rec = run(model, ids, integration.NAME, PBSConfig(dense_below=N + 1, **SMALL))
    assert all(s.path == "dense" and s.reason.startswith("seq_len") for s in rec.prefill_layers())
    assert_matches_eager(model, ids, out)


def test_eval_forwards_run_windows_and_soft_caps():
    """``pbs eval``'s forwards (pbs_cli.engine.fidelity.run_forward): the dense one runs the family's eager attention
    where SDPA cannot soft-cap, the probed one runs band plans (recall 1: the band keeps what the window sees)."""
    from pbs_cli.engine import fidelity

    model, windows = build("gemma2")
    ids = torch.randint(0, 300, (1, N), generator=torch.Generator().manual_seed(7))
    dense = fidelity.run_forward(model, ids, None)
    integration.set_attention(model, "eager")
    with torch.no_grad():
        eager = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(dense.hidden, eager, atol=1e-5, rtol=1e-5)
    sparse = fidelity.run_forward(model, ids, PBSConfig(threshold=0.5, **SMALL), recall_rows=16)
    assert [ly["path"] for ly in sparse.layers] == ["pbs"] * len(windows)
    band = [ly for ly, w in zip(sparse.layers, windows) if w is not None]
    assert band and all(ly["reason"].startswith(f"sliding window {W}") and ly["recall"] == 1.0 for ly in band)


def test_mask_builder_leaves_out_only_the_plain_sliding_window():
    from transformers.masking_utils import (chunked_causal_mask_function, sdpa_mask,
                                            sliding_window_causal_mask_function)

    kw = dict(batch_size=1, q_length=100, kv_length=100, local_size=W)
    assert integration.pbs_mask(mask_function=sliding_window_causal_mask_function(W), **kw) is None
    padded = torch.ones(1, 100, dtype=torch.bool)
    padded[0, :3] = False
    others = {  # chunked attention (also passed with local_size), a padded prefill, another window, a cache
        "chunked": dict(mask_function=chunked_causal_mask_function(W, torch.zeros(1, dtype=torch.long))),
        "padded": dict(mask_function=sliding_window_causal_mask_function(W), attention_mask=padded),
        "window 49": dict(mask_function=sliding_window_causal_mask_function(W - 1)),
        "offset": dict(mask_function=sliding_window_causal_mask_function(W), q_offset=10, kv_offset=0,
                       q_length=90),
    }
    for what, extra in others.items():
        args = {**kw, **extra}
        got = integration.pbs_mask(**args)
        assert isinstance(got, torch.Tensor), what
        assert torch.equal(got, sdpa_mask(**args)), what
