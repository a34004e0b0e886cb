"""CUDA graphs of the per-layer PBS work (``pbs_kernels.graphs``): replayed layers give exactly the
eager calls' outputs and plans. The capture needs a GPU; on the CPU the calls pass through."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pbs_kernels import PBSConfig, pbs_prefill_attention  # noqa: E402
from pbs_kernels.graphs import LayerGraphs  # noqa: E402

ON_GPU = torch.cuda.is_available()
CFG = PBSConfig(block_size=64, segment_size=128, threshold=0.8, dense_below=0)


def layer_inputs(seed: int, device: str, n: int = 700, dtype=torch.float16, d: int = 64):
    """q, k, v as transformers hands them over: (B, H, N, D) views of (B, N, H, D) tensors."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, n, h, d, generator=g).to(dtype).to(device).transpose(1, 2) for h in (8, 2, 2)]


def same(a, b) -> None:
    (out_a, plan_a), (out_b, plan_b) = a, b
    assert torch.equal(out_a, out_b)
    assert torch.equal(plan_a.perm, plan_b.perm) and torch.equal(plan_a.kv_num_blocks, plan_b.kv_num_blocks)
    assert torch.equal(plan_a.kv_indices, plan_b.kv_indices)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_replayed_layers_equal_eager_calls():
    graphs = LayerGraphs()
    for seed in range(5):  # call 1 eager, call 2 captured then replayed, calls 3-5 replayed
        q, k, v = layer_inputs(seed, "cuda")
        got = graphs(q, k, v, CFG)
        got = (got[0].clone(), got[1])  # the graph's output buffer is reused by the next replay
        same(got, pbs_prefill_attention(q, k, v, CFG))
    assert graphs.failed is None and graphs.replays == 4
    graphs.close()


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_replayed_layers_equal_eager_calls_sampled_selection():
    """The sampled-row selection (the default preset's scoring) has a GPU path without host syncs: it
    is captured and replayed like the pooled one, with the same outputs and plans as eager calls."""
    cfg = CFG.replace(score="sampled", sample_rows=4, threshold=0.95, threshold_scope="total", row_top=1)
    graphs = LayerGraphs()
    for seed in range(4):
        q, k, v = layer_inputs(seed, "cuda")
        got = graphs(q, k, v, cfg)
        got = (got[0].clone(), got[1])
        same(got, pbs_prefill_attention(q, k, v, cfg))
    assert graphs.failed is None and graphs.replays == 3
    graphs.close()


@pytest.mark.skipif(not (ON_GPU and torch.cuda.get_device_capability()[0] == 9), reason="needs a Hopper GPU")
def test_replayed_layers_equal_eager_calls_persistent_kernel():
    """The same with the read mode "auto" picks on Hopper for head_dim 128, bf16, 128-token blocks:
    the persistent Gluon kernel, whose tile counter is zeroed inside the graph at every replay."""
    from pbs_kernels.attention import attention_kernel

    cfg = PBSConfig(block_size=128, segment_size=256, threshold=0.8, dense_below=0)
    graphs = LayerGraphs()
    for seed in range(4):
        q, k, v = layer_inputs(seed, "cuda", n=1500, dtype=torch.bfloat16, d=128)
        assert attention_kernel(q, 128) == "triton/persistent"
        assert attention_kernel(q, 128, k, v) == "triton/persistent in place"  # transformers' layout, no copies
        got = graphs(q, k, v, cfg)
        assert got[0].transpose(1, 2).is_contiguous()  # written in the inputs' (B, N, H, D) layout
        got = (got[0].clone(), got[1])
        same(got, pbs_prefill_attention(q, k, v, cfg))
    assert graphs.failed is None and graphs.replays == 3
    graphs.close()


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_graphed_model_forward_matches_the_eager_one(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from pbs_cli.engine import integration

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).eval().cuda().half()
    ids = torch.randint(0, 300, (1, 600), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    hidden = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("PBS_CUDA_GRAPHS", flag)
        integration.set_attention(model, integration.NAME)
        with torch.inference_mode(), integration.pbs_run(CFG) as run:
            hidden[flag] = model.model(input_ids=ids, use_cache=False).last_hidden_state
        replays = run.recorder.graph_replays
        assert [s.path for s in run.recorder.prefill_layers()] == ["pbs"] * 4
        assert (replays, run.recorder.graph_failure) == ((3 if flag == "1" else 0), None)
    assert torch.equal(hidden["1"], hidden["0"])


def test_long_layers_run_eagerly_unless_graphs_are_forced(monkeypatch):
    from pbs_kernels import graphs

    monkeypatch.delenv("PBS_CUDA_GRAPHS", raising=False)
    assert graphs.worth_capturing(32768) and graphs.worth_capturing(graphs.GRAPHS_BELOW - 1)
    assert not graphs.worth_capturing(graphs.GRAPHS_BELOW) and not graphs.worth_capturing(131072)
    monkeypatch.setenv("PBS_CUDA_GRAPHS", "1")
    assert graphs.worth_capturing(131072)


def test_cpu_calls_pass_through(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    graphs = LayerGraphs()
    for seed in range(3):
        q, k, v = layer_inputs(seed, "cpu", n=200, dtype=torch.float32)
        same(graphs(q, k, v, CFG), pbs_prefill_attention(q, k, v, CFG))
    assert graphs.replays == 0 and graphs.failed is None


def test_pbs_cuda_graphs_0_turns_them_off(monkeypatch):
    from pbs_cli.engine import integration

    monkeypatch.setenv("PBS_CUDA_GRAPHS", "0")
    with integration.pbs_run(CFG) as run:
        assert run.graphs is None
    monkeypatch.setenv("PBS_CUDA_GRAPHS", "1")
    with integration.pbs_run(CFG) as run:
        assert isinstance(run.graphs, LayerGraphs)


def test_a_failed_capture_falls_back_to_eager_for_good(monkeypatch):
    """A capture that raises (as a host synchronization inside it would) leaves the reason in
    ``failed`` and every call, that one included, runs eagerly with the eager result."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tries = []

    class Refusing:
        def __init__(self, graph):
            tries.append(graph)

        def __enter__(self):
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(LayerGraphs, "eligible", staticmethod(lambda q, config: True))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", Refusing)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    graphs = LayerGraphs()
    for seed in range(4):  # eager, failed capture (eager), then eager without trying again
        q, k, v = layer_inputs(seed, "cpu", n=200, dtype=torch.float32)
        same(graphs(q, k, v, CFG), pbs_prefill_attention(q, k, v, CFG))
    assert len(tries) == 1 and graphs.replays == 0
    assert graphs.failed == "CUDA error: operation not permitted when stream is capturing"
