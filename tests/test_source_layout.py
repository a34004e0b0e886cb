"""The repository root must not shadow installed packages.

``python -m pytest``, ``python -m pbs_cli`` and ``python -c ...`` put the current directory first on
``sys.path``. A top-level folder of this repository that is a package (it has an ``__init__.py``) is
then imported in place of any installed distribution of the same name: a ``kernels/__init__.py`` here
once hid Hugging Face's ``kernels`` package, which transformers imports, and broke ``from transformers
import LlamaConfig`` from a clone. ``kernels/`` and ``profiles/`` are source roots that hold
``pbs_kernels`` and ``pbs_profiles``; only ``pbs_cli`` is a package at the top level.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OWN_TOP_LEVEL_PACKAGES = {"pbs_cli"}


def _run_from_root(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_only_our_own_packages_sit_at_the_repository_root():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages == OWN_TOP_LEVEL_PACKAGES, (
        f"top-level packages {sorted(packages - OWN_TOP_LEVEL_PACKAGES)} would shadow installed packages of "
        "the same name; move them one level down (kernels/pbs_kernels/) and map them in pyproject.toml")


@pytest.mark.parametrize("args", [
    ("-c", "from transformers import LlamaConfig"),
    ("-c", "import pbs_kernels, pbs_profiles, pbs_cli.engine.integration"),
    ("-m", "pbs_cli", "--help"),
], ids=["transformers", "our-packages", "pbs-help"])
def test_imports_work_from_the_repository_root(args):
    result = _run_from_root(*args)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.skipif(not _hf_kernels_installed(), reason="Hugging Face's kernels package is not installed")
def test_kernels_resolves_to_hugging_face_package_from_the_repository_root():
    result = _run_from_root("-c", "import kernels; print(kernels.__file__)")
    assert result.returncode == 0, result.stderr[-2000:]
    origin = Path(result.stdout.strip()).resolve()
    assert (ROOT / "kernels") not in origin.parents, f"'import kernels' found this repository's {origin}"
