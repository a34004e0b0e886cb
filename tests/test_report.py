"""`pbs report show` / `pbs report compare` on hand-made profile documents (no profiling needed),
and the timing helpers."""

from __future__ import annotations

import json
import statistics

import pytest

from fixtures import assert_clean_outcome, invoke
from pbs_cli.engine import reports
from pbs_cli.engine.profile_records import result, skipped, summarize
from pbs_cli.engine.report_files import compare, load
from pbs_cli.render.report_formats import parse_markdown_table, to_jsonl
from pbs_cli.engine.timing import bench, quantile


def _doc(pbs_ms: dict[int, tuple[float, float, float]], dense_ms: dict[int, float]) -> dict:
    """A profile document: pbs (q25, median, q75) and sdpa-flash medians per length."""
    recs = []
    for n in sorted(pbs_ms):
        lo, med, hi = pbs_ms[n]
        d = dense_ms[n]
        recs.append(result(n, "pbs", median_ms=med, q25_ms=lo, q75_ms=hi, min_ms=lo, max_ms=hi, repeats=5,
                           permute_ms=1.0, select_ms=1.0, attend_ms=med - 2, density=0.3, speedup=d / med,
                           best_dense="sdpa-flash", recall_mean=0.95, recall_min=0.8, rel_l2_error=0.01))
        recs.append(result(n, "sdpa-flash", median_ms=d, q25_ms=d * 0.99, q75_ms=d * 1.01, min_ms=d, max_ms=d,
                           repeats=5, density=1.0, speedup=1.0, best_dense="sdpa-flash"))
        recs.append(skipped(n, "flex", "FlexAttention is timed on CUDA only"))
    doc = reports.envelope("profile", device="cpu", dtype="float32",
                           shape={"batch": 1, "heads": 4, "kv_heads": 2, "head_dim": 64},
                           pbs={"block_size": 128, "segment_size": 256, "threshold": 0.9, "permute": True},
                           workload={"source": "synthetic", "pattern": "mixed", "seed": 0},
                           seq_lens=sorted(pbs_ms), backends=["pbs", "sdpa-flash", "flex"], results=recs)
    doc["summary"] = summarize(recs)
    return doc


@pytest.fixture()
def pair(tmp_path):
    a = _doc({1024: (99, 100, 101), 4096: (380, 400, 420)}, {1024: 50, 4096: 500})
    b = _doc({1024: (118, 120, 122), 4096: (370, 390, 450)}, {1024: 50, 4096: 500})
    pa, pb = tmp_path / "a.json", tmp_path / "b.jsonl"
    pa.write_text(json.dumps(a))
    pb.write_text(to_jsonl(b))
    return pa, pb, a, b


def test_summary_break_even_and_best_dense():
    doc = _doc({1024: (99, 100, 101), 4096: (380, 400, 420)}, {1024: 50, 4096: 500})
    s = doc["summary"]
    assert s["best_dense"] == {"1024": "sdpa-flash", "4096": "sdpa-flash"}
    assert s["break_even"]["pbs"] == 4096  # 0.5x at 1K, 1.25x at 4K
    assert s["speedup_at_longest"]["pbs"] == pytest.approx(1.25)
    never = _doc({1024: (99, 100, 101)}, {1024: 50})
    assert never["summary"]["break_even"]["pbs"] is None


def test_compare_rows_deltas_and_noise(pair):
    _, _, a, b = pair
    rows = {(r["seq_len"], r["backend"]): r for r in compare(a, b)}
    assert set(rows) == {(1024, "pbs"), (1024, "sdpa-flash"), (4096, "pbs"), (4096, "sdpa-flash")}  # skipped flex left out
    r = rows[(1024, "pbs")]
    assert r["delta_pct"] == pytest.approx(20.0) and r["noise"] is False  # IQR 4 < difference 20
    r = rows[(4096, "pbs")]
    assert r["delta_pct"] == pytest.approx(-2.5) and r["noise"] is True  # IQR 80 > difference 10


