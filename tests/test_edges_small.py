"""The smaller edges (case 10 of test_edges.py), one assertion each: trace names, profiler chatter,
--target-kl inf, an empty --thresholds, a model folder without a tokenizer, one time unit in prefill's
summary, the KL column's unit, -f, --rope-scaling that changes nothing, tables in 80 columns, and a
break-even that needs more than one noisy point."""

from __future__ import annotations

import io
import json
import re
import shutil

import pytest

from fixtures import assert_clean_outcome, invoke, offline_env, tiny_model_dir  # noqa: F401
from pbs_cli import errors

TINY_PROFILE = ["--seq-len", "64", "--heads", "1", "--kv-heads", "1", "--head-dim", "16", "--device", "cpu",
                "--budget", "0", "--iters", "1", "--warmup", "0", "--block-size", "16", "--segment-size", "32",
                "--recall-rows", "4", "--backends", "pbs"]


def _line(result) -> str:
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("name", ["t.txt", "t.gz", "t.jsonl", "trace"])
def test_trace_must_be_named_json_or_json_gz(offline_env, tiny_model_dir, tmp_path, name):
    runs = ((["prefill", "-", "--model", str(tiny_model_dir)], b"Z" * 40), (["profile", *TINY_PROFILE], None))
    for args, stdin in runs:
        result = invoke([*args, "--trace", str(tmp_path / name)], input=stdin)
        assert_clean_outcome(result, {errors.USAGE})
        assert "*.json or *.json.gz" in _line(result)
    assert list(tmp_path.iterdir()) == []


def test_profiler_start_and_stop_lines_stay_off_stderr(offline_env, tmp_path, capfd):
    trace = tmp_path / "t.json"
    result = invoke(["profile", *TINY_PROFILE, "--trace", str(trace), "--json"])
    assert_clean_outcome(result, {0})
    native = capfd.readouterr().err  # what the profiler's C++ side wrote to file descriptor 2
    assert not re.search(r"^(USDT|STAGE):", native + result.stderr, flags=re.M), native
    assert json.loads(trace.read_text())["traceEvents"]


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1"])
def test_target_kl_must_be_finite_and_positive(offline_env, tmp_path, monkeypatch, value):
    from pbs_cli.engine import models

    monkeypatch.setattr(models, "resolve_model", lambda *a, **k: pytest.fail("resolved the model"))
    doc = tmp_path / "d.txt"
    doc.write_text("text " * 20)
    result = invoke(["calibrate", "--doc", str(doc), "--name", "mine", "--target-kl", value])
    assert_clean_outcome(result, {errors.USAGE})
    assert "--target-kl" in _line(result)


@pytest.mark.parametrize("text", ["", " ", ",", " , "])
def test_eval_thresholds_that_hold_no_number_are_refused(offline_env, tmp_path, monkeypatch, text):
    from pbs_cli.engine import models

    monkeypatch.setattr(models, "resolve_model", lambda *a, **k: pytest.fail("resolved the model"))
    doc = tmp_path / "d.txt"
    doc.write_text("text " * 20)
    result = invoke(["eval", str(doc), "--thresholds", text])
    assert_clean_outcome(result, {errors.USAGE})
    assert "no thresholds" in _line(result)


def test_model_folder_without_tokenizer_files_is_named(offline_env, tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    for f in folder.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            f.unlink()
    result = invoke(["prefill", "-", "--model", str(folder)], input=b"Z" * 40)
    assert_clean_outcome(result, {errors.USAGE})
    assert "no tokenizer files" in _line(result) and "safetensors" not in _line(result)


def test_prefill_summary_shows_pbs_and_dense_times_in_one_unit(offline_env, tiny_model_dir, monkeypatch):
    from rich.console import Console

    from pbs_cli.render import prefill

    result = invoke(["prefill", "-", "--model", str(tiny_model_dir), "--compare-dense", "--iters", "2", "--json"],
                    input=b"Z" * 64)
    assert_clean_outcome(result, {0})
    rec = json.loads(result.stdout)
    rec.update(prefill_ms=9000.0, prefill_ms_all=[8000.0, 9000.0], dense_prefill_ms=12000.0,
               dense_prefill_ms_all=[12000.0, 12500.0])
    buf = io.StringIO()
    monkeypatch.setattr(prefill, "out", Console(file=buf, width=200))
    prefill.print_summary(rec)
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in buf.getvalue().splitlines()
            if line.count("│") >= 3}
    assert rows["prefill time"].startswith("9.00 s") and "min 8.00 s, max 9.00 s" in rows["prefill time"]
    assert rows["dense SDPA prefill"].startswith("12.00 s") and "max 12.50 s" in rows["dense SDPA prefill"]


