"""`pbs eval` and `pbs calibrate` end to end on a tiny random-weight Llama (fast, CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from fixtures import assert_clean_outcome, invoke, tiny_model_dir  # noqa: F401

from pbs_cli.engine import fidelity as F
from pbs_cli.engine import presets
from pbs_kernels import PBSConfig

SMALL_TOML = "[pbs]\nblock_size = 16\nsegment_size = 32\nthreshold = 0.9\n"
SAMPLED_TOML = SMALL_TOML + 'score = "sampled"\nsample_rows = 4\nthreshold_scope = "total"\nrow_top = 1\n'


@pytest.fixture()
def env(tmp_path, monkeypatch):
    """Private config dir holding two small presets, and a real-text document (stdlib source)."""
    import argparse
    import inspect

    cfg = tmp_path / "pbs-config"
    cfg.mkdir()
    (cfg / "small.toml").write_text(SMALL_TOML)
    (cfg / "sampled.toml").write_text(SAMPLED_TOML)
    monkeypatch.setenv("PBS_CONFIG_DIR", str(cfg))
    monkeypatch.setenv("PBS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    doc = tmp_path / "doc.py"
    doc.write_text(Path(inspect.getsourcefile(argparse)).read_text()[:6000])
    return tmp_path, doc


def dense_perplexity(model_dir: Path, doc: Path, last: int | None = None) -> float:
    """Independent: plain transformers SDPA forward and cross-entropy over the first 256 tokens (or
    of the ``last`` of them only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    ids = torch.tensor([tok(doc.read_text())["input_ids"][:256]])
    labels = ids.clone()
    if last is not None:
        labels[:, : 256 - last] = -100  # ignored: only the last tokens are targets
    with torch.no_grad():
        loss = model(ids, labels=labels).loss
    return math.exp(loss.item())


def test_eval_sweep_json_png_and_dense_reference(env, tiny_model_dir):  # noqa: F811
    tmp, doc = env
    png = tmp / "pareto.png"
    res = invoke(["eval", str(doc), "--model", str(tiny_model_dir), "--profile", "sampled", "--thresholds",
                  "0.6,1.0", "--json", "--png", str(png), "--recall-rows", "16"])
    assert_clean_outcome(res, {0})
    rec = json.loads(res.stdout)
    assert rec["command"] == "eval" and rec["prompt_tokens"] == 256 and rec["thresholds"] == [0.6, 1.0]
    rows = rec["results"]
    assert [r["strategy"] for r in rows[:3]] == ["pbs (sampled)", "no-permutation (sampled)", "published PBS-Attn"]
    assert rec["dense"]["ppl"] == pytest.approx(dense_perplexity(tiny_model_dir, doc), rel=1e-4)
    for r in rows:
        assert r["ppl_dense"] == pytest.approx(rec["dense"]["ppl"])
        assert len(r["layers"]) == 2 and 0 < r["density"] <= 1 and 0 <= r["recall"] <= 1 + 1e-6
        if r["threshold"] == 1.0:  # dense plan: the same model output
            assert r["density"] == 1.0 and r["top1_agreement"] == 1.0 and r["mean_kl"] < 1e-6
        # prefill-then-continue over the last eighth: a dense prefill and its continuation give the
        # perplexity of a plain forward over those 32 targets
        c = r["continuation"]
        assert (c["prefix_tokens"], c["tokens"], rec["continuation_tokens"]) == (224, 32, 32)
        assert c["ppl_dense"] == pytest.approx(dense_perplexity(tiny_model_dir, doc, last=32), rel=1e-4)
        if r["threshold"] == 1.0:
            assert c["top1_agreement"] == 1.0 and c["mean_kl"] < 1e-6 and c["ppl"] == pytest.approx(c["ppl_dense"])
    sparse = [r for r in rows if r["threshold"] == 0.6 and r["strategy"].startswith("pbs")][0]
    assert sparse["density"] < 1.0 and sparse["mean_kl"] > 0 and sparse["config"]["score"] == "sampled"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(rec["pareto"]) == len(rows)


def test_eval_table_and_output_file(env, tiny_model_dir):  # noqa: F811
    tmp, doc = env
    out = tmp / "eval.json"
    res = invoke(["eval", str(doc), "--model", str(tiny_model_dir), "--profile", "small", "-o", str(out),
                  "--max-tokens", "200", "--per-layer"])
    assert_clean_outcome(res, {0})
    assert "pbs eval" in res.stdout and "published PBS-Attn" in res.stdout and "dense SDPA" in res.stdout
    rec = json.loads(out.read_text())
    assert rec["prompt_tokens"] == 200 and len(rec["results"]) == 3
    assert rec["results"][0]["continuation"]["tokens"] == 25 and "continued top-1" in res.stdout
    assert res.stdout.count(": per layer") == 3  # one per-layer table per strategy
    first = rec["results"][0]["layers"][0]
    assert f"{first['density']:.1%}" in res.stdout and f"{first['recall']:.4f}" in res.stdout
    again = invoke(["eval", str(doc), "--model", str(tiny_model_dir), "-o", str(out)])
    assert_clean_outcome(again, {2})
    assert "--force" in again.stderr


@pytest.mark.parametrize("args,needle", [
    (["--thresholds", "0.5,abc"], "--thresholds"),
    (["--thresholds", "1.5"], "--thresholds"),
    (["--passkey", "--lengths", "4k"], "exceed"),
    (["--passkey", "--depths", "2"], "--depths"),
    (["--max-tokens", "200", "--continuation", "200"], "--continuation"),
])
def test_eval_usage_errors(env, tiny_model_dir, args, needle):  # noqa: F811
    _, doc = env
    res = invoke(["eval", str(doc), "--model", str(tiny_model_dir), "--profile", "small", *args])
    assert_clean_outcome(res, {2})
    assert needle in res.stderr


def test_eval_passkey_reports_both_accuracies(env, tiny_model_dir):  # noqa: F811
    _, doc = env
    res = invoke(["eval", str(doc), "--model", str(tiny_model_dir), "--profile", "small", "--passkey",
                  "--lengths", "200,256", "--depths", "0,1", "--trials", "2", "--json"])
    assert_clean_outcome(res, {0})
    rec = json.loads(res.stdout)
    assert rec["mode"] == "passkey" and [(c["length"], c["depth"]) for c in rec["passkey"]] == [
        (200, 0.0), (200, 1.0), (256, 0.0), (256, 1.0)]
    for cell in rec["passkey"]:
        assert len(cell["answers"]) == 2
        for name in ("dense", "pbs"):  # accuracy is the share of answers whose first number is the key
            hits = sum(F.passkey_found(a[name], a["key"]) for a in cell["answers"])
            assert cell[f"{name}_accuracy"] == hits / 2


def test_calibrate_recall_writes_the_sparsest_passing_preset(env, tiny_model_dir):  # noqa: F811
    tmp, doc = env
    res = invoke(["calibrate", "--doc", str(doc), "--model", str(tiny_model_dir), "--profile", "small",
                  "--target-recall", "0.9", "--name", "cal", "--block-sizes", "16,32", "--json"])
    assert_clean_outcome(res, {0})
    rec = json.loads(res.stdout)
    prof = presets.get_profile("cal")
    cfg = prof.config()
    assert Path(rec["profile_path"]) == tmp / "pbs-config" / "cal.toml"
    assert prof.extra["calibration"]["target"] == "recall" and cfg.block_size in (16, 32)
    # independent re-measurement of the written preset on the same tokens
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([tok(doc.read_text())["input_ids"][:256]])
    stats = F.plan_stats(F.capture_qk(model, ids)[1], cfg, rows=64)
    assert stats["recall"] >= 0.9 and stats["density"] == pytest.approx(rec["best"]["density"])
    # sparsest: every tried setting that was sparser missed the target
    assert all(not t["meets"] for t in rec["tried"] if t["density"] < rec["best"]["density"])
    # the preset is usable by name
    used = invoke(["eval", str(doc), "--model", str(tiny_model_dir), "--profile", "cal", "--json",
                   "--recall-rows", "0"])
    assert_clean_outcome(used, {0})
    assert PBSConfig.from_dict(json.loads(used.stdout)["config"]) == cfg


def test_calibrate_kl_target_and_errors(env, tiny_model_dir):  # noqa: F811
    _, doc = env
    base = ["calibrate", "--doc", str(doc), "--model", str(tiny_model_dir), "--profile", "small",
            "--block-sizes", "16"]
    res = invoke(base + ["--target-kl", "0.001", "--name", "calkl", "--json", "--max-tokens", "160"])
    assert_clean_outcome(res, {0})
    rec = json.loads(res.stdout)
    assert rec["best"]["mean_kl"] <= 0.001 and rec["prompt_tokens"] == 160
    assert presets.get_profile("calkl").config().threshold == rec["best"]["threshold"]
    for args, needle in ((["--name", "x"], "exactly one"),
                         (["--name", "x", "--target-recall", "0.9", "--target-kl", "0.1"], "exactly one"),
                         (["--name", "x", "--target-recall", "1.5"], "--target-recall"),
                         (["--name", "calkl", "--target-kl", "0.1"], "--force")):
        bad = invoke(base + args)
        assert_clean_outcome(bad, {2})
        assert needle in bad.stderr
