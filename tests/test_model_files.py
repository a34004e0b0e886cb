"""Hostile model files: truncated / corrupt GGUF and safetensors, missing config, pickles, remote code,
architectures the sparse path cannot serve, and a corrupt or half-written dequantization cache.

Everything runs end to end through ``pbs prefill`` (Typer's CliRunner) on tiny offline models built in
``fixtures.py``; the GGUF cases use a real (tiny, fp32) GGUF file, so the cache path is the one the
embedded model takes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from fixtures import (  # noqa: F401  (pytest fixtures)
    assert_clean_outcome,
    build_tiny_model_of,
    corrupt_safetensors_in,
    garble_safetensors_header_in,
    invoke,
    offline_env,
    pickle_only_model_dir,
    tiny_gguf,
    tiny_model_dir,
    write_garbage_gguf,
    write_truncated_gguf,
)
from pbs_cli import errors
from pbs_cli.engine import models

DOC = b"Z" * 40  # exactly 40 tokens for the tiny tokenizer


def prefill(model: Path | str, *extra: str, input: bytes = DOC):
    return invoke(["prefill", "-", "--model", str(model), "--json", *extra], input=input)


def error_line(result) -> str:
    return [ln for ln in result.stderr.splitlines() if ln.strip()][-1]


# -- GGUF files ---------------------------------------------------------------------------------------


def _gguf_variants(tiny: Path, folder: Path) -> dict[str, Path]:
    full = tiny.read_bytes()
    variants = {
        "header cut inside metadata": write_truncated_gguf(folder / "cut-header.gguf"),
        "random bytes": write_garbage_gguf(folder / "random.gguf"),
        "empty file": folder / "empty.gguf",
        "metadata only": folder / "meta-only.gguf",
        "half the tensor data": folder / "half.gguf",
        "last byte missing": folder / "one-short.gguf",
    }
    variants["empty file"].write_bytes(b"")
    variants["metadata only"].write_bytes(full[:2000])
    variants["half the tensor data"].write_bytes(full[: len(full) // 2])
    variants["last byte missing"].write_bytes(full[:-1])
    return variants


def test_truncated_or_corrupt_gguf_is_one_clear_error_naming_the_file(offline_env, tiny_gguf, tmp_path):
    for what, path in _gguf_variants(tiny_gguf, tmp_path).items():
        result = prefill(path)
        assert_clean_outcome(result, {errors.RUNTIME, errors.USAGE})
        assert result.exit_code != 0, what
        line = error_line(result)
        assert path.name in line, f"{what}: the error does not name the file: {line}"
        assert "gguf" in line.lower(), f"{what}: the error does not say it is a GGUF problem: {line}"
        assert not line.startswith("error: error:"), f"{what}: {line}"
        # nothing half-built was left in the cache
        cache = Path(offline_env / "pbs-cache")
        leftovers = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
        assert leftovers == [], f"{what}: files left in the cache: {leftovers}"


def test_gguf_with_wrong_suffix_and_missing_gguf_are_usage_errors(offline_env, tiny_gguf, tmp_path):
    renamed = tmp_path / "model.bin"
    shutil.copy(tiny_gguf, renamed)
    for spec in (renamed, tmp_path / "absent.gguf"):
        result = prefill(spec)
        assert_clean_outcome(result, {errors.USAGE})


# -- the dequantization cache -------------------------------------------------------------------------


def _cache_folder(tiny_gguf: Path) -> Path:
    return models.cache_dir_for(models.resolve_model(str(tiny_gguf)))


def _run_cache_state(model: Path) -> tuple[str, dict]:
    result = prefill(model)
    assert_clean_outcome(result, {0})
    record = json.loads(result.stdout)
    return record["model"]["cache"], record


@pytest.fixture()
def private_gguf(tiny_gguf, tmp_path) -> Path:
    """A copy of the tiny GGUF (its cache key depends on name, size and mtime: each test gets a fresh one)."""
    path = tmp_path / "own.gguf"
    shutil.copy2(tiny_gguf, path)
    return path


def test_cache_is_built_once_then_hit(offline_env, private_gguf):
    state, first = _run_cache_state(private_gguf)
    assert state == "built"
    folder = _cache_folder(private_gguf)
    assert models.cache_is_valid(folder)
    assert Path(first["model"]["weights"]) == folder
    state, second = _run_cache_state(private_gguf)
    assert state == "hit"
    # no temp or stale folders next to the cache
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


def _flip_tensor_byte(folder: Path) -> None:
    """Change one byte inside the tensor data: the file still loads, with different weights."""
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x55
    weights.write_bytes(bytes(data))


def _truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _drop_marker(folder: Path) -> None:
    (folder / models.MARKER).unlink()


def _garble_marker(folder: Path) -> None:
    (folder / models.MARKER).write_text("{ not json", encoding="utf-8")


def _drop_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def _swap_config(folder: Path) -> None:
    """An edited config.json (e.g. someone adds auto_map / remote code): the checksum must catch it."""
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage", [_flip_tensor_byte, _truncate_weights, _drop_marker, _garble_marker,
                                    _drop_weights, _swap_config], ids=lambda f: f.__name__.strip("_"))
def test_corrupt_or_half_written_cache_is_rebuilt_never_used(offline_env, private_gguf, damage):
    state, _ = _run_cache_state(private_gguf)
    assert state == "built"
    folder = _cache_folder(private_gguf)
    good = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != models.MARKER}
    damage(folder)
    assert not models.cache_is_valid(folder)

    state, record = _run_cache_state(private_gguf)
    assert state == "built", "a damaged cache was used instead of rebuilt"
    assert models.cache_is_valid(folder)
    rebuilt = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != models.MARKER}
    assert rebuilt.keys() == good.keys()
    before, after = load(good["model.safetensors"]), load(rebuilt["model.safetensors"])
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), f"rebuilt tensor {name} differs from the first build"
    assert "auto_map" not in json.loads(rebuilt["config.json"])
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name], "temp or stale folders left"


def test_half_written_temp_folder_from_a_killed_writer_is_never_used(offline_env, private_gguf):
    """A writer killed mid-way leaves ``.<name>.XXXX.tmp`` (no marker, partial weights) beside the cache."""
    folder = _cache_folder(private_gguf)
    folder.parent.mkdir(parents=True)
    tmp = folder.parent / f".{folder.name}.abcd.tmp"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"\x00" * 100)
    # and a cache folder that was renamed into place without its marker
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    state, record = _run_cache_state(private_gguf)
    assert state == "built"
    assert models.cache_is_valid(folder)
    assert Path(record["model"]["weights"]) == folder


def test_ctrl_c_while_building_the_cache_leaves_nothing_half_written(offline_env, private_gguf, monkeypatch):
    real_save = models._save_plain

    def save_then_interrupt(model, folder):
        real_save(model, folder)  # the weights are on disk in the temp folder, the marker is not
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_save_plain", save_then_interrupt)
    result = prefill(private_gguf)
    assert_clean_outcome(result, {errors.INTERRUPTED})
    folder = _cache_folder(private_gguf)
    assert not folder.exists()
    assert list(folder.parent.iterdir()) == [], "a temp folder was left in the cache"
    monkeypatch.setattr(models, "_save_plain", real_save)
    state, _ = _run_cache_state(private_gguf)
    assert state == "built"


# -- safetensors directories -------------------------------------------------------------------------


@pytest.mark.parametrize("damage", [corrupt_safetensors_in, garble_safetensors_header_in],
                         ids=["truncated-weights", "garbled-header"])
def test_corrupt_safetensors_directory_is_one_clear_error(offline_env, tiny_model_dir, tmp_path, damage):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    damage(broken)
    result = prefill(broken)
    assert_clean_outcome(result, {errors.RUNTIME, errors.USAGE})
    assert result.exit_code != 0
    line = error_line(result)
    assert "broken-model" in line and "safetensors" in line.lower(), line


def test_directory_without_config_is_refused(offline_env, tiny_model_dir, tmp_path):
    nocfg = tmp_path / "no-config"
    shutil.copytree(tiny_model_dir, nocfg)
    (nocfg / "config.json").unlink()
    result = prefill(nocfg)
    assert_clean_outcome(result, {errors.USAGE})
    assert "config.json" in error_line(result)


# -- no pickles, no remote code ------------------------------------------------------------------------


def test_pickle_only_directory_is_refused_and_never_unpickled(offline_env, tiny_model_dir, tmp_path):
    pickled = pickle_only_model_dir(tiny_model_dir, tmp_path / "pickled")
    result = prefill(pickled)
    assert_clean_outcome(result, {errors.USAGE})
    line = error_line(result)
    assert "safetensors" in line and ".bin" in line, line
    assert not (pickled / "PICKLE_RAN").exists(), "the pickle was executed"


def test_pickle_beside_safetensors_is_ignored(offline_env, tiny_model_dir, tmp_path):
    both = tmp_path / "both"
    shutil.copytree(tiny_model_dir, both)
    pickled = pickle_only_model_dir(tiny_model_dir, tmp_path / "pickled")
    shutil.copy(pickled / "pytorch_model.bin", both / "pytorch_model.bin")
    result = prefill(both)
    assert_clean_outcome(result, {0})
    assert not (both / "PICKLE_RAN").exists(), "the pickle was executed"


def test_loaders_never_trust_remote_code_and_use_safetensors(offline_env, tiny_model_dir, tiny_gguf, tmp_path,
                                                            monkeypatch):
    """Spy on every transformers entry point the loader uses: trust_remote_code is passed and False,
    weights load with use_safetensors=True (the GGUF dequantization pass reads the GGUF itself)."""
    import transformers

    calls: list[tuple[str, dict]] = []

    def spy(cls_name: str):
        original = getattr(transformers, cls_name).from_pretrained.__func__

        def wrapper(cls, *args, **kwargs):
            calls.append((cls_name, dict(kwargs)))
            return original(cls, *args, **kwargs)

        monkeypatch.setattr(getattr(transformers, cls_name), "from_pretrained", classmethod(wrapper))

    for name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
        spy(name)
    gguf = tmp_path / "spy.gguf"
    shutil.copy2(tiny_gguf, gguf)
    for model in (tiny_model_dir, gguf):
        assert_clean_outcome(prefill(model), {0})
    assert {c for c, _ in calls} == {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"}
    for cls_name, kwargs in calls:
        assert kwargs.get("trust_remote_code") is False, (cls_name, kwargs)
        assert kwargs.get("local_files_only") is True, (cls_name, kwargs)
        if cls_name == "AutoModelForCausalLM" and "gguf_file" not in kwargs:
            assert kwargs.get("use_safetensors") is True, kwargs


def test_remote_code_model_is_refused_not_executed(offline_env, tiny_model_dir, tmp_path):
    """A directory whose config asks for custom code (auto_map): pbs never imports it."""
    remote = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    config["model_type"] = "evil"
    config["architectures"] = ["EvilModel"]
    (remote / "config.json").write_text(json.dumps(config))
    marker = remote / "EVIL_RAN"
    (remote / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    result = prefill(remote)
    assert_clean_outcome(result, {errors.RUNTIME, errors.USAGE, errors.UNSUPPORTED})
    assert result.exit_code != 0
    assert not marker.exists(), "remote code was executed"


# -- architectures the sparse path cannot serve ----------------------------------------------------------

_TINY = dict(num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)


def test_non_causal_models_run_dense_and_say_so(offline_env, tmp_path):
    """Decision (see integration.py): attention the sparse path cannot reproduce falls back to dense per
    layer; every such layer is reported dense with its reason, and stderr warns."""
    folder = build_tiny_model_of(tmp_path / "bert", "BertForMaskedLM", "BertConfig", hidden_size=64,
                                 intermediate_size=128, bos_token_id=0, eos_token_id=0, pad_token_id=0, **_TINY)
    result = prefill(folder, input=b"Z" * 100)
    assert_clean_outcome(result, {0})
    record = json.loads(result.stdout)
    assert record["layers"]
    assert all(layer["path"] == "dense" and layer["reason"] for layer in record["layers"]), record["layers"]
    assert "warning" in result.stderr.lower() and "dense" in result.stderr.lower(), (
        f"no warning on stderr that PBS did not run: {result.stderr!r}")


def test_sliding_window_and_softcapped_models_run_sparse_and_say_why(offline_env, tmp_path):
    """Mistral's sliding window runs band plans; Gemma-2 (soft-capped logits, local and global layers) runs
    band plans on its local layers and PBS selection on its global ones, the cap applied in the kernel."""
    cases = {
        "mistral-sliding": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=16), ["sliding window 16"] * 2),
        "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(head_dim=16, sliding_window=24),
                   ["sliding window 24, softcap 50", "causal prefill, softcap 50"]),
    }
    for name, (model_cls, config_cls, fields, reasons) in cases.items():
        folder = build_tiny_model_of(tmp_path / name, model_cls, config_cls, hidden_size=64, intermediate_size=128,
                                     num_key_value_heads=2, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                     **fields, **_TINY)
        result = prefill(folder, "--threshold", "0.5", input=b"Z" * 100)
        assert_clean_outcome(result, {0})
        layers = json.loads(result.stdout)["layers"]
        assert [layer["path"] for layer in layers] == ["pbs", "pbs"], (name, layers)
        assert [layer["reason"] for layer in layers] == reasons, (name, layers)


def test_model_without_attention_layers_warns_that_nothing_is_sparse(offline_env, tmp_path):
    folder = build_tiny_model_of(tmp_path / "mamba", "MambaForCausalLM", "MambaConfig", hidden_size=64,
                                 num_hidden_layers=2, state_size=4, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    result = prefill(folder, input=b"Z" * 100)
    assert_clean_outcome(result, {0, errors.UNSUPPORTED})
    if result.exit_code == 0:
        assert json.loads(result.stdout)["layers"] == []
        assert "warning" in result.stderr.lower(), result.stderr


def test_only_models_py_loads_weights_and_nothing_unpickles():
    """Source guard: every ``from_pretrained`` call sits in pbs_cli/engine/models.py (whose flags the spy test above
    checks), and no module calls ``torch.load`` or ``pickle.load(s)``."""
    import ast

    import pbs_cli
    import pbs_kernels

    offenders, in_models = [], 0
    for package in (pbs_cli, pbs_kernels):
        for path in Path(package.__file__).parent.rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                    owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
                    name = node.func.attr
                    if name == "from_pretrained":
                        if path.name != "models.py":
                            offenders.append(f"{path}:{node.lineno} from_pretrained")
                        else:
                            in_models += 1
                    if (owner, name) in {("torch", "load"), ("pickle", "load"), ("pickle", "loads")}:
                        offenders.append(f"{path}:{node.lineno} {owner}.{name}")
    assert offenders == []
    assert in_models >= 3, "the walker found no from_pretrained calls in models.py: the guard would be vacuous"