def test_eval_table_gives_the_kl_unit(monkeypatch):
    from rich.console import Console

    from pbs_cli.render import evaluation

    buf = io.StringIO()
    monkeypatch.setattr(evaluation, "emit", lambda r: Console(file=buf, width=200).print(r))
    row = {"strategy": "pbs (default)", "threshold": 0.9, "density": 0.3, "ppl": 5.0, "ppl_increase": 0.01,
           "top1_agreement": 0.95, "mean_kl": 0.02, "recall": 0.97, "layers": []}
    rec = {"document": "d.txt", "prompt_tokens": 10, "model": {"name": "tiny"}, "results": [row], "pareto": [True],
           "dense": {"strategy": "dense SDPA", "ppl": 4.9}}
    evaluation.print_table(rec)
    assert "mean KL (nats)" in buf.getvalue()


def test_short_option_f_means_one_thing(offline_env, tmp_path):
    refused = invoke(["viz-mask", "--seq-len", "256", "--png", str(tmp_path / "a.png"), "-f"])
    assert_clean_outcome(refused, {errors.USAGE})
    assert "No such option: -f" in _line(refused)
    assert not (tmp_path / "a.png").exists()


def test_rope_scaling_that_changes_nothing_says_so(offline_env, tiny_model_dir):
    result = invoke(["prefill", "-", "--model", str(tiny_model_dir), "--beyond-context", "--rope-scaling", "yarn",
                     "--json"], input=b"Z" * 40)
    assert_clean_outcome(result, {0})
    assert "--rope-scaling yarn does nothing here" in result.stderr
    assert json.loads(result.stdout)["rope_scaling"] is None


def test_tables_in_80_columns_keep_every_number_whole(monkeypatch):
    from rich.console import Console

    from pbs_cli.engine.profile_records import result, summarize
    from pbs_cli.render import tables
    from pbs_cli.render.report_formats import rich_table, row_cells
    from pbs_cli.engine import reports

    recs = [result(131072, "pbs", median_ms=12345.678, q25_ms=12000.0, q75_ms=12500.0, min_ms=1, max_ms=2,
                   repeats=3, permute_ms=123.456, select_ms=2345.67, attend_ms=9876.54, density=0.123456,
                   tflops=123.456, tflops_computed=98.7654, speedup=3.14159, attend_speedup=4.5678,
                   plan_share=0.1234,
                   rel_l2_error=1.23e-3, recall_mean=0.98765, recall_min=0.91234, peak_mem_mib=12345.0)]
    doc = reports.envelope("profile", device="cpu", dtype="float32", shape={"batch": 1, "heads": 32, "kv_heads": 8,
                           "head_dim": 128}, pbs={"block_size": 128}, workload={"source": "synthetic"},
                           seq_lens=[131072], backends=["pbs"], results=recs, summary=summarize(recs))
    buf = io.StringIO()
    monkeypatch.setattr(tables, "out", Console(file=buf, width=80, force_terminal=True, no_color=True))
    tables.print_table(rich_table(doc))
    shown = re.sub(r"\x1b\[[0-9;]*m", "", buf.getvalue())
    for cell in row_cells(recs[0]):
        for number in re.findall(r"[0-9][0-9.,e%x+-]*", cell):
            assert number in shown, f"{number!r} of cell {cell!r} is split in an 80-column terminal"


def test_break_even_needs_a_win_beyond_the_spread_at_every_longer_length():
    from pbs_cli.engine.profile_records import result, summarize

    def pair(n, pbs, dense):
        (lo, med, hi), (dlo, dmed, dhi) = pbs, dense
        return [result(n, "pbs", median_ms=med, q25_ms=lo, q75_ms=hi, speedup=dmed / med),
                result(n, "sdpa-math", median_ms=dmed, q25_ms=dlo, q75_ms=dhi, speedup=1.0)]

    # 1K: faster by the medians, but the spreads overlap; 2K: clearly faster; 4K: slower; 8K, 16K: clearly faster
    recs = (pair(1024, (8, 9, 12), (9.5, 10, 11)) + pair(2048, (10, 11, 12), (19, 20, 21))
            + pair(4096, (40, 41, 42), (29, 30, 31)) + pair(8192, (50, 51, 52), (99, 100, 101))
            + pair(16384, (90, 91, 92), (199, 200, 201)))
    s = summarize(recs)
    assert s["break_even"]["pbs"] == 8192  # not 2048: it loses again at 4096
    assert s["within_spread"]["pbs"] == [1024]
    assert summarize(pair(1024, (8, 9, 12), (9.5, 10, 11)))["break_even"]["pbs"] is None
