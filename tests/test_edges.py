"""The edges a new user hits, one test (or a few) per case: each ends in the README's exit code with one
``error:`` line on stderr that says what to do, no traceback, nothing written or overwritten.

1 viz-mask memory pre-check; 2 outputs that name one file; 3 report compare of different setups;
4 calibrate --name; 5 backends and PBS_* settings this machine cannot honour; 6 option parser errors;
7 viz-mask documents; 8 interrupted profile sweeps in every format; 9 broken presets.
The smaller cases (10) are in test_edges_small.py.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from fixtures import assert_clean_outcome, invoke, offline_env, parse_jsonl, tiny_model_dir  # noqa: F401
from pbs_cli import errors
from pbs_cli.engine import report_files, reports
from pbs_cli.render import report_formats

TINY_PROFILE = ["--heads", "1", "--kv-heads", "1", "--head-dim", "16", "--device", "cpu", "--budget", "0",
                "--iters", "1", "--warmup", "0", "--block-size", "16", "--segment-size", "32", "--recall-rows", "4"]


def _nothing_written(folder: Path, before: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == before, f"files appeared: {sorted(p.name for p in folder.iterdir())}"


def _error_line(result) -> str:
    assert_clean_outcome(result)
    return result.stderr.strip().splitlines()[-1]


# -- 1: viz-mask refuses an analysis that cannot fit, before it starts ---------------------------------


def test_viz_mask_seq_len_beyond_memory_is_exit_4_before_any_work(offline_env, tmp_path, monkeypatch):
    from pbs_cli.engine import workloads

    monkeypatch.setattr(workloads, "synthetic_qkv", lambda *a, **k: pytest.fail("generated the inputs"))
    png = tmp_path / "mask.png"
    result = invoke(["viz-mask", "--seq-len", "10m", "--png", str(png)])
    assert_clean_outcome(result, {errors.OUT_OF_MEMORY})
    line = _error_line(result)
    assert "GiB" in line and "--seq-len" in line, line
    assert not png.exists() and result.stdout == ""


def test_viz_mask_memory_estimate_bounds_what_the_analysis_keeps():
    """Oracle: the bytes of the block matrices ``analyze`` actually returns fit in ``analysis_bytes``."""
    from pbs_cli.engine.mask_analysis import analysis_bytes, analyze
    from pbs_cli.engine.workloads import synthetic_qkv
    from pbs_kernels import PBSConfig

    config = PBSConfig(block_size=16, segment_size=32)
    q, k, _ = synthetic_qkv(1, 2, 1, 512, 16, seed=0)
    views = analyze(q, k, config, [0, 1])
    held = sum(a.nbytes for v in views for a in (v.original, v.permuted, v.kept, v.forced))
    assert held <= analysis_bytes(512, 16, heads=2)
    assert analysis_bytes(512, 16, heads=2) < 64 * held, "the estimate is far from what is used"


def test_viz_mask_on_a_document_checks_memory_before_loading_the_weights(offline_env, tiny_model_dir, tmp_path,
                                                                        monkeypatch):
    from pbs_cli.engine import models
    from pbs_cli.engine import memory

    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: 1 << 10)
    monkeypatch.setattr(models.ModelSource, "load", lambda *a, **k: pytest.fail("loaded the weights"))
    doc = tmp_path / "doc.txt"
    doc.write_text("Z" * 200)
    result = invoke(["viz-mask", str(doc), "--model", str(tiny_model_dir), "--json"])
    assert_clean_outcome(result, {errors.OUT_OF_MEMORY})
    assert "free on cpu" in _error_line(result)


# -- 2: two outputs naming one file ----------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["same", "dot-slash", "symlinked-folder"])
def test_prefill_output_and_trace_naming_one_file_are_refused(offline_env, tiny_model_dir, tmp_path, spelling):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    other = {"same": out_dir / "s.json", "dot-slash": out_dir / "." / "s.json"}.get(spelling)
    if other is None:
        (tmp_path / "link").symlink_to(out_dir)
        other = tmp_path / "link" / "s.json"
    result = invoke(["prefill", "-", "--model", str(tiny_model_dir), "-o", str(out_dir / "s.json"),
                     "--trace", str(other)], input=b"Z" * 40)
    assert_clean_outcome(result, {errors.USAGE})
    assert "--output and --trace both name" in _error_line(result)
    assert list(out_dir.iterdir()) == []


def test_profile_output_html_and_trace_must_be_different_files(offline_env, tmp_path):
    before = set()
    for args in (["-o", "s.json", "--trace", "s.json"], ["-o", "r.html", "--html", "r.html"]):
        result = invoke(["profile", "--seq-len", "64", *TINY_PROFILE, "--backends", "pbs",
                         *[str(tmp_path / a) if a.endswith((".json", ".html")) else a for a in args]])
        assert_clean_outcome(result, {errors.USAGE})
        assert "both name" in _error_line(result)
        _nothing_written(tmp_path, before)


# -- 3: report compare of runs that measured different things ----------------------------------------------


def _profile_doc(threshold: float = 0.9, heads: int = 4, dtype: str = "float32", ms: float = 100.0) -> dict:
    from pbs_cli.engine.profile_records import result, summarize

    recs = [result(1024, "pbs", median_ms=ms, q25_ms=ms * 0.99, q75_ms=ms * 1.01, min_ms=ms, max_ms=ms, repeats=5,
                   density=0.3, speedup=1.2, best_dense="sdpa-math"),
            result(1024, "sdpa-math", median_ms=120.0, q25_ms=119.0, q75_ms=121.0, min_ms=119.0, max_ms=121.0,
                   repeats=5, density=1.0, speedup=1.0, best_dense="sdpa-math")]
    doc = reports.envelope("profile", device="cpu", dtype=dtype,
                           shape={"batch": 1, "heads": heads, "kv_heads": 2, "head_dim": 64, "source": "flags"},
                           pbs={"block_size": 128, "segment_size": 256, "threshold": threshold, "permute": True},
                           workload={"source": "synthetic", "pattern": "mixed", "seed": 0}, seq_lens=[1024],
                           backends=["pbs", "sdpa-math"], results=recs)
    doc["summary"] = summarize(recs)
    return doc


@pytest.mark.parametrize("change, field", [({"threshold": 0.8}, "pbs.threshold"), ({"heads": 8}, "shape.heads"),
                                           ({"dtype": "bfloat16"}, "dtype")])
def test_report_compare_refuses_runs_of_different_setups(tmp_path, change, field):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_profile_doc()))
    b.write_text(json.dumps(_profile_doc(ms=150.0, **change)))  # B is slower: the gate would fire if compared
    for extra in ([], ["--fail-if-slower", "5"], ["--json"]):
        result = invoke(["report", "compare", str(a), str(b), *extra])
        assert_clean_outcome(result, {errors.USAGE})
        line = _error_line(result)
        assert field in line and "different setups" in line, line
        assert result.stdout == "", "no faster/slower rows for runs that cannot be compared"
    shown = invoke(["report", "compare", str(a), str(b), "--allow-different", "--json"])
    assert_clean_outcome(shown, {0})
    assert json.loads(shown.stdout)["rows"][0]["delta_pct"] == pytest.approx(50.0)
    gate = invoke(["report", "compare", str(a), str(b), "--allow-different", "--fail-if-slower", "5"])
    assert_clean_outcome(gate, {errors.USAGE})
    assert "same setup" in _error_line(gate)


def test_report_compare_of_one_setup_on_two_machines_still_runs(tmp_path):
    a, b = _profile_doc(), _profile_doc(ms=150.0)
    b["env"] = {**b["env"], "torch": "9.9", "gpu": {"name": "other", "count": 1, "memory_gib": 1, "capability": "9.0",
                                                    "cuda": "13"}}
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    gate = invoke(["report", "compare", str(pa), str(pb), "--fail-if-slower", "5"])
    assert_clean_outcome(gate, {errors.RUNTIME})
    assert "got slower" in _error_line(gate)


# -- 4: calibrate --name, checked before the model loads -------------------------------------------------


@pytest.mark.parametrize("name, needle", [("default", "built-in preset"), ("gpu", "built-in preset"),
                                          ("../evil", "invalid profile name"), ("a/b", "invalid profile name"),
                                          (".hidden", "invalid profile name"), ("models", "reserved")])
def test_calibrate_name_is_refused_before_any_work(offline_env, tmp_path, monkeypatch, name, needle):
    from pbs_cli.engine import presets
    from pbs_cli.engine import models

    monkeypatch.setattr(models, "resolve_model", lambda *a, **k: pytest.fail("resolved the model"))
    doc = tmp_path / "doc.txt"
    doc.write_text("some text " * 50)
    result = invoke(["calibrate", "--doc", str(doc), "--name", name, "--target-recall", "0.9"])
    assert_clean_outcome(result, {errors.USAGE})
    assert needle in _error_line(result)
    folder = presets.user_profiles_dir()
    assert not folder.exists() or list(folder.iterdir()) == []
    assert not (tmp_path.parent / "evil.toml").exists()


# -- 5: what this machine cannot do ------------------------------------------------------------------------


def test_profile_backends_that_cannot_run_here_are_exit_3_or_a_warning(offline_env):
    import torch

    if torch.cuda.is_available():
        pytest.skip("sdpa-cudnn and flex run on this machine")
    for names in ("sdpa-cudnn", "flex", "sdpa-cudnn,sdpa-efficient,flex"):
        result = invoke(["profile", "--seq-len", "64", *TINY_PROFILE, "--backends", names])
        assert_clean_outcome(result, {errors.UNSUPPORTED})
        assert "needs a CUDA GPU" in _error_line(result) or "CUDA only" in _error_line(result)
        assert result.stdout == ""
    mixed = invoke(["profile", "--seq-len", "64", *TINY_PROFILE, "--backends", "sdpa-cudnn,pbs", "--json"])
    assert_clean_outcome(mixed, {0})
    assert "warning: sdpa-cudnn needs a CUDA GPU" in mixed.stderr
    status = {r["backend"]: r["status"] for r in json.loads(mixed.stdout)["results"]}
    assert status == {"sdpa-cudnn": "skipped", "pbs": "ok"}


@pytest.mark.parametrize("name, value", [("PBS_BACKEND", "bogus"), ("PBS_PERM_MODE", "bogus"),
                                         ("PBS_CUDA_GRAPHS", "maybe"), ("PBS_AUTOTUNE", "yes")])
def test_unknown_pbs_setting_is_a_usage_error_and_pbs_env_lists_it(offline_env, tmp_path, name, value):
    png = tmp_path / "m.png"
    result = invoke(["viz-mask", "--seq-len", "256", "--png", str(png)], env={name: value})
    assert_clean_outcome(result, {errors.USAGE})
    line = _error_line(result)
    assert name in line and value in line and "unset it" in line, line
    assert not png.exists()
    shown = invoke(["env", "--json"], env={name: value})
    assert_clean_outcome(shown, {0})
    info = json.loads(shown.stdout)
    assert info["kernel_settings"][name] == value and name in info["kernel_setting_problems"]
    assert f"warning: {name}=" in shown.stderr


def test_triton_backend_without_a_gpu_is_exit_3(offline_env):
    import torch

    if torch.cuda.is_available():
        pytest.skip("Triton runs on this machine's GPU")
    env = {"PBS_BACKEND": "triton", "TRITON_INTERPRET": None}
    result = invoke(["prefill", "-", "--model", "/nonexistent"], input=b"Z" * 40, env=env)
    assert_clean_outcome(result, {errors.UNSUPPORTED})
    assert "needs a CUDA GPU" in _error_line(result) and "TRITON_INTERPRET=1" in _error_line(result)


def test_triton_backend_on_a_cpu_device_is_exit_3_also_where_a_gpu_exists(monkeypatch):
    from pbs_cli.engine import models

    monkeypatch.setenv("PBS_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(errors.UnsupportedError, match="TRITON_INTERPRET=1"):
        models.resolve_device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert models.resolve_device("cpu") == "cpu"


# -- 6: option parser errors are one line ------------------------------------------------------------------


@pytest.mark.parametrize("args, needle", [
    (["profile", "--bogus"], "No such option: --bogus"),
    (["profile", "--iters", "0"], "'--iters'"),
    (["bogus"], "No such command 'bogus'"),
    (["report", "compare"], "Missing argument"),
    (["viz-mask", "--layer", "x"], "'--layer'"),
    (["report", "cmp"], "Did you mean 'compare'"),
])
def test_option_parser_errors_are_one_error_line_exit_2(args, needle):
    result = invoke(args)
    assert_clean_outcome(result, {errors.USAGE})
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert "--help" in lines[0], "the line says where the valid options are listed"


def test_help_and_version_still_exit_0():
    for args in (["--help"], ["--version"], ["profile", "--help"], ["report", "show", "--help"]):
        result = invoke(args)
        assert result.exit_code == 0 and result.stdout, (args, result.stderr)


# -- 7: viz-mask documents ---------------------------------------------------------------------------------


def test_viz_mask_reads_stdin(offline_env, tiny_model_dir):
    result = invoke(["viz-mask", "-", "--model", str(tiny_model_dir), "--json", "--block-size", "16",
                     "--segment-size", "32"], input=b"Z" * 100)
    assert_clean_outcome(result, {0})
    record = json.loads(result.stdout)
    assert record["source"].startswith("<stdin>") and record["workload"]["tokens"] == 100


@pytest.mark.parametrize("content", [b"  \n\t \n", b"", b"ab\x00cd", b"caf\xe9 latin-1"],
                         ids=["whitespace", "empty", "binary", "latin-1"])
def test_viz_mask_refuses_documents_with_prefills_words(offline_env, tiny_model_dir, tmp_path, content):
    doc = tmp_path / "doc.txt"
    doc.write_bytes(content)
    lines = []
    for command in ("viz-mask", "prefill"):
        result = invoke([command, str(doc), "--model", str(tiny_model_dir)])
        assert_clean_outcome(result, {errors.USAGE})
        lines.append(_error_line(result))
    assert lines[0] == lines[1]
    if content.strip() == b"" and content:
        assert "only whitespace" in lines[0]


# -- 8: Ctrl-C in a sweep keeps every finished length, in every format, marked incomplete ------------------


def _interrupt_at_second_length(monkeypatch):
    from pbs_cli.engine import profile_job as cmd

    real, calls = cmd._run_length, {"n": 0}

    def cut(n, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(n, *args, **kwargs)

    monkeypatch.setattr(cmd, "_run_length", cut)


def _finished(doc: dict) -> set[int]:
    return {r["seq_len"] for r in doc["results"]}


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".md", ".html"])
def test_interrupted_sweep_keeps_finished_lengths_in_every_file_format(offline_env, tmp_path, monkeypatch, suffix):
    _interrupt_at_second_length(monkeypatch)
    target = tmp_path / f"sweep{suffix}"
    result = invoke(["profile", "--seq-len", "64,128,256", *TINY_PROFILE, "--backends", "sdpa-math,pbs",
                     "-o", str(target)])
    assert_clean_outcome(result, {errors.INTERRUPTED})
    line = _error_line(result)
    assert "interrupted after 1 of 3 lengths" in line and str(target) in line, line
    text = target.read_text(encoding="utf-8")
    if suffix in (".json", ".jsonl"):
        doc = report_files.load(target)
        assert _finished(doc) == {64}
        assert doc["incomplete"]["reason"] == "interrupted"
        assert doc["incomplete"]["missing_seq_lens"] == [128, 256]
        if suffix == ".jsonl":
            assert parse_jsonl(target)[-1]["record"] == "incomplete"
    elif suffix == ".csv":
        body, last = text.rstrip("\n").rsplit("\n", 1)
        assert last == "# incomplete: interrupted; no results for 128, 256"
        rows = list(csv.DictReader(io.StringIO(body)))
        assert {(r["seq_len"], r["backend"]) for r in rows} == {("64", "sdpa-math"), ("64", "pbs")}
    elif suffix == ".md":
        rows = report_formats.parse_markdown_table(text)
        assert {r["N"] for r in rows} == {"64"}
        assert "incomplete: interrupted; no results for 128, 256" in text
    else:
        assert "incomplete: interrupted; no results for 128, 256" in text
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("sweep", ".sweep"))) == [target.name]


@pytest.mark.parametrize("fmt", ["--json", "--csv", "--markdown", "--jsonl", None])
def test_interrupted_sweep_prints_finished_lengths_on_stdout_marked_incomplete(offline_env, monkeypatch, fmt):
    _interrupt_at_second_length(monkeypatch)
    result = invoke(["profile", "--seq-len", "64,128", *TINY_PROFILE, "--backends", "pbs",
                     *([fmt] if fmt else [])], env={"COLUMNS": "200"})
    assert_clean_outcome(result, {errors.INTERRUPTED})
    assert "incomplete" in result.stdout
    if fmt == "--json":
        assert _finished(json.loads(result.stdout)) == {64}
    if fmt == "--jsonl":
        lines = [json.loads(x) for x in result.stdout.splitlines()]
        assert [x["record"] for x in lines] == ["header", "result", "incomplete"]


def test_interrupted_before_any_length_writes_nothing(offline_env, tmp_path, monkeypatch):
    from pbs_cli.engine import profile_job as cmd

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cmd, "_run_length", stop)
    for suffix in (".json", ".jsonl"):
        result = invoke(["profile", "--seq-len", "64,128", *TINY_PROFILE, "--backends", "pbs",
                         "-o", str(tmp_path / f"r{suffix}")])
        assert_clean_outcome(result, {errors.INTERRUPTED})
        assert "nothing was written" in _error_line(result)
    assert list(tmp_path.iterdir()) == []


def test_a_jsonl_cut_short_without_its_marker_reads_as_incomplete(tmp_path):
    doc = _profile_doc()
    doc["seq_lens"] = [1024, 4096]
    path = tmp_path / "killed.jsonl"
    path.write_text(report_formats.to_jsonl(doc))  # as if killed before 4096: no result, no marker
    loaded = report_files.load(path)
    assert loaded["incomplete"]["missing_seq_lens"] == [4096]
    shown = invoke(["report", "show", str(path), "--format", "markdown"])
    assert_clean_outcome(shown, {0})
    assert "incomplete: cut short; no results for 4K" in shown.stdout


# -- 9: broken presets ----------------------------------------------------------------------------------------


def test_a_broken_preset_file_leaves_env_and_other_presets_working(offline_env):
    from pbs_cli.engine import presets

    folder = presets.user_profiles_dir()
    folder.mkdir(parents=True)
    (folder / "broken.toml").write_text("[pbs\nthreshold = 0.9\n")
    (folder / "high.toml").write_text('[pbs]\nthreshold = "high"\n')
    env = invoke(["env", "--json"])
    assert_clean_outcome(env, {0})
    problems = json.loads(env.stdout)["profile_problems"]
    assert set(problems) == {"broken", "high"}
    assert "broken.toml" in env.stderr and "high.toml" in env.stderr
    ok = invoke(["viz-mask", "--seq-len", "256", "--json"])
    assert_clean_outcome(ok, {0})
    for name, needles in (("broken", ["broken.toml", "fix or remove"]),
                          ("high", ["high.toml", "threshold", "'high'", "must be a number"])):
        result = invoke(["viz-mask", "--seq-len", "256", "--profile", name])
        assert_clean_outcome(result, {errors.USAGE})
        line = _error_line(result)
        assert all(n in line for n in needles), line


def test_a_broken_user_file_does_not_fall_back_to_the_builtin_of_its_name(offline_env):
    from pbs_cli.engine import presets

    folder = presets.user_profiles_dir()
    folder.mkdir(parents=True)
    (folder / "default.toml").write_text("[pbs]\nthreshold = [0.9]\n")
    result = invoke(["viz-mask", "--seq-len", "256", "--json"])
    assert_clean_outcome(result, {errors.USAGE})
    assert "default.toml" in _error_line(result) and "threshold" in _error_line(result)


def test_a_broken_models_toml_is_named_and_env_still_runs(offline_env):
    from pbs_cli.engine import presets

    folder = presets.user_profiles_dir()
    folder.mkdir(parents=True)
    (folder / "models.toml").write_text("[aliases.x\n")
    env = invoke(["env", "--json"])
    assert_clean_outcome(env, {0})
    assert "models.toml" in json.loads(env.stdout)["profile_problems"]["models"]
    result = invoke(["prefill", "-", "--model", "x"], input=b"Z" * 40)
    assert_clean_outcome(result, {errors.USAGE})
    assert "models.toml" in _error_line(result)