def test_report_compare_cli_and_fail_if_slower(pair):
    pa, pb, _, _ = pair
    res = invoke(["report", "compare", str(pa), str(pb)])
    assert_clean_outcome(res, {0})
    assert "+20.0%" in res.stdout and "within noise" in res.stdout
    res = invoke(["report", "compare", str(pa), str(pb), "--fail-if-slower", "10"])
    assert_clean_outcome(res, {1})
    assert "pbs got slower" in res.stderr and "+20.0%" in res.stderr
    res = invoke(["report", "compare", str(pa), str(pb), "--fail-if-slower", "25"])
    assert_clean_outcome(res, {0})
    res = invoke(["report", "compare", str(pa), str(pb), "--json"])
    assert_clean_outcome(res, {0})
    assert len(json.loads(res.stdout)["rows"]) == 4


def test_report_show_formats(pair):
    pa, pb, a, b = pair
    res = invoke(["report", "show", str(pb)])
    assert_clean_outcome(res, {0})
    assert "pbs" in res.stdout and "sdpa-flash" in res.stdout and "break-even" in res.stdout
    res = invoke(["report", "show", str(pa), "--format", "markdown"])
    assert_clean_outcome(res, {0})
    rows = parse_markdown_table(res.stdout)
    assert [(r["N"], r["backend"]) for r in rows] == [("1K", "pbs"), ("1K", "sdpa-flash"), ("4K", "pbs"), ("4K", "sdpa-flash")]
    assert rows[2]["speedup (total / attend)"] == "1.25x"
    assert load(pb)["results"] == b["results"]


def test_report_bad_inputs(tmp_path, pair):
    pa, _, a, _ = pair
    cases = []
    missing = tmp_path / "missing.json"
    cases.append(([str(missing)], "does not exist"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    cases.append(([str(bad)], "not valid JSON"))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**a, "command": "prefill"}))
    cases.append(([str(other)], "not a `pbs profile` result"))
    future = tmp_path / "future.json"
    future.write_text(json.dumps({**a, "schema_version": 99}))
    cases.append(([str(future)], "schema_version 99"))
    torn = tmp_path / "torn.jsonl"
    torn.write_text(to_jsonl(a)[:-40])
    cases.append(([str(torn)], "line"))
    headless = tmp_path / "headless.jsonl"
    headless.write_text("\n".join(to_jsonl(a).splitlines()[1:]) + "\n")
    cases.append(([str(headless)], "header"))
    for args, needle in cases:
        res = invoke(["report", "show", *args])
        assert_clean_outcome(res, {2})
        assert needle in res.stderr, (args, res.stderr)
    res = invoke(["report", "show", str(pa), "--format", "yaml"])
    assert_clean_outcome(res, {2})
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({**a, "results": []}))
    res = invoke(["report", "compare", str(pa), str(empty)])
    assert_clean_outcome(res, {2})
    assert "nothing to compare" in res.stderr


def test_quantile_matches_statistics():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    assert quantile(xs, 0.25) == pytest.approx(q[0]) and quantile(xs, 0.75) == pytest.approx(q[2])
    assert quantile(xs, 0.5) == pytest.approx(statistics.median(xs))
    assert quantile([7.0], 0.3) == 7.0


def test_bench_counts_calls_and_repeats():
    calls = []
    t = bench(lambda: calls.append(1), "cpu", warmup=2, min_repeats=4, max_repeats=6, budget_s=0.0)
    assert t.repeats == 4 and t.warmup == 2 and len(calls) == 6
    assert t.min_ms <= t.q25_ms <= t.median_ms <= t.q75_ms <= t.max_ms and t.peak_mem_mib is None
    calls.clear()
    t = bench(lambda: calls.append(1), "cpu", warmup=1, min_repeats=1, max_repeats=5, budget_s=10.0)
    assert t.repeats == 5 and len(calls) == 6  # cheap call: capped by max_repeats


def test_summary_says_which_pbs_rows_prefill_would_run_dense():
    from pbs_cli.render.report_formats import summary_lines

    def row(n, backend, ms):
        return {"seq_len": n, "backend": backend, "status": "ok", "median_ms": ms, "speedup": None, "layer": None}

    results = [row(8192, "pbs", 1.0), row(8192, "sdpa-cudnn", 0.9), row(32768, "pbs", 6.0), row(32768, "sdpa-cudnn", 14.0)]
    lines = summary_lines({"pbs": {"dense_below": 16384}, "results": results})
    notes = [ln for ln in lines if "dense_below" in ln]
    assert notes == ["pbs rows at 8K time the sparse path; with these parameters `pbs prefill` runs dense below "
                     "16K tokens (dense_below)"]
    assert not [ln for ln in summary_lines({"pbs": {"dense_below": 0}, "results": results}) if "dense_below" in ln]
