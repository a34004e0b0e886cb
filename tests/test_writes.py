"""Every file `pbs` writes: refused when it exists (unless --force), refused when its directory is
missing (no directories are created), written atomically (a Ctrl-C in the middle of the write leaves
neither a partial file nor a temp file), and nothing is written anywhere else (not even the cwd)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fixtures import assert_clean_outcome, invoke, offline_env, tiny_model_dir  # noqa: F401  (pytest fixtures)
from pbs_cli import errors

PROFILE = ["profile", "--seq-len", "256", "--heads", "2", "--kv-heads", "1", "--head-dim", "32", "--device", "cpu",
           "--backends", "pbs,sdpa-math", "--budget", "0", "--iters", "1", "--warmup", "0", "--block-size", "16",
           "--segment-size", "32"]
VIZ = ["viz-mask", "--seq-len", "256", "--device", "cpu", "--block-size", "16", "--segment-size", "32"]

# name -> (args with {out} for the output path, file name, the overwrite flag)
WRITERS = {
    "prefill -o": (["prefill", "{doc}", "--model", "{model}", "--block-size", "16", "--segment-size", "32",
                    "-o", "{out}"], "report.json", "--force"),
    "profile -o json": ([*PROFILE, "-o", "{out}"], "sweep.json", "--force"),
    "profile -o jsonl": ([*PROFILE, "-o", "{out}"], "sweep.jsonl", "--force"),
    "profile -o csv": ([*PROFILE, "-o", "{out}"], "sweep.csv", "--force"),
    "profile -o md": ([*PROFILE, "-o", "{out}"], "sweep.md", "--force"),
    "profile --html": ([*PROFILE, "--html", "{out}"], "sweep.html", "--force"),
    "profile --trace": ([*PROFILE, "--backends", "pbs", "--trace", "{out}"], "trace.json.gz", "--force"),
    "eval -o": (["eval", "{doc}", "--model", "{model}", "--max-tokens", "64", "--recall-rows", "0", "--device", "cpu",
                 "-o", "{out}"], "eval.json", "--force"),
    "eval --png": (["eval", "{doc}", "--model", "{model}", "--max-tokens", "64", "--recall-rows", "0", "--device", "cpu",
                    "--png", "{out}"], "eval.png", "--force"),
    "viz-mask --png": ([*VIZ, "--png", "{out}"], "mask.png", "--force"),
    "viz-mask --svg": ([*VIZ, "--svg", "{out}"], "mask.svg", "--force"),
    "viz-mask --html": ([*VIZ, "--html", "{out}"], "mask.html", "--force"),
}


@pytest.fixture()
def workdir(offline_env, tmp_path, monkeypatch, tiny_model_dir):
    """An empty cwd (must stay empty), an output folder and a small document."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    outdir = tmp_path / "out"
    outdir.mkdir()
    doc = tmp_path / "doc.txt"
    doc.write_text("def f(x):\n    return x + 1\n" * 4, encoding="utf-8")
    return {"cwd": cwd, "out": outdir, "doc": doc, "model": tiny_model_dir}


def _args(template: list[str], out: Path, w: dict) -> list[str]:
    return [a.format(out=out, doc=w["doc"], model=w["model"]) for a in template]


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("name", WRITERS)
def test_existing_file_is_kept_without_force_and_replaced_with_it(workdir, name):
    template, filename, force = WRITERS[name]
    target = workdir["out"] / filename
    target.write_bytes(b"precious")
    refused = invoke(_args(template, target, workdir))
    assert_clean_outcome(refused, {errors.USAGE})
    assert "--force" in refused.stderr
    assert target.read_bytes() == b"precious"
    assert _listing(workdir["out"]) == [filename]

    replaced = invoke([*_args(template, target, workdir), force])
    assert_clean_outcome(replaced, {0})
    assert target.read_bytes() != b"precious" and target.stat().st_size > 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask, "not the mode a plain open() would give"
    assert _listing(workdir["out"]) == [filename], "temp files or extra files left beside the output"
    assert _listing(workdir["cwd"]) == [], "files written to the working directory"


@pytest.mark.parametrize("name", WRITERS)
def test_missing_directory_is_refused_not_created(workdir, name):
    template, filename, _ = WRITERS[name]
    target = workdir["out"] / "not" / "there" / filename
    result = invoke(_args(template, target, workdir))
    assert_clean_outcome(result, {errors.USAGE})
    assert not (workdir["out"] / "not").exists(), "a directory was created"
    assert _listing(workdir["cwd"]) == []


@pytest.mark.parametrize("name", [n for n in WRITERS if not n.endswith("jsonl")])
def test_ctrl_c_during_the_write_leaves_no_partial_file(workdir, name, monkeypatch):
    """Every whole-file writer flushes to disk before renaming into place: Ctrl-C at that moment must
    leave neither the target nor a temp file. (The JSONL sweep log streams line by line instead; see
    test_interrupts.)"""
    template, filename, _ = WRITERS[name]
    target = workdir["out"] / filename
    real_replace = os.replace
    calls = []

    def interrupted_replace(src, dst, *args, **kwargs):
        if Path(dst) == target:
            calls.append(dst)
            raise KeyboardInterrupt
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", interrupted_replace)
    result = invoke(_args(template, target, workdir))
    assert calls, f"{name} did not write {target.name} through a rename (os.replace)"
    assert_clean_outcome(result, {errors.INTERRUPTED})
    assert _listing(workdir["out"]) == [], "a partial or temp file was left"
