"""Interruptions and out-of-memory: Ctrl-C stops with exit 130 and keeps what was finished; OOM is
exit 4 with the failing size and what to try; neither leaves a half-written file.

The SIGINT test runs a real ``pbs profile`` sweep in a subprocess on the CPU; the OOM tests inject
``torch.OutOfMemoryError`` (the CUDA allocator's exception type) into the attention, in-process.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fixtures import PBS, assert_clean_outcome, invoke, offline_env, parse_jsonl, subprocess_env, tiny_model_dir  # noqa: F401
from pbs_cli import errors

SWEEP = ["profile", "--seq-len", "1k,2k,4k,8k", "--heads", "2", "--kv-heads", "1", "--head-dim", "32",
         "--device", "cpu", "--backends", "pbs", "--budget", "0", "--iters", "1", "--warmup", "0"]
GIB = "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB"


def _wait_for_lines(path: Path, count: int, proc: subprocess.Popen, limit_s: float) -> None:
    """Until ``path`` holds ``count`` complete lines (hang guard: ``limit_s``)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended (exit {proc.returncode}) before writing {count} lines: "
                        f"{proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"no {count} lines in {path} after {limit_s} s")


def test_sigint_during_a_sweep_keeps_finished_records_and_exits_130(tmp_path):
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    jsonl = out_dir / "sweep.jsonl"
    proc = subprocess.Popen([*PBS, *SWEEP, "-o", str(jsonl)], cwd=tmp_path, env=subprocess_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lines(jsonl, 2, proc, limit_s=240)  # the header and the first length's record
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)  # promptly: well before the sweep would end
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == errors.INTERRUPTED, f"exit {proc.returncode}; stderr: {stderr[-1500:]}"
    assert "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted"), stderr[-500:]

    lines = parse_jsonl(jsonl)  # every line is whole and parses
    header, records, marker = lines[0], lines[1:-1], lines[-1]
    assert header["record"] == "header" and header["command"] == "profile"
    assert header["seq_lens"] == [1024, 2048, 4096, 8192]
    assert 1 <= len(records) < 4, f"expected an interrupted sweep, got {len(records)} records"
    assert marker["record"] == "incomplete" and marker["reason"] == "interrupted"
    assert marker["finished_seq_lens"] == header["seq_lens"][: len(records)]
    assert marker["missing_seq_lens"] == header["seq_lens"][len(records):]
    for i, rec in enumerate(records):
        assert rec["record"] == "result" and rec["run"] == header["timestamp"]
        assert rec["seq_len"] == header["seq_lens"][i] and rec["backend"] == "pbs"
        assert rec["status"] == "ok" and rec["median_ms"] > 0 and 0 < rec["density"] <= 1
    # nothing half-written or temporary beside the report, nothing in the working directory
    assert sorted(p.name for p in out_dir.iterdir()) == ["sweep.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(("hf-home", "pbs-", "xdg-"))) == [
        "results"]


# -- Ctrl-C in-process: during load and during prefill ------------------------------------------------


def _raise(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc

    return fail


@pytest.mark.parametrize("where", ["load", "prefill"])
def test_ctrl_c_during_load_or_prefill_exits_130_and_writes_nothing(offline_env, tiny_model_dir, tmp_path,
                                                                    monkeypatch, where):
    from pbs_cli.engine import models, prefill

    if where == "load":
        monkeypatch.setattr(models.ModelSource, "load", _raise(KeyboardInterrupt()))
    else:
        monkeypatch.setattr(prefill, "run_prefills", _raise(KeyboardInterrupt()))
    report = tmp_path / "out" / "report.json"
    report.parent.mkdir()
    result = invoke(["prefill", "-", "--model", str(tiny_model_dir), "-o", str(report)], input=b"Z" * 40)
    assert_clean_outcome(result, {errors.INTERRUPTED})
    assert list(report.parent.iterdir()) == []


# -- out of memory ------------------------------------------------------------------------------------


CPU_OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
           "to allocate 4398046511104 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize("oom", [torch.OutOfMemoryError(GIB), RuntimeError(CPU_OOM), MemoryError()],
                         ids=["cuda", "cpu-allocator", "MemoryError"])
def test_oom_during_prefill_is_exit_4_naming_the_size_and_leaves_no_report(offline_env, tiny_model_dir,
                                                                           tmp_path, monkeypatch, oom):
    from pbs_cli.engine import integration

    monkeypatch.setattr(integration, "pbs_prefill_attention", _raise(oom))
    report = tmp_path / "out" / "report.json"
    report.parent.mkdir()
    result = invoke(["prefill", "-", "--model", str(tiny_model_dir), "-o", str(report), "--json"],
                    input=b"Z" * 123)
    assert_clean_outcome(result, {errors.OUT_OF_MEMORY})
    line = result.stderr.strip().splitlines()[-1]
    assert "out of memory" in line.lower(), line
    assert "123" in line, f"the error does not name the size that failed (123 tokens): {line}"
    assert "--dtype" in line, f"the error does not say what to try: {line}"
    assert result.stdout == ""
    assert list(report.parent.iterdir()) == [], "a partial report was written"


@pytest.mark.parametrize("oom", [torch.OutOfMemoryError(GIB), RuntimeError(CPU_OOM)], ids=["cuda", "cpu-allocator"])
def test_oom_in_one_profile_length_is_skipped_with_a_message_and_the_sweep_goes_on(offline_env, tmp_path,
                                                                                    monkeypatch, oom):
    from pbs_cli.engine import profiling

    real = profiling.pbs_attention

    def attention(q, *args, **kwargs):
        if q.shape[2] == 2048:
            raise oom
        return real(q, *args, **kwargs)

    monkeypatch.setattr(profiling, "pbs_attention", attention)
    report = tmp_path / "sweep.json"
    result = invoke([*SWEEP[:2], "1k,2k", *SWEEP[3:], "-o", str(report), "--json"])
    assert_clean_outcome(result, {0})
    doc = json.loads(report.read_text())
    by_len = {r["seq_len"]: r for r in doc["results"]}
    assert by_len[1024]["status"] == "ok"
    assert by_len[2048]["status"] == "skipped" and "out of memory" in by_len[2048]["reason"]
    assert "2048" in result.stderr or "2K" in result.stderr or "2k" in result.stderr, (
        f"no message on stderr names the skipped size: {result.stderr!r}")
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".json") == ["sweep.json"]


def test_profile_where_nothing_fits_is_exit_4_and_leaves_no_report(offline_env, tmp_path, monkeypatch):
    from pbs_cli.engine import profiling

    monkeypatch.setattr(profiling, "pbs_attention", _raise(torch.OutOfMemoryError(GIB)))
    report = tmp_path / "sweep.json"
    result = invoke([*SWEEP[:2], "1k,2k", *SWEEP[3:], "-o", str(report)])
    assert_clean_outcome(result, {errors.OUT_OF_MEMORY})
    line = result.stderr.strip().splitlines()[-1]
    assert "--seq-len" in line, line
    assert not report.exists(), "a report of nothing but failures was written"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith((".json", ".tmp"))] == []
