"""`pbs profile` on CPU: records, numbers checked against independent computations, every output format
parsed back (HTML in a real headless browser), bad inputs, interrupted sweeps, captured Q/K/V."""

from __future__ import annotations

import csv
import gzip
import inspect
import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fixtures import assert_clean_outcome, invoke, offline_env, parse_jsonl, tiny_model_dir  # noqa: F401
from pbs_cli.engine import report_files
from pbs_cli.render import report_formats
from pbs_cli.engine.profile_records import BACKENDS, DENSE_BACKENDS, RESULT_FIELDS, causal_flops
from pbs_cli.engine.profiling import Case, Profiler, Settings, flex_block_mask, recall_stats, rel_l2, sample_rows
from pbs_cli.engine.workloads import captured_qkv, synthetic_qkv
from pbs_kernels import PBSConfig, reference

SHAPE = ["--heads", "4", "--kv-heads", "2", "--head-dim", "64"]
# --device cpu: these tests check the CPU path, also on a machine with a GPU (where "auto" picks CUDA)
FAST = ["--budget", "0", "--iters", "1", "--warmup", "1", "--recall-rows", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One CPU sweep at 1K and 2K: JSON on stdout, JSONL and HTML files, a Chrome trace."""
    d = tmp_path_factory.mktemp("profile")
    paths = {"jsonl": d / "run.jsonl", "html": d / "run.html", "trace": d / "trace.json.gz"}
    result = invoke(["profile", "--seq-len", "1k,2k", *SHAPE, *FAST, "--json", "-o", str(paths["jsonl"]),
                     "--html", str(paths["html"]), "--trace", str(paths["trace"])])
    assert_clean_outcome(result, {0})
    return json.loads(result.stdout), paths, d


def _rec(doc, n, backend):
    (rec,) = [r for r in doc["results"] if r["seq_len"] == n and r["backend"] == backend]
    return rec


def test_cpu_sweep_lists_dense_and_pbs_with_density_speedup_recall(sweep):
    doc, _, _ = sweep
    assert doc["command"] == "profile" and doc["seq_lens"] == [1024, 2048]
    assert doc["shape"]["heads"] == 4 and doc["shape"]["kv_heads"] == 2 and doc["shape"]["head_dim"] == 64
    assert {r["backend"] for r in doc["results"]} == set(BACKENDS)
    for n in (1024, 2048):
        pbs, math_ = _rec(doc, n, "pbs"), _rec(doc, n, "sdpa-math")
        assert pbs["status"] == "ok" and math_["status"] == "ok"
        assert 0 < pbs["density"] < 1 and math_["density"] == 1.0
        assert 0 <= pbs["recall_min"] <= pbs["recall_mean"] <= 1 and pbs["recall_mean"] > 0.8
        assert pbs["rel_l2_error"] is not None and 0 <= pbs["rel_l2_error"] < 1
        best = min((r for r in doc["results"] if r["seq_len"] == n and r["backend"] in DENSE_BACKENDS
                    and r["status"] == "ok"), key=lambda r: r["median_ms"])
        assert pbs["best_dense"] == best["backend"] == doc["summary"]["best_dense"][str(n)]
        assert pbs["speedup"] == pytest.approx(best["median_ms"] / pbs["median_ms"])
        assert pbs["attend_speedup"] == pytest.approx(best["median_ms"] / pbs["attend_ms"])
        assert math_["attend_speedup"] is None
        assert pbs["plan_share"] == pytest.approx((pbs["permute_ms"] + pbs["select_ms"]) / best["median_ms"])
        assert math_["plan_share"] is None
        flops = 2 * n * n * 64 * 4  # 2 N^2 D H_q B
        assert pbs["tflops"] == pytest.approx(flops / (pbs["median_ms"] * 1e9))
        assert pbs["tflops_computed"] == pytest.approx(pbs["density"] * flops / (pbs["attend_ms"] * 1e9))
        assert pbs["q25_ms"] <= pbs["median_ms"] <= pbs["q75_ms"] and pbs["min_ms"] <= pbs["max_ms"]
        for phase in ("permute_ms", "select_ms", "attend_ms"):
            assert pbs[phase] > 0
        # CUDA-only backends are reported, with the reason
        for name in ("sdpa-cudnn", "sdpa-efficient", "flex"):
            rec = _rec(doc, n, name)
            assert rec["status"] == "skipped" and "CUDA" in rec["reason"]
        # on CPU pbs already is the reference path: not timed twice unless named
        assert _rec(doc, n, "reference")["status"] == "skipped" and "same" in _rec(doc, n, "reference")["reason"]
    assert "pbs" in doc["summary"]["break_even"]
    # the attention implementation that ran: the PyTorch reference on CPU, said once under the table
    assert {_rec(doc, n, "pbs")["kernel"] for n in (1024, 2048)} == {"reference"}
    assert "pbs attention kernel: reference" in report_formats.summary_lines(doc)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton interpreter cannot take over once a CUDA driver is active")
def test_kernel_field_names_the_triton_read_mode(monkeypatch):
    """With the Triton path (here: forced onto CPU tensors in the interpreter) the pbs record names the
    read mode that ran: the "auto" rule's choice, or PBS_PERM_MODE's."""
    monkeypatch.setenv("PBS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = synthetic_qkv(1, 4, 2, 512, 64, seed=3, dtype=torch.float16)
    s = Settings(config=PBSConfig(threshold=0.8, block_size=64, segment_size=128), backends=("pbs",),
                 iters=1, budget_s=0, recall_rows=8)
    (rec,) = Profiler(s).run(Case(q, k, v))
    assert rec["status"] == "ok" and rec["kernel"] == "triton/remap"  # the interpreter's "auto"
    monkeypatch.setenv("PBS_PERM_MODE", "gather")
    (rec,) = Profiler(s).run(Case(q, k, v))
    assert rec["status"] == "ok" and rec["kernel"] == "triton/gather"


def test_density_and_recall_match_an_independent_plan(sweep):
    """Rebuild the same workload and plan with the reference; the record's density must match, and the
    recall must match a direct softmax over the same sampled rows."""
    doc, _, _ = sweep
    n = 1024
    q, k, v = synthetic_qkv(1, 4, 2, n, 64, seed=0)
    plan = reference.build_plan(q, k, PBSConfig(**doc["pbs"]))
    assert _rec(doc, n, "pbs")["density"] == pytest.approx(plan.density())
    rows = sample_rows(n, 8, 0, torch.device("cpu"))
    # direct recall: softmax over all causal keys, summed over the original keys that the plan keeps
    dense = plan.to_dense()
    s = (q[:, :, rows] @ k.repeat_interleave(2, 1).transpose(-1, -2)) / 8.0
    s = s.masked_fill(torch.arange(n)[None, :] > rows[:, None], float("-inf")).softmax(-1)
    bs, per_seg = doc["pbs"]["block_size"], doc["pbs"]["segment_size"] // doc["pbs"]["block_size"]
    total = []
    for h in range(4):
        for ri, r in enumerate(rows.tolist()):
            i = r // bs
            seg_start = (i // per_seg) * per_seg
            keys = set()
            for j in dense[0, h, i].nonzero().flatten().tolist():
                slots = range(j * bs, min(n, (j + 1) * bs))
                keys |= set(slots) if j >= seg_start else {int(plan.perm[0, h // 2, t]) for t in slots}
            total.append(float(s[0, h, ri, sorted(keys)].sum()))
    rec = _rec(doc, n, "pbs")
    assert rec["recall_mean"] == pytest.approx(sum(total) / len(total), abs=1e-5)
    assert rec["recall_min"] == pytest.approx(min(total), abs=1e-5)


def test_every_output_format_parses_back(sweep, tmp_path):
    doc, paths, _ = sweep
    # JSONL: header + one line per result, same records as the JSON document
    lines = parse_jsonl(paths["jsonl"])
    assert lines[0]["record"] == "header" and lines[0]["command"] == "profile"
    got = [{k: v for k, v in line.items() if k not in ("record", "run")} for line in lines[1:]]
    assert got == doc["results"]
    assert report_files.load(paths["jsonl"])["results"] == doc["results"]
    # -o with each extension
    for ext in ("json", "csv", "md"):
        target = tmp_path / f"out.{ext}"
        result = invoke(["report", "show", str(paths["jsonl"]), "--format",
                         {"json": "json", "csv": "csv", "md": "markdown"}[ext]])
        assert_clean_outcome(result, {0})
        target.write_text(result.stdout)
    assert json.loads((tmp_path / "out.json").read_text())["results"] == doc["results"]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out.csv").read_text())))
    assert [r["backend"] for r in rows] == [r["backend"] for r in doc["results"]]
    assert list(rows[0]) == list(RESULT_FIELDS)
    for row, rec in zip(rows, doc["results"]):
        assert int(row["seq_len"]) == rec["seq_len"]
        if rec["median_ms"] is not None:
            assert float(row["median_ms"]) == pytest.approx(rec["median_ms"])
    md = report_formats.parse_markdown_table((tmp_path / "out.md").read_text())
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    assert [(m["N"], m["backend"]) for m in md] == [(f"{r['seq_len'] // 1024}K", r["backend"]) for r in ok]
    pbs_row = next(m for m in md if m["backend"] == "pbs")
    assert pbs_row["density"] == f"{_rec(doc, 1024, 'pbs')['density']:.1%}"


def test_output_extension_picks_the_format(tmp_path):
    for ext, check in (("csv", lambda t: list(csv.DictReader(io.StringIO(t)))[0]["backend"] == "sdpa-math"),
                       ("md", lambda t: report_formats.parse_markdown_table(t)[0]["backend"] == "sdpa-math"),
                       ("json", lambda t: json.loads(t)["results"][0]["backend"] == "sdpa-math")):
        target = tmp_path / f"r.{ext}"
        result = invoke(["profile", "--seq-len", "256", *SHAPE, *FAST, "--backends", "sdpa-math", "-o", str(target)])
        assert_clean_outcome(result, {0})
        assert check(target.read_text()), ext
        assert "sdpa-math" in result.stdout  # the table still goes to stdout


def test_named_reference_runs_and_jsonl_streams_to_stdout():
    result = invoke(["profile", "--seq-len", "512", *SHAPE, *FAST, "--backends", "reference,sdpa-math", "--jsonl"])
    assert_clean_outcome(result, {0})
    lines = [json.loads(x) for x in result.stdout.splitlines()]
    assert lines[0]["record"] == "header" and [x["backend"] for x in lines[1:]] == ["reference", "sdpa-math"]
    ref = lines[1]
    q, k, _ = synthetic_qkv(1, 4, 2, 512, 64, seed=0)
    config = PBSConfig.from_dict(lines[0]["pbs"])  # the default preset's parameters, as recorded
    assert ref["status"] == "ok" and ref["density"] == pytest.approx(reference.build_plan(q, k, config).density())
    assert ref["speedup"] == pytest.approx(lines[2]["median_ms"] / ref["median_ms"])


def test_trace_has_the_named_phase_ranges(sweep):
    _, paths, _ = sweep
    with gzip.open(paths["trace"], "rt") as fh:
        events = json.load(fh)["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"pbs.permute", "pbs.select", "pbs.attend"} <= names


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_html_report_renders_in_a_headless_browser(sweep, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium)")
    doc, paths, _ = sweep
    # a copy with a probe script that writes what the browser decoded into the DOM
    probe = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
             "document.body.setAttribute('data-probe',JSON.stringify({imgs:i.map(x=>[x.naturalWidth,x.naturalHeight]),"
             "rows:document.querySelectorAll('#results tbody tr').length}));});</script></body>")
    page = tmp_path / "probe.html"
    page.write_text(paths["html"].read_text().replace("</body>", probe))
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                           "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-500:]
    import re

    m = re.search(r"data-probe=\"([^\"]*)\"", proc.stdout)
    assert m, proc.stdout[:500]
    info = json.loads(m.group(1).replace("&quot;", '"'))
    assert len(info["imgs"]) == 2 and all(w > 100 and h > 100 for w, h in info["imgs"])
    assert info["rows"] == len(doc["results"])


def test_bad_inputs_are_usage_errors(tmp_path):
    for args, needle in (
        (["--seq-len", "12q"], "invalid size"),
        (["--seq-len", "0"], "positive"),
        (["--seq-len", "1k", "--backends", "pbs,fast"], "sdpa-cudnn"),
        (["--seq-len", "1k", "--json", "--csv"], "one stdout format"),
        (["--seq-len", "1k", "--heads", "6", "--kv-heads", "4"], "multiple"),
        (["--seq-len", "1k", "--doc", str(tmp_path)], "--from-model"),
        (["--seq-len", "1k", "-o", str(tmp_path / "x.txt")], "extension"),
        (["--seq-len", "1k", "--pattern", "zigzag"], "pattern"),
    ):
        result = invoke(["profile", *args])
        assert_clean_outcome(result, {2})
        assert needle in result.stderr, (args, result.stderr)
    existing = tmp_path / "exists.json"
    existing.write_text("{}")
    result = invoke(["profile", "--seq-len", "1k", "-o", str(existing)])
    assert_clean_outcome(result, {2})
    assert "--force" in result.stderr and existing.read_text() == "{}"


def test_length_beyond_memory_is_skipped_and_the_sweep_goes_on(tmp_path):
    result = invoke(["profile", "--seq-len", "256,64m", *SHAPE, *FAST, "--backends", "sdpa-math", "--json"])
    assert_clean_outcome(result, {0})
    doc = json.loads(result.stdout)
    assert _rec(doc, 256, "sdpa-math")["status"] == "ok"
    big = _rec(doc, 64 * 2**20, "sdpa-math")
    assert big["status"] == "skipped" and "GiB" in big["reason"]
    assert "skipping N=64M" in result.stderr
    # nothing fits at all: exit 4 (out of memory), results still printed
    result = invoke(["profile", "--seq-len", "64m", "--backends", "sdpa-math", "--json"])
    assert_clean_outcome(result, {4})
    assert json.loads(result.stdout)["results"][0]["status"] == "skipped"


def test_interrupted_sweep_keeps_finished_jsonl_lines(tmp_path, monkeypatch):
    from pbs_cli.engine import profile_job as cmd

    real = cmd._run_length
    calls = {"n": 0}

    def flaky(n, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(n, *args, **kwargs)

    monkeypatch.setattr(cmd, "_run_length", flaky)
    target = tmp_path / "cut.jsonl"
    result = invoke(["profile", "--seq-len", "256,512", *SHAPE, *FAST, "--backends", "sdpa-math,pbs",
                     "-o", str(target)])
    assert_clean_outcome(result, {130})
    doc = report_files.load(target)
    assert {(r["seq_len"], r["backend"]) for r in doc["results"]} == {(256, "sdpa-math"), (256, "pbs")}


def test_flex_block_mask_is_the_plan():
    """The FlexAttention BlockMask (permuted K/V, full off-diagonal blocks, partial diagonal-segment blocks
    with causality on original positions), expanded to a token mask, gives the reference plan's output."""
    pytest.importorskip("torch.nn.attention.flex_attention")

    def densify(num, idx):
        valid = torch.arange(idx.shape[-1]) < num[..., None]
        return torch.zeros(idx.shape, dtype=torch.bool).scatter_reduce(-1, idx.long(), valid, "amax")

    for n, bs, seg in ((1024, 64, 128), (1000, 64, 128), (700, 64, 256), (300, 32, 64)):
        q, k, v = synthetic_qkv(1, 4, 2, n, 32, seed=1)
        plan = reference.build_plan(q, k, PBSConfig(block_size=bs, segment_size=seg, threshold=0.7))
        want = reference.block_sparse_attention(q, k, v, plan)
        bm = flex_block_mask(plan, 4)

        def tokens(m):
            return m.repeat_interleave(bs, -1).repeat_interleave(bs, -2)[..., :n, :n]

        part, full = tokens(densify(bm.kv_num_blocks, bm.kv_indices)), tokens(densify(bm.full_kv_num_blocks, bm.full_kv_indices))
        orig = plan.perm.repeat_interleave(2, 1).long()
        mask = full | (part & (orig[:, :, None, :] <= torch.arange(n)[None, None, :, None]))
        kp = reference.permute_keys(k, plan.perm).repeat_interleave(2, 1)
        vp = reference.permute_keys(v, plan.perm).repeat_interleave(2, 1)
        got = torch.nn.functional.scaled_dot_product_attention(q, kp, vp, attn_mask=mask)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_helpers_against_direct_computation():
    assert causal_flops(2, 3, 100, 8) == 2 * 100 * 100 * 8 * 3 * 2
    a, b = torch.randn(1, 3, 50, 8), torch.randn(1, 3, 50, 8)
    assert rel_l2(a, b) == pytest.approx(float((a - b).norm() / b.norm()), rel=1e-6)
    rows = sample_rows(1000, 16, 0, torch.device("cpu"))
    assert rows.numel() == 16 and int(rows[-1]) == 999 and int(rows.min()) >= 125 and rows.unique().numel() == 16
    # chunked recall equals the unchunked reference
    q, k, _ = synthetic_qkv(1, 8, 2, 512, 32, seed=3)
    plan = reference.build_plan(q, k, PBSConfig(block_size=64, segment_size=128))
    full = reference.attention_recall(q, k, plan, rows[rows < 512])
    mean, worst = recall_stats(q, k, plan, rows[rows < 512], None, max_elements=1)
    assert mean == pytest.approx(float(full.mean()), abs=1e-6) and worst == pytest.approx(float(full.min()), abs=1e-6)


def test_sliced_plan_matches_to_dense():
    from pbs_cli.engine.profiling import _slice_plan

    q, k, _ = synthetic_qkv(1, 8, 2, 700, 32, seed=4)
    plan = reference.build_plan(q, k, PBSConfig(block_size=64, segment_size=128, threshold=0.6))
    for h0, h1 in ((0, 8), (4, 8), (0, 4)):
        part = _slice_plan(plan, h0, h1, 4)
        assert torch.equal(part.to_dense(), plan.to_dense()[:, h0:h1])
        assert part.to_dense().dtype == torch.bool


def test_profiler_at_threshold_one_matches_dense():
    """tau = 1.0 keeps every causal block: PBS output equals dense attention, recall is 1."""
    q, k, v = synthetic_qkv(1, 4, 2, 512, 32, seed=2)
    s = Settings(config=PBSConfig(threshold=1.0, block_size=64, segment_size=128), backends=("pbs", "sdpa-math"),
                 iters=1, budget_s=0, recall_rows=8)
    recs = {r["backend"]: r for r in Profiler(s).run(Case(q, k, v))}
    assert recs["pbs"]["density"] == 1.0
    assert recs["pbs"]["rel_l2_error"] < 1e-5 and recs["pbs"]["recall_min"] > 1 - 1e-5


def test_pbs_total_is_the_graph_replay_where_prefill_uses_one(monkeypatch):
    """Where pbs prefill replays a CUDA graph per layer (CUDA, stood in for here by a counting fake),
    the pbs row's total times those calls, keeps the eager pass's peak memory and names the eager
    time in its notes; the phases stay eager."""
    from pbs_cli.engine import profiling
    from pbs_kernels import pbs_prefill_attention

    calls = []

    class FakeGraphs:
        replays, failed = 0, None

        def eligible(self, q, config):
            return True

        def __call__(self, q, k, v, config, scale=None):
            calls.append(q.shape)
            self.replays += 1
            return pbs_prefill_attention(q, k, v, config, scale)

        def close(self):
            pass

    monkeypatch.setattr(profiling, "LayerGraphs", FakeGraphs)
    q, k, v = synthetic_qkv(1, 4, 2, 512, 64, seed=2)
    s = Settings(config=PBSConfig(threshold=0.8, block_size=64, segment_size=128), backends=("pbs",),
                 iters=2, budget_s=0, recall_rows=8)
    (rec,) = Profiler(s).run(Case(q, k, v))
    assert len(calls) >= 2 and rec["notes"].startswith("CUDA graph replay, as in pbs prefill (eager ")
    monkeypatch.setenv("PBS_CUDA_GRAPHS", "0")
    calls.clear()
    (rec,) = Profiler(s).run(Case(q, k, v))
    assert not calls and rec["notes"] == "CPU: pbs runs the PyTorch reference path"


def test_captured_qkv_is_what_the_attention_receives(tiny_model_dir):
    """Layer 0's captured k equals k_proj(norm(embed(x))) with RoPE applied, computed by hand."""
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    tokens = torch.randint(0, model.config.vocab_size, (1, 64))
    got = captured_qkv(model, tokens, [0, -1])
    assert sorted(got) == [0, model.config.num_hidden_layers - 1]
    q, k, v = got[0]
    assert q.shape == (1, 4, 64, 16) and k.shape == (1, 2, 64, 16) and v.shape == k.shape
    with torch.no_grad():
        layer = model.model.layers[0]
        h = layer.input_layernorm(model.model.embed_tokens(tokens))
        qh = layer.self_attn.q_proj(h).view(1, 64, 4, 16).transpose(1, 2)
        kh = layer.self_attn.k_proj(h).view(1, 64, 2, 16).transpose(1, 2)
        vh = layer.self_attn.v_proj(h).view(1, 64, 2, 16).transpose(1, 2)
        cos, sin = model.model.rotary_emb(h, torch.arange(64)[None])
        qh, kh = apply_rotary_pos_emb(qh, kh, cos, sin)
    torch.testing.assert_close(q, qh)
    torch.testing.assert_close(k, kh)
    torch.testing.assert_close(v, vh)
    assert model.config._attn_implementation == "sdpa"  # restored
    with pytest.raises(ValueError, match="out of range"):
        captured_qkv(model, tokens, [99])


def test_profile_from_model_on_real_text(tiny_model_dir, offline_env, tmp_path):  # noqa: F811
    import argparse

    doc_path = tmp_path / "doc.txt"
    doc_path.write_text(Path(inspect.getsourcefile(argparse)).read_text()[:20000])
    result = invoke(["profile", "--from-model", str(tiny_model_dir), "--doc", str(doc_path), "--layers", "0,1",
                     "--seq-len", "256,512,1m", *FAST, "--backends", "pbs,sdpa-math", "--json"])
    assert_clean_outcome(result, {0})
    doc = json.loads(result.stdout)
    assert doc["workload"]["source"] == "model" and doc["workload"]["layers"] == [0, 1]
    assert doc["shape"]["heads"] == 4 and doc["shape"]["kv_heads"] == 2 and doc["shape"]["head_dim"] == 16
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    assert {(r["seq_len"], r["layer"], r["backend"]) for r in ok} == {
        (n, layer, b) for n in (256, 512) for layer in (0, 1) for b in ("pbs", "sdpa-math")}
    assert all(r["status"] == "skipped" and "shorter" in r["reason"] for r in doc["results"] if r["seq_len"] == 2**20)


def test_shape_from_model_config_with_flag_override(tiny_model_dir, offline_env):  # noqa: F811
    result = invoke(["profile", "--model", str(tiny_model_dir), "--seq-len", "256", *FAST, "--backends", "sdpa-math",
                     "--json"])
    assert_clean_outcome(result, {0})
    shape = json.loads(result.stdout)["shape"]
    assert (shape["heads"], shape["kv_heads"], shape["head_dim"], shape["batch"]) == (4, 2, 16, 1)
    result = invoke(["profile", "--model", str(tiny_model_dir), "--head-dim", "32", "--seq-len", "256", *FAST,
                     "--backends", "sdpa-math", "--json"])
    assert_clean_outcome(result, {0})
    shape = json.loads(result.stdout)["shape"]
    assert (shape["heads"], shape["head_dim"]) == (4, 32) and "flags" in shape["source"]
