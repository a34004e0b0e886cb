"""The "pbs" attention inside transformers: dense equivalence at threshold 1.0, fallbacks, statistics.

Tolerance rule (FlashAttention's): err(pbs fp32 vs fp64 model) <= 2 * err(SDPA fp32 vs fp64 model) + floor.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pbs_cli.engine import integration
from pbs_kernels import PBSConfig, pbs_prefill_attention

FLOOR = 1e-5
SMALL = dict(block_size=16, segment_size=32)


def tiny_model(heads: int, kv_heads: int, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=16 * heads, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16,
                      max_position_embeddings=1024, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    # stronger weights than the default init so attention is far from uniform
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model


def forward(model, ids, attn: str, config: PBSConfig | None = None, **kw):
    integration.set_attention(model, attn)
    with torch.no_grad(), integration.pbs_run(config or PBSConfig(**SMALL)) as run:
        out = model(ids, output_hidden_states=True, **kw)
    return out, run.recorder


def with_cache(model, outputs) -> dict:
    """The KV cache of ``outputs`` as a keyword for the next call (``cache`` in newer transformers)."""
    cache = getattr(outputs, "cache", None)
    cache = cache if cache is not None else outputs.past_key_values
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {key: cache}


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (4, 1)])
@pytest.mark.parametrize("batch,n", [(1, 83), (2, 150)])
def test_threshold_one_matches_dense_layers_and_logits(heads, kv_heads, batch, n):
    model = tiny_model(heads, kv_heads)
    model64 = copy.deepcopy(model).double()
    ids = torch.randint(0, 300, (batch, n), generator=torch.Generator().manual_seed(n))
    ref, _ = forward(model64, ids, "sdpa")
    dense, _ = forward(model, ids, "sdpa")
    pbs, rec = forward(model, ids, integration.NAME, PBSConfig(threshold=1.0, **SMALL))

    layers = rec.prefill_layers()
    assert [s.layer for s in layers] == [0, 1]
    assert all(s.path == "pbs" and s.density == pytest.approx(1.0) for s in layers)
    for h_ref, h_dense, h_pbs in zip(ref.hidden_states, dense.hidden_states, pbs.hidden_states):
        assert max_err(h_pbs, h_ref) <= 2 * max_err(h_dense, h_ref) + FLOOR
    assert max_err(pbs.logits, ref.logits) <= 2 * max_err(dense.logits, ref.logits) + FLOOR


def test_sparse_threshold_runs_the_plan_and_records_its_density(monkeypatch):
    model = tiny_model(6, 2, layers=1)
    ids = torch.randint(0, 300, (1, 200), generator=torch.Generator().manual_seed(1))
    config = PBSConfig(threshold=0.5, **SMALL)
    seen = {}

    def spy(q, k, v, cfg, scale=None, softcap=None, sinks=None):
        seen["args"] = (q.clone(), k.clone(), v.clone(), cfg, scale)
        assert softcap is None and sinks is None  # Llama has neither
        return pbs_prefill_attention(q, k, v, cfg, scale)

    monkeypatch.setattr(integration, "pbs_prefill_attention", spy)
    integration.set_attention(model, integration.NAME)
    with torch.no_grad(), integration.pbs_run(config) as run:
        sparse = model(ids).logits
    q, k, v, cfg, scale = seen["args"]
    assert cfg is config  # the run's parameters, not a hidden global
    assert q.shape == (1, 6, 200, 16) and k.shape == (1, 2, 200, 16)  # GQA not repeated
    _, plan = pbs_prefill_attention(q, k, v, config, scale)
    (stat,) = run.recorder.prefill_layers()
    assert stat.path == "pbs" and stat.density == pytest.approx(plan.density())
    assert stat.density < 1.0
    assert stat.kernel == "reference" and stat.to_dict()["kernel"] == "reference"  # what ran, on a CPU
    dense, _ = forward(model, ids, "sdpa")
    assert max_err(sparse, dense.logits) > 1e-4  # blocks were really skipped


def test_sparse_layers_record_the_kernel_of_their_own_call(monkeypatch):
    """The kernel named per layer is asked of the layer's own query and the run's block size."""
    model = tiny_model(4, 2, layers=2)
    ids = torch.randint(0, 300, (1, 90), generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(integration, "attention_kernel",
                        lambda q, bs, *kv, masked: f"spy/{tuple(q.shape)}/{bs}/{masked}")
    _, rec = forward(model, ids, integration.NAME, PBSConfig(threshold=0.6, **SMALL))
    assert [s.kernel for s in rec.prefill_layers()] == ["spy/(1, 4, 90, 16)/16/False"] * 2


def test_decode_runs_dense_and_is_recorded():
    model = tiny_model(4, 2)
    ids = torch.randint(0, 300, (1, 70), generator=torch.Generator().manual_seed(2))
    integration.set_attention(model, integration.NAME)
    with torch.no_grad(), integration.pbs_run(PBSConfig(threshold=0.6, **SMALL)) as run:
        out = model(ids, use_cache=True)
        step = model(out.logits[:, -1:].argmax(-1), use_cache=True, **with_cache(model, out))
    decode = run.recorder.decode_calls()
    assert len(decode) == 2 and all(s.path == "dense" and s.reason.startswith("decode") for s in decode)
    assert all(s.density is None and s.kernel is None for s in decode)
    assert step.logits.shape == (1, 1, 300)


def test_padding_mask_falls_back_to_sdpa_exactly():
    model = tiny_model(4, 2)
    ids = torch.randint(0, 300, (2, 90), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding in the second row
    ref, _ = forward(model, ids, "sdpa", attention_mask=mask)
    pbs, rec = forward(model, ids, integration.NAME, PBSConfig(threshold=0.5, **SMALL), attention_mask=mask)
    assert all(s.path == "dense" and "mask" in s.reason for s in rec.prefill_layers())
    assert torch.equal(pbs.logits, ref.logits)


def test_prefill_over_a_cache_and_short_inputs_run_dense():
    model = tiny_model(4, 2)
    ids = torch.randint(0, 300, (1, 120), generator=torch.Generator().manual_seed(4))
    integration.set_attention(model, integration.NAME)
    with torch.no_grad(), integration.pbs_run(PBSConfig(threshold=0.5, dense_below=100, **SMALL)) as run:
        first = model(ids[:, :60], use_cache=True)
        model(ids[:, 60:], use_cache=True, **with_cache(model, first))
    reasons = [s.reason for s in run.recorder.prefill_layers()]
    assert reasons[:2] == ["seq_len 60 < dense_below 100"] * 2
    assert all("q_len 60 != kv_len 120" in r for r in reasons[2:]) and len(reasons) == 4


def test_outside_a_run_uses_defaults_and_records_nothing():
    model = tiny_model(4, 2, layers=1)
    ids = torch.randint(0, 300, (1, 300), generator=torch.Generator().manual_seed(5))
    integration.set_attention(model, integration.NAME)
    assert integration.current_run() is None
    with torch.no_grad():
        outside = model(ids).logits
        with integration.pbs_run(PBSConfig()) as run:
            inside = model(ids).logits
    assert torch.equal(outside, inside)
    assert len(run.recorder.stats) == 1


def test_load_with_attn_implementation_pbs(tiny_model_dir):
    integration.register()
    integration.register()  # idempotent
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="pbs", use_safetensors=True)
    assert model.config._attn_implementation == "pbs"
    ids = torch.randint(0, 300, (1, 64))
    with torch.no_grad(), integration.pbs_run(PBSConfig(**SMALL)) as run:
        model(ids)
    assert [s.path for s in run.recorder.prefill_layers()] == ["pbs", "pbs"]


from fixtures import tiny_model_dir  # noqa: E402,F401  (session fixture)


def test_dense_layers_run_dense():
    model = tiny_model(4, 2)
    ids = torch.randint(0, 300, (1, 100), generator=torch.Generator().manual_seed(6))
    _, rec = forward(model, ids, integration.NAME, PBSConfig(threshold=0.5, dense_layers=(1,), **SMALL))
    assert [(s.layer, s.path) for s in rec.prefill_layers()] == [(0, "pbs"), (1, "dense")]
    assert rec.prefill_layers()[1].reason == "layer 1 in dense_layers"


def test_compiled_layers_give_the_eager_outputs_and_keep_attention_eager():
    """``--compile``'s layer compilation: every layer still calls "pbs" (compiled around, not through),
    hidden states equal the eager forward's for PBS and dense, and the model gets its own layers back.
    Backend "aot_eager": Dynamo's graph capture without code generation (inductor is the CLI's default
    and needs minutes of CPU here)."""
    from pbs_cli.engine import compiling

    model = tiny_model(4, 2, layers=3)
    ids = torch.randint(0, 300, (1, 150), generator=torch.Generator().manual_seed(3))
    cfg = PBSConfig(**SMALL, threshold=0.8)
    eager = {attn: forward(model, ids, attn, cfg)[0].hidden_states[-1] for attn in (integration.NAME, integration.DENSE_NAME)}
    originals = list(model.model.layers)
    torch._dynamo.reset()
    with compiling.compiled_layers(model, backend="aot_eager"):
        assert all(type(layer).__name__ == "OptimizedModule" for layer in model.model.layers)
        for _ in range(2):  # the second pass runs the cached graphs
            for attn in (integration.NAME, integration.DENSE_NAME):
                out, rec = forward(model, ids, attn, cfg)
                torch.testing.assert_close(out.hidden_states[-1], eager[attn], rtol=1e-5, atol=1e-5)
                if attn == integration.NAME:
                    assert [s.path for s in rec.prefill_layers()] == ["pbs"] * 3
    assert list(model.model.layers) == originals
    with compiling.compiled_layers(model, enabled=False):
        assert list(model.model.layers) == originals


def test_compile_refuses_a_model_without_decoder_layer_classes():
    from pbs_cli.engine import compiling
    from pbs_cli.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="run without --compile"):
        with compiling.compiled_layers(torch.nn.Linear(2, 2), backend="aot_eager"):
            pass


def test_observers_see_every_call_with_its_inputs_and_the_plan_it_ran():
    """An observer gets each layer's post-RoPE q/k (layer 0's checked against q/k computed by hand from the
    weights) and, for sparse layers, the plan: the one ``build_plan`` makes of them. A dense run (config None)
    gives plain SDPA's logits and is observed too."""
    from pbs_kernels import build_plan

    model = tiny_model(4, 2)
    ids = torch.randint(0, 300, (1, 96), generator=torch.Generator().manual_seed(3))
    seen: list[integration.AttentionCall] = []
    config = PBSConfig(threshold=0.5, **SMALL)
    integration.set_attention(model, integration.NAME)
    with torch.no_grad(), integration.pbs_run(config, observers=[seen.append]):
        model(ids)
    assert [c.stat.layer for c in seen] == [0, 1] and all(c.stat.path == "pbs" for c in seen)
    for call in seen:
        want = build_plan(call.query, call.key, config, call.scaling)
        assert torch.equal(call.plan.kv_num_blocks, want.kv_num_blocks)
        assert torch.equal(call.plan.kv_indices, want.kv_indices)
    # a dense run takes the dense path in every layer, still observed; its inputs are those of plain SDPA's
    dense_seen: list[integration.AttentionCall] = []
    with torch.no_grad(), integration.pbs_run(None, observers=[dense_seen.append]) as run:
        out = model(ids, output_hidden_states=True)
    assert [(c.stat.path, c.plan) for c in dense_seen] == [("dense", None)] * 2
    assert [s.reason for s in run.recorder.stats] == ["dense run"] * 2
    ref, _ = forward(model, ids, "sdpa")
    assert max_err(out.logits, ref.logits) == 0.0
    q, k = layer0_qk(model, ids)
    assert max_err(dense_seen[0].query, q) < 1e-5 and max_err(dense_seen[0].key, k) < 1e-5
    assert max_err(seen[0].query, q) < 1e-5 and max_err(seen[0].key, k) < 1e-5


