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
