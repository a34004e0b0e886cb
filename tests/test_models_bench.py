"""benchmarks/models_bench.py at toy sizes on the CPU: it runs end to end, every layer takes the path its
model's layer pattern calls for, the sliding-window layers keep exactly the blocks their window touches, and
the Markdown table names the versions and one row per model and length. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

from test_model_families import band_density

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "models_bench.py"


def load_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("models_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "models_bench", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_run_reports_every_model_with_its_layer_paths(tmp_path, capsys, monkeypatch):
    bench = load_script(monkeypatch)
    out = tmp_path / "records.json"
    assert bench.main(["--tiny", "--device", "cpu", "--lengths", "256", "--warmup", "1", "--iters", "1",
                       "--json", str(out)]) == 0
    table = capsys.readouterr().out
    saved = json.loads(out.read_text())
    records = {r["key"]: r for r in saved["records"]}
    assert sorted(records) == sorted(bench.MODELS)
    windows = {key: shape.tiny.get("sliding_window") for key, shape in bench.MODELS.items()}
    expected = {"qwen3-8b": [None, None], "mistral-7b": [windows["mistral-7b"]] * 2,
                "gemma-3-12b": [windows["gemma-3-12b"]] * 5 + [None]}
    for key, record in records.items():
        assert record["seq_len"] == 256
        block = record["config"]["block_size"]
        assert [layer["path"] for layer in record["layers"]] == ["pbs"] * len(expected[key]), key
        for layer, window in zip(record["layers"], expected[key]):
            if window is None:
                assert layer["reason"].startswith("causal prefill"), (key, layer)
            else:
                assert layer["reason"] == f"sliding window {window}", (key, layer)
                assert layer["density"] == band_density(256, window, block), (key, layer)
        assert record["pbs_ms"] > 0 and record["dense_ms"] and all(t > 0 for t in record["dense_ms"].values())
        assert record["best_dense"] == min(record["dense_ms"], key=record["dense_ms"].get)
        assert record["speedup"] == record["dense_ms"][record["best_dense"]] / record["pbs_ms"]
        # the windowless reference column: for the models with sliding windows only
        assert bool(record["window_ignored_ms"]) == any(w is not None for w in expected[key]), key
    assert f"torch {torch.__version__}" in table and saved["env"]["torch"] == torch.__version__
    rows = [line for line in table.splitlines() if line.startswith("| ") and "| 256 |" in line]
    assert sorted(row.split(" | ")[0][2:] for row in rows) == sorted(s.name for s in bench.MODELS.values())
