"""`pbs prefill` through Typer's CliRunner on a tiny random-weight Llama directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fixtures import TINY_CONTEXT, offline_env, tiny_model_dir  # noqa: F401  (pytest fixtures)
from pbs_cli import errors
from pbs_cli.app import app

SMALL = ["--block-size", "16", "--segment-size", "32", "--device", "cpu"]
TEXT = ("def parse(line):\n    key, _, value = line.partition('=')\n    return key.strip(), value.strip()\n\n" * 2)


@pytest.fixture()
def runner():
    return CliRunner()


@pytest.fixture()
def doc(tmp_path) -> Path:
    path = tmp_path / "doc.py"
    path.write_text(TEXT, encoding="utf-8")
    return path


def invoke(runner, *args, input=None):
    return runner.invoke(app, ["prefill", *map(str, args)], input=input)


def token_count(model_dir, text: str) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"])


def test_json_record_has_the_documented_keys(runner, offline_env, tiny_model_dir, doc):
    res = invoke(runner, doc, "--model", tiny_model_dir, *SMALL, "--threshold", "0.5", "--json")
    assert res.exit_code == 0, res.stderr
    rec = json.loads(res.stdout)
    for key in ("schema_version", "model", "device", "prompt_tokens", "prefill_ms", "density", "layers",
                "config", "env", "dtype", "tokens_per_s"):
        assert key in rec, key
    assert rec["prompt_tokens"] == token_count(tiny_model_dir, TEXT)
    assert rec["config"]["threshold"] == 0.5 and rec["config"]["block_size"] == 16
    assert rec["device"] == "cpu" and rec["dtype"] == "float32"
    assert [ly["layer"] for ly in rec["layers"]] == [0, 1]
    assert all(ly["path"] == "pbs" and 0 < ly["density"] < 1 for ly in rec["layers"])
    assert all(ly["kernel"] == "reference" for ly in rec["layers"])  # the PyTorch twin runs on a CPU
    assert rec["density"] == pytest.approx(sum(ly["density"] for ly in rec["layers"]) / 2)
    assert rec["model"]["kind"] == "directory"
    assert "model:" in res.stderr and "local directory" in res.stderr  # what --model resolved to
    assert "dense_prefill_ms" not in rec


def test_threshold_one_compare_dense_is_faithful(runner, offline_env, tiny_model_dir, doc):
    res = invoke(runner, doc, "--model", tiny_model_dir, *SMALL, "--threshold", "1.0", "--compare-dense", "--json")
    assert res.exit_code == 0, res.stderr
    rec = json.loads(res.stdout)
    assert rec["density"] == pytest.approx(1.0)
    assert rec["top1_agreement"] == 1.0
    assert rec["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    assert rec["speedup"] == pytest.approx(rec["dense_prefill_ms"] / rec["prefill_ms"])


def test_compare_dense_continuation_after_a_dense_equivalent_prefill(runner, offline_env, tiny_model_dir, doc):
    """Threshold 1.0: the continuation (default: the last eighth) equals dense; its dense perplexity is
    the one of a plain transformers forward over those targets."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = invoke(runner, doc, "--model", tiny_model_dir, *SMALL, "--threshold", "1.0", "--compare-dense", "--json")
    assert res.exit_code == 0, res.stderr
    rec = json.loads(res.stdout)
    c, n = rec["continuation"], rec["prompt_tokens"]
    assert (c["prefix_tokens"], c["tokens"]) == (n - n // 8, n // 8)
    assert c["top1_agreement"] == 1.0 and c["mean_kl"] < 1e-6 and c["ppl"] == pytest.approx(c["ppl_dense"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    ids = torch.tensor([AutoTokenizer.from_pretrained(tiny_model_dir)(TEXT)["input_ids"]])
    labels = ids.clone()
    labels[:, : n - n // 8] = -100
    with torch.no_grad():
        ppl = torch.exp(model(ids, labels=labels).loss).item()
    assert c["ppl_dense"] == pytest.approx(ppl, rel=1e-4)


def test_continuation_option_is_checked_and_shown(runner, offline_env, tiny_model_dir, doc):
    res = invoke(runner, doc, "--model", tiny_model_dir, *SMALL, "--threshold", "0.3", "--compare-dense",
                 "--continuation", "20")
    assert res.exit_code == 0, res.stderr
    assert "continued" in res.stdout and "last 20 tokens" in res.stdout
    off = invoke(runner, doc, "--model", tiny_model_dir, *SMALL, "--compare-dense", "--continuation", "0", "--json")
    assert off.exit_code == 0 and "continuation" not in json.loads(off.stdout)
    alone = invoke(runner, doc, "--model", tiny_model_dir, *SMALL, "--continuation", "20")
    assert alone.exit_code == 2 and "--compare-dense" in alone.stderr
    n = token_count(tiny_model_dir, TEXT)
    long = invoke(runner, doc, "--model", tiny_model_dir, *SMALL, "--compare-dense", "--continuation", n)
    assert long.exit_code == 2 and "--continuation" in long.stderr and f"choose 1 to {n - 1}" in long.stderr


def test_compare_dense_alternates_the_timed_passes(runner, offline_env, tiny_model_dir, doc, monkeypatch):
    """PBS and dense forwards are timed in alternation, the order reversed every other round (drift in
    clocks or load, and what a pass leaves behind for the next, reach both alike)."""
    from pbs_cli.engine import integration

    seen = []
    real = integration.set_attention
    monkeypatch.setattr(integration, "set_attention", lambda model, name: seen.append(name) or real(model, name))
    res = invoke(runner, doc, "--model", tiny_model_dir, *SMALL, "--compare-dense", "--warmup", "1", "--iters", "2",
                 "--json")
    assert res.exit_code == 0, res.stderr
    pbs, dense = integration.NAME, integration.DENSE_NAME
    rounds = [pbs, dense, dense, pbs, pbs, dense]  # warm-up round, then the two timed rounds
    assert any(seen[i : i + 6] == rounds for i in range(len(seen))), seen
    rec = json.loads(res.stdout)
    assert len(rec["prefill_ms_all"]) == len(rec["dense_prefill_ms_all"]) == 2


def test_sparse_compare_dense_reports_fidelity(runner, offline_env, tiny_model_dir, doc):
    res = invoke(runner, doc, "--model", tiny_model_dir, *SMALL, "--threshold", "0.3", "--compare-dense", "--json")
    rec = json.loads(res.stdout)
    assert 0.0 <= rec["top1_agreement"] <= 1.0 and rec["mean_kl"] > 0.0
    assert rec["density"] < 1.0


def test_compile_times_compiled_forwards_with_the_same_plans(runner, offline_env, tiny_model_dir, doc, monkeypatch):
    """--compile: the layers run compiled (backend swapped for Dynamo's fast "aot_eager" here), the warm-up
    is forced on, and the plans, fidelity and record match the eager run's."""
    from pbs_cli.engine import compiling

    calls = []
    real = compiling.compiled_layers
    monkeypatch.setattr(compiling, "DEFAULT_BACKEND", "aot_eager")
    monkeypatch.setattr(compiling, "compiled_layers", lambda m, on, **kw: calls.append(on) or real(m, on, **kw))
    args = [doc, "--model", tiny_model_dir, *SMALL, "--threshold", "0.5", "--compare-dense", "--json"]
    eager = json.loads(invoke(runner, *args).stdout)
    res = invoke(runner, *args, "--compile")
    assert res.exit_code == 0, res.stderr
    rec = json.loads(res.stdout)
    assert calls == [False, True] and rec["compiled"] is True and eager["compiled"] is False
    assert rec["warmup"] == 1  # the CPU default is 0, but the first forward compiles
    assert rec["density"] == eager["density"] and [ly["path"] for ly in rec["layers"]] == ["pbs"] * len(rec["layers"])
    assert rec["top1_agreement"] == pytest.approx(eager["top1_agreement"])
    assert rec["mean_kl"] == pytest.approx(eager["mean_kl"], rel=1e-3, abs=1e-6)
    bad = invoke(runner, *args, "--compile", "--warmup", "0")
    assert bad.exit_code == errors.USAGE and "--warmup" in bad.stderr


def test_table_names_the_graph_replays_when_there_were_any(runner, offline_env, tiny_model_dir, doc, capsys):
    """On a CPU nothing is replayed (no row); a record with replays (as on CUDA) gets the row."""
    from pbs_cli.render import prefill

    res = invoke(runner, doc, "--model", tiny_model_dir, *SMALL, "--json")
    rec = json.loads(res.stdout)
    assert rec["cuda_graph_layers"] == 0
    prefill.print_summary(rec)
    assert "CUDA graphs" not in capsys.readouterr().out
    prefill.print_summary({**rec, "cuda_graph_layers": 29})
    assert "29 sparse layers replayed" in capsys.readouterr().out
    # a long prompt on the Triton kernel replays nothing by design: the row says why
    triton_layers = [{**ly, "kernel": "triton/persistent in place"} if ly.get("kernel") else ly for ly in rec["layers"]]
    prefill.print_summary({**rec, "layers": triton_layers, "prompt_tokens": 131072})
    words = " ".join(capsys.readouterr().out.replace("│", " ").split())  # the table wraps long cells
    assert "CUDA graphs none: layers of 65,536 tokens or more" in words and "PBS_CUDA_GRAPHS=1 captures" in words


def test_table_output_and_saved_record(runner, offline_env, tiny_model_dir, doc, tmp_path):
    target = tmp_path / "run.json"
    res = invoke(runner, doc, "--model", tiny_model_dir, *SMALL, "-o", target)
    assert res.exit_code == 0, res.stderr
    for label in ("prompt tokens", "prefill time", "tokens/s", "density", "block 16, segment 32"):
        assert label in res.stdout
    assert "attention kernel" in res.stdout and "reference (sparse layers)" in res.stdout
    saved = json.loads(target.read_text())
    assert saved["prompt_tokens"] == token_count(tiny_model_dir, TEXT)
    # refuses to overwrite without --force, keeps the file
    before = target.read_text()
    res = invoke(runner, doc, "--model", tiny_model_dir, *SMALL, "-o", target)
    assert res.exit_code == errors.USAGE and "--force" in res.stderr
    assert target.read_text() == before
    res = invoke(runner, doc, "--model", tiny_model_dir, *SMALL, "-o", target, "--force", "--threshold", "0.7")
    assert res.exit_code == 0 and json.loads(target.read_text())["config"]["threshold"] == 0.7


def test_trace_saves_one_forward_and_names_the_top_ops(runner, offline_env, tiny_model_dir, doc, tmp_path):
    target = tmp_path / "prefill.trace.json"
    res = invoke(runner, doc, "--model", tiny_model_dir, *SMALL, "--trace", target, "--json")
    assert res.exit_code == 0, res.stderr
    events = json.loads(target.read_text())["traceEvents"]
    names = [e.get("name", "") for e in events]
    assert names.count("pbs.attention") == 2  # one range per layer of the tiny model, one forward
    rec = json.loads(res.stdout)
    assert rec["trace"]["path"] == str(target) and rec["trace"]["device_time"] is False
    top = rec["trace"]["top_ops"]
    assert top and all(a["ms"] >= b["ms"] for a, b in zip(top, top[1:])) and 0 < sum(o["share"] for o in top) <= 1.0001
    assert f"saved {target}" in res.stderr.replace("\n", "")
    # the trace file is an output like -o: refused without --force, and --trace with --tp is refused
    res = invoke(runner, doc, "--model", tiny_model_dir, *SMALL, "--trace", target)
    assert res.exit_code == errors.USAGE and "--force" in res.stderr
    res = invoke(runner, doc, "--model", tiny_model_dir, *SMALL, "--trace", tmp_path / "t.json", "--tp", "2")
    assert res.exit_code == errors.USAGE and "--tp" in res.stderr


def test_prompt_below_dense_below_runs_the_dense_forward(runner, offline_env, tiny_model_dir, doc, monkeypatch):
    """Below the preset's break-even the whole forward runs on "pbs_dense" (no per-layer dispatch
    through "pbs", so it costs what dense costs), and the record still says why, layer by layer."""
    from pbs_cli.engine import integration

    presets = offline_env / "pbs-config"
    presets.mkdir(exist_ok=True)
    (presets / "short.toml").write_text('description = "dense below 100000"\n\n[pbs]\nblock_size = 16\n'
                                        'segment_size = 32\nthreshold = 0.5\ndense_below = 100000\n')

    def no_dispatch(*args, **kwargs):
        raise AssertionError("the per-layer pbs dispatch ran below dense_below")

    monkeypatch.setattr(integration, "pbs_attention_forward", no_dispatch)
    integration._registered = False  # re-register the patched function
    try:
        res = invoke(runner, doc, "--model", tiny_model_dir, "--device", "cpu", "--profile", "short",
                     "--compare-dense", "--json")
    finally:
        monkeypatch.undo()
        integration._registered = False
        integration.register()
    assert res.exit_code == 0, res.stderr
    rec = json.loads(res.stdout)
    n = rec["prompt_tokens"]
    assert [(ly["path"], ly["reason"]) for ly in rec["layers"]] == [("dense", f"seq_len {n} < dense_below 100000")] * 2
    assert rec["density"] == 1.0 and rec["top1_agreement"] == 1.0 and rec["mean_kl"] == pytest.approx(0.0, abs=1e-9)


def test_stdin_document(runner, offline_env, tiny_model_dir):
    res = invoke(runner, "-", "--model", tiny_model_dir, *SMALL, "--json", input=TEXT)
    assert res.exit_code == 0, res.stderr
    rec = json.loads(res.stdout)
    assert rec["document"] == "<stdin>" and rec["prompt_tokens"] == token_count(tiny_model_dir, TEXT)


def test_generation_after_prefill_decodes_dense(runner, offline_env, tiny_model_dir, doc):
    res = invoke(runner, doc, "--model", tiny_model_dir, *SMALL, "--max-new-tokens", "4", "--json")
    assert res.exit_code == 0, res.stderr
    gen = json.loads(res.stdout)["generation"]
    assert 1 <= len(gen["token_ids"]) <= 4
    # greedy tokens equal those of transformers' own generate with SDPA
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    # threshold default 0.9 changes the prefill, so compare with a dense-equivalent run
    res = invoke(runner, doc, "--model", tiny_model_dir, *SMALL, "--threshold", "1.0", "--max-new-tokens", "4", "--json")
    gen = json.loads(res.stdout)["generation"]["token_ids"]
    assert gen == ref[0, ids.shape[1]:].tolist()[: len(gen)]


def test_truncate_keeps_the_first_tokens(runner, offline_env, tiny_model_dir, tmp_path):
    long_doc = tmp_path / "long.txt"
    long_doc.write_text(TEXT * 8, encoding="utf-8")
    total = token_count(tiny_model_dir, TEXT * 8)
    assert total > TINY_CONTEXT
    res = invoke(runner, long_doc, "--model", tiny_model_dir, *SMALL)
    assert res.exit_code == errors.USAGE
    assert f"{total} tokens" in res.stderr and str(TINY_CONTEXT) in res.stderr and "--truncate" in res.stderr
    res = invoke(runner, long_doc, "--model", tiny_model_dir, *SMALL, "--truncate", "--json")
    rec = json.loads(res.stdout)
    assert rec["prompt_tokens"] == TINY_CONTEXT and rec["document_tokens"] == total and rec["truncated"]


def _bad_inputs(tmp_path: Path, good: Path, model_dir: Path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "bin.dat").write_bytes(b"abc\x00def")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "existing.json").write_text("{}")
    (tmp_path / "long.txt").write_text(TEXT * 8)
    m = ["--model", str(model_dir), *SMALL]
    return {
        "missing file": ([str(tmp_path / "nope.txt"), *m], "does not exist"),
        "directory": ([str(tmp_path), *m], "is a directory"),
        "empty file": ([str(tmp_path / "empty.txt"), *m], "is empty"),
        "binary file": ([str(tmp_path / "bin.dat"), *m], "binary"),
        "non-UTF-8": ([str(tmp_path / "latin1.txt"), *m], "not UTF-8"),
        "too long": ([str(tmp_path / "long.txt"), *m], "--truncate"),
        "unknown alias": ([str(good), "--model", "no-such-model"], "unknown model or alias"),
        "missing model dir": ([str(good), "--model", str(tmp_path / "nodir/"), *SMALL], "does not exist"),
        "threshold zero": ([str(good), *m, "--threshold", "0"], "threshold"),
        "threshold above one": ([str(good), *m, "--threshold", "1.5"], "threshold"),
        "segment not multiple": ([str(good), "--model", str(model_dir), "--block-size", "16", "--segment-size", "40"],
                                 "multiple"),
        "unknown profile": ([str(good), *m, "--profile", "nope"], "unknown profile"),
        "bad dtype": ([str(good), *m, "--dtype", "int8"], "--dtype"),
        "bad device": ([str(good), *m, "--device", "tpu"], "--device"),
        "output in missing dir": ([str(good), *m, "-o", str(tmp_path / "no" / "out.json")], "does not exist"),
        "existing output": ([str(good), *m, "-o", str(tmp_path / "existing.json")], "--force"),
    }


@pytest.mark.parametrize("case", ["missing file", "directory", "empty file", "binary file", "non-UTF-8",
                                  "too long", "unknown alias", "missing model dir", "threshold zero",
                                  "threshold above one", "segment not multiple", "unknown profile", "bad dtype",
                                  "bad device", "output in missing dir", "existing output"])
def test_bad_input_is_one_clear_line_and_writes_nothing(runner, offline_env, tiny_model_dir, doc, tmp_path, case):
    work = tmp_path / "work"
    work.mkdir()
    args, needle = _bad_inputs(work, doc, tiny_model_dir)[case]
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    target = [] if "-o" in args else ["-o", str(work / "result.json")]
    res = invoke(runner, *args, *target)
    assert res.exit_code == errors.USAGE, (res.exit_code, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    after = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    assert after == before  # nothing written or overwritten


def test_max_tokens_and_beyond_context_for_length_sweeps(runner, offline_env, tiny_model_dir, tmp_path):
    long_doc = tmp_path / "long.txt"
    long_doc.write_text(TEXT * 8, encoding="utf-8")
    total = token_count(tiny_model_dir, TEXT * 8)
    res = invoke(runner, long_doc, "--model", tiny_model_dir, *SMALL, "--max-tokens", "100", "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["prompt_tokens"] == 100 and not json.loads(res.stdout)["beyond_context"]
    assert "trained positions" not in res.stderr
    res = invoke(runner, long_doc, "--model", tiny_model_dir, *SMALL, "--beyond-context", "--json")
    assert res.exit_code == 0, res.stderr
    rec = json.loads(res.stdout)
    assert rec["prompt_tokens"] == total > TINY_CONTEXT and not rec["truncated"] and rec["beyond_context"]
    assert f"exceed the model's {TINY_CONTEXT} trained positions" in res.stderr
    res = invoke(runner, long_doc, "--model", tiny_model_dir, *SMALL, "--max-tokens", "12q")
    assert res.exit_code == errors.USAGE and "12q" in res.stderr


def test_rope_scaling_stretches_the_loaded_model_past_its_context(runner, offline_env, tiny_model_dir, tmp_path,
                                                                  monkeypatch):
    from pbs_cli.engine import models

    long_doc = tmp_path / "long.txt"
    long_doc.write_text(TEXT * 8, encoding="utf-8")
    loaded = []
    real = models.ModelSource.load
    monkeypatch.setattr(models.ModelSource, "load", lambda self, *a, **kw: loaded.append(real(self, *a, **kw)) or loaded[-1])
    res = invoke(runner, long_doc, "--model", tiny_model_dir, *SMALL, "--beyond-context", "--rope-scaling", "yarn",
                 "--json")
    assert res.exit_code == 0, res.stderr
    rec = json.loads(res.stdout)
    rope = rec["rope_scaling"]
    assert rope["rope_type"] == "yarn" and rope["original_max_position_embeddings"] == TINY_CONTEXT
    assert rope["factor"] == pytest.approx(rec["prompt_tokens"] / TINY_CONTEXT) and rope["factor"] > 1
    model = loaded[-1].model
    assert model.config.rope_parameters["rope_type"] == "yarn"
    plain = type(model.model.rotary_emb)(models.ModelSource(models.resolve_model(str(tiny_model_dir))).config())
    assert not torch.allclose(model.model.rotary_emb.inv_freq.cpu(), plain.inv_freq)  # the frequencies moved
    short = invoke(runner, long_doc, "--model", tiny_model_dir, *SMALL, "--max-tokens", "100", "--beyond-context",
                   "--rope-scaling", "yarn", "--json")
    assert short.exit_code == 0 and json.loads(short.stdout)["rope_scaling"] is None  # fits: nothing to stretch
    for bad in (["--rope-scaling", "yarn"], ["--beyond-context", "--rope-scaling", "ntk"]):
        res = invoke(runner, long_doc, "--model", tiny_model_dir, *SMALL, *bad)
        assert res.exit_code == errors.USAGE and "--rope-scaling" in res.stderr, res.stderr


def test_speedup_caveat_names_identical_forwards_and_overlapping_spreads():
    """The speedup row says when both passes ran the same dense forward, or when the two sets of
    times overlap (the speedup is then within their run-to-run spread), and nothing otherwise."""
    from pbs_cli.render.prefill import speedup_caveat

    def rec(sparse, pbs, dense):
        return {"layer_summary": {"sparse_layers": sparse, "dense_layers": 30 - sparse},
                "prefill_ms_all": pbs, "dense_prefill_ms_all": dense}

    assert "same dense forward" in speedup_caveat(rec(0, [23.0, 22.0, 22.7], [22.1, 21.3, 21.6]))
    assert "spread" in speedup_caveat(rec(30, [50.0, 53.0], [52.0, 55.0]))
    assert speedup_caveat(rec(30, [484.0, 483.6, 483.5], [1416.5, 1410.0, 1420.0])) == ""
    assert speedup_caveat(rec(30, [50.0], [52.0])) == ""  # one run each: no spread to compare
