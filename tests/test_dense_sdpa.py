"""Dense attention on a named SDPA backend (pbs_cli.engine.dense_sdpa): same numbers as transformers' SDPA,
GQA by expansion or natively, and the fastest-backend pick.

Tolerance rule: err(pbs_dense fp32 vs fp64 model) <= 2 * err(SDPA fp32 vs fp64 model) + floor.
"""

from __future__ import annotations

import copy

import pytest
import torch

from pbs_cli.engine import dense_sdpa, integration
from pbs_kernels import PBSConfig

from test_integration import tiny_model

FLOOR = 1e-5


def logits(model, ids, attn: str, choice: dense_sdpa.DenseChoice | None):
    integration.set_attention(model, attn)
    with torch.no_grad(), integration.pbs_run(PBSConfig(), None, choice):
        return model(ids).logits


@pytest.mark.parametrize("mode", ["gqa", "expand"])
@pytest.mark.parametrize("strict", [True, False])
def test_named_backend_matches_transformers_sdpa(mode, strict):
    model = tiny_model(heads=4, kv_heads=2)
    ids = torch.randint(0, 300, (2, 45), generator=torch.Generator().manual_seed(1))
    oracle = logits(copy.deepcopy(model).double(), ids, "sdpa", None)
    sdpa = logits(model, ids, "sdpa", None)
    ours = logits(model, ids, integration.DENSE_NAME, dense_sdpa.DenseChoice("sdpa-math", mode, strict=strict))
    assert torch.isfinite(ours).all()
    bound = 2 * (sdpa.double() - oracle).abs().max().item() + FLOOR
    assert (ours.double() - oracle).abs().max().item() <= bound


def test_pbs_dense_fallback_uses_the_choice(monkeypatch):
    """Below dense_below the "pbs" implementation runs dense through the run's chosen backend."""
    seen = []
    real = dense_sdpa.attention_forward

    def spy(choice, *args, **kwargs):
        seen.append(choice)
        return real(choice, *args, **kwargs)

    monkeypatch.setattr(dense_sdpa, "attention_forward", spy)
    model = tiny_model(heads=2, kv_heads=1)
    ids = torch.randint(0, 300, (1, 20))
    choice = dense_sdpa.DenseChoice("sdpa-math", "gqa")
    integration.set_attention(model, integration.NAME)
    with torch.no_grad(), integration.pbs_run(PBSConfig(dense_below=1024), None, choice) as run:
        model(ids)
    assert seen == [choice, choice]  # one call per layer
    assert {s.path for s in run.recorder.prefill_layers()} == {"dense"}


def test_pick_fastest_is_none_off_cuda():
    calls = []
    assert dense_sdpa.pick_fastest(calls.append, torch.device("cpu"), torch.float32, 4, 2, 16) is None
    assert calls == []


def test_pick_fastest_takes_the_quickest_runnable(monkeypatch):
    """With the probe and the clock faked: short forwards are repeated and their minimum kept, a long one
    is timed once; the quickest backend wins; unrunnable ones are reported with their reason."""
    monkeypatch.setattr(dense_sdpa, "probe_sdpa", lambda name, *a: (None, "no kernel") if name == "sdpa-efficient"
                        else ("gqa" if name == "sdpa-flash" else "expand", None))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    durations = [0.030, 0.035, 0.028, 0.040, 0.031, 0.150]  # cudnn x5 (short: repeated), flash x1 (long)
    ticks = iter([t for d in durations for t in (0.0, d)])
    monkeypatch.setattr(dense_sdpa.time, "perf_counter", lambda: next(ticks))
    ran = []
    choice = dense_sdpa.pick_fastest(lambda c: ran.append((c.name, c.strict)), torch.device("cuda"),
                                     torch.bfloat16, 32, 8, 128)
    assert choice is not None and (choice.name, choice.mode, choice.strict) == ("sdpa-cudnn", "expand", False)
    assert choice.times_ms == pytest.approx({"sdpa-cudnn": 28.0, "sdpa-flash": 150.0})
    assert choice.skipped == {"sdpa-efficient": "no kernel"}
    assert ran == [("sdpa-cudnn", True)] * (1 + dense_sdpa.SHORT_REPEATS) + [("sdpa-flash", True)] * 2