def layer0_qk(model, ids):
    """Post-RoPE q (B, H_q, N, D) and k (B, H_kv, N, D) of layer 0, computed by hand from the weights."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn, n = model.model.layers[0].self_attn, ids.shape[1]
    with torch.no_grad():
        hidden = model.model.embed_tokens(ids)
        cos, sin = model.model.rotary_emb(hidden, torch.arange(n)[None])
        x = model.model.layers[0].input_layernorm(hidden)
        q = attn.q_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
        return apply_rotary_pos_emb(q, k, cos, sin)


def test_plain_causal_runs_drop_the_sliding_window():
    """``plain_causal``: "pbs_dense" is plain causal SDPA, the window dropped; the same weights in a model without
    a window (Llama) are the oracle, and without ``plain_causal`` the window is kept (the outputs differ)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=300, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    windowed = MistralForCausalLM(MistralConfig(sliding_window=32, **shape)).eval()
    plain = LlamaForCausalLM(LlamaConfig(attn_implementation="sdpa", **shape)).eval()
    plain.load_state_dict(windowed.state_dict())
    ids = torch.randint(0, 300, (1, 100), generator=torch.Generator().manual_seed(1))
    integration.set_attention(windowed, integration.DENSE_NAME)
    with torch.no_grad():
        want = plain(ids).logits
        with integration.pbs_run(PBSConfig(**SMALL), plain_causal=True):
            got = windowed(ids).logits
        kept = windowed(ids).logits
    assert max_err(got, want) == 0.0
    assert max_err(kept, want) > 1e-3


def test_exactly_one_module_registers_attention_functions():
    """One transformers hook: of the non-test Python files, only the integration module registers attention
    functions or mask builders."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"Attention(Mask)?Interface\.register\(")
    # the sources: not the tests, nor what an install or a virtual environment left beside them (build/, .venv/)
    files = [p for top in ("pbs_cli", "kernels", "profiles", "benchmarks") for p in (root / top).rglob("*.py")]
    registering = sorted(str(p.relative_to(root)) for p in files if pattern.search(p.read_text()))
    assert registering == ["pbs_cli/engine/integration.py"]
