"""`pbs env`'s facts: versions, device, whether the Triton kernels can run, the embedded models, where
caches and presets live, the supported model families."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from typing import Any

from ..errors import UnsupportedError, UsageError
from ..options import KERNEL_SETTINGS, kernel_setting_problems
from .families import FAMILIES


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def triton_status() -> dict[str, Any]:
    """Whether the Triton kernels can run here, and why not when they cannot."""
    import torch

    from pbs_kernels.backend import triton_available

    backend = os.environ.get("PBS_BACKEND", "auto").lower()
    kernels = importlib.util.find_spec("pbs_kernels.triton.attention") is not None
    if backend == "reference":
        return {"usable": False, "why": "PBS_BACKEND=reference forces the PyTorch reference", "kernels": kernels}
    if not triton_available():
        return {"usable": False, "why": "triton is not installed; the PyTorch reference runs instead",
                "kernels": kernels}
    if not kernels:
        return {"usable": False, "why": "this build has no Triton attention kernel yet; the PyTorch reference runs",
                "kernels": kernels}
    if torch.cuda.is_available():
        return {"usable": True, "why": f"CUDA device {torch.cuda.get_device_name(0)}", "kernels": kernels}
    if os.environ.get("TRITON_INTERPRET") == "1" and backend == "triton":
        return {"usable": True, "why": "TRITON_INTERPRET=1 on CPU (slow; fp16/fp32 only)", "kernels": kernels}
    return {"usable": False, "why": "no CUDA device; the PyTorch reference runs on CPU", "kernels": kernels}


def collect() -> dict[str, Any]:
    import torch

    from . import models, presets
    from .reports import environment

    env = environment()
    env["accelerate"] = _version("accelerate")
    env["gguf"] = _version("gguf")
    env["typer"] = _version("typer")
    env["rich"] = _version("rich")
    env["kernel_settings"] = {name: os.environ[name] for name in KERNEL_SETTINGS if name in os.environ}
    env["kernel_setting_problems"] = kernel_setting_problems()
    try:
        device = models.resolve_device("auto")
    except UnsupportedError as exc:  # PBS_BACKEND=triton where Triton cannot run: listed here, refused elsewhere
        device = "cpu"
        env["kernel_setting_problems"]["PBS_BACKEND"] = str(exc)
    env["default_device"] = device
    env["default_dtype"] = str(models.resolve_dtype("auto", device)).removeprefix("torch.")
    env["triton_kernels"] = triton_status()
    embedded = {}
    for key, (display, package, requirement) in models.EMBEDDED.items():
        spec = importlib.util.find_spec(package)
        entry: dict[str, Any] = {"name": display, "installed": spec is not None, "requirement": requirement}
        if spec is not None:
            try:
                gguf = models.embedded_gguf(key)
                entry["gguf"] = str(gguf)
                folder = models.cache_dir_for(models.ModelSpec(key, "embedded", display, gguf))
                entry["cache"] = str(folder)
                entry["cached"] = (folder / models.MARKER).is_file()
            except Exception as exc:  # noqa: BLE001 - reported, not fatal
                entry["problem"] = str(exc)
        embedded[key] = entry
    env["embedded_models"] = embedded
    env["cache_dir"] = str(models.cache_root())
    env["profiles_dir"] = str(presets.user_profiles_dir())
    env["profiles"] = sorted(presets.profiles())
    env["profile_problems"] = presets.profile_problems()
    try:
        env["model_aliases"] = {name: a.source for name, a in sorted(presets.model_aliases().items())}
    except UsageError as exc:  # a broken models.toml in the profiles folder: say so, show the rest
        env["model_aliases"], env["profile_problems"]["models"] = {}, str(exc)
    env["cuda_devices"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env["model_families"] = [family.to_dict() for family in FAMILIES]
    return env
