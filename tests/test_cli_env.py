"""`pbs env` and `pbs --version`."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from fixtures import offline_env  # noqa: F401  (pytest fixture)
from pbs_cli import __version__
from pbs_cli.app import app


def test_version():
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"pbs {__version__}"


def test_env_json_reports_versions_device_and_paths(offline_env):
    res = CliRunner().invoke(app, ["env", "--json"])
    assert res.exit_code == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["torch"] == torch.__version__
    assert info["default_device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert info["gpu"] is None if not torch.cuda.is_available() else info["gpu"]["count"] >= 1
    assert isinstance(info["triton_kernels"]["usable"], bool) and info["triton_kernels"]["why"]
    if not torch.cuda.is_available() and info["triton_kernels"]["usable"]:
        assert "TRITON_INTERPRET" in info["triton_kernels"]["why"]
    assert info["cache_dir"] == str(offline_env / "pbs-cache")
    assert info["profiles_dir"] == str(offline_env / "pbs-config")
    assert "default" in info["profiles"] and info["model_aliases"]["llama"].startswith("embedded:")


def test_env_table(offline_env):
    res = CliRunner().invoke(app, ["env"])
    assert res.exit_code == 0, res.stderr
    for label in ("torch", "transformers", "triton kernels", "cache dir", "profiles"):
        assert label in res.stdout


def test_env_names_the_kernel_settings_in_effect(offline_env, monkeypatch):
    """The variables that pick or change the kernel (PBS_PERM_MODE, ...) appear when set, and only then."""
    for name in ("PBS_BACKEND", "PBS_PERM_MODE", "PBS_CUDA_GRAPHS", "PBS_AUTOTUNE"):
        monkeypatch.delenv(name, raising=False)
    res = CliRunner().invoke(app, ["env", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["kernel_settings"] == {}
    monkeypatch.setenv("PBS_PERM_MODE", "persistent")
    monkeypatch.setenv("PBS_CUDA_GRAPHS", "0")
    res = CliRunner().invoke(app, ["env", "--json"])
    assert json.loads(res.stdout)["kernel_settings"] == {"PBS_PERM_MODE": "persistent", "PBS_CUDA_GRAPHS": "0"}
    res = CliRunner().invoke(app, ["env"], terminal_width=200)
    assert res.exit_code == 0 and "PBS_PERM_MODE=persistent" in res.stdout
