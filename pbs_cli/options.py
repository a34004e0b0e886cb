"""Options and checks that several commands share, defined once so that the commands cannot drift apart.

The ``Annotated`` aliases are the options whose meaning and help are the same in every command that has
them (``--force``, ``--device``, ``--dtype``: ``models.resolve_device`` and ``resolve_dtype`` read their
values; ``--model`` of the commands that load weights, the PBS parameters, ``--json``, ``--output``); the
``check_*`` functions run before any work starts (no model load, no file written) and raise
``UsageError`` (exit 2) or ``UnsupportedError`` (exit 3) with one line that says what to do:

- ``check_outputs``: every output path of a command at once, so that two options never name the
  same file (``-o s.json --trace s.json``) and nothing is overwritten without ``--force``;
- ``check_trace_path``: ``--trace`` writes Chrome trace JSON, so its name ends in .json or .json.gz;
- ``check_kernel_settings``: the ``PBS_*`` environment variables that choose kernels
  (``KERNEL_SETTINGS``); ``console.command_boundary`` runs it before every command but ``pbs env``,
  which lists what is wrong instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Mapping

import typer

from .errors import UnsupportedError, UsageError

DEFAULT_MODEL = "llama"  # --model of the commands that load weights, when not given

Force = Annotated[bool, typer.Option("--force", help="Overwrite output files that exist.")]
Model = Annotated[str, typer.Option("--model", "-m", help="Alias, local directory, .gguf file, or Hugging Face id "
                                    "in the local cache.")]
Threshold = Annotated[float | None, typer.Option("--threshold", "-t", help="Top-p share of block attention to keep, in "
                                                 "(0, 1]; 1.0 = dense.")]
BlockSize = Annotated[int | None, typer.Option("--block-size", help="Tokens per block (power of two >= 16).")]
SegmentSize = Annotated[int | None, typer.Option("--segment-size", help="Permutation segment, a multiple of the block "
                                                 "size.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")]
RecordOutput = Annotated[Path | None, typer.Option("--output", "-o", help="Also save the JSON record here.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16 or "
                                    "float32.")]

# name -> the values it accepts (README, "Development"); "" counts as unset
KERNEL_SETTINGS: dict[str, tuple[str, ...]] = {
    "PBS_BACKEND": ("auto", "reference", "triton"),
    "PBS_PERM_MODE": ("auto", "remap", "gather", "tma", "persistent"),
    "PBS_CUDA_GRAPHS": ("0", "1"),
    "PBS_AUTOTUNE": ("0", "1"),
}
TRACE_SUFFIXES = (".json", ".json.gz")


def check_outputs(paths: Mapping[str, Path | None], force: bool) -> dict[str, Path]:
    """The output files a command was asked for, ``{option: path}`` (None: not asked), checked before any
    work: two options naming the same file, a directory, a missing or read-only folder, or a file that
    exists without ``--force`` is a usage error. Returns the named ones."""
    from .engine.reports import check_output_path

    named = {option: Path(path) for option, path in paths.items() if path is not None}
    seen: dict[str, str] = {}
    for option, path in named.items():
        key = os.path.realpath(path.expanduser())
        if key in seen:
            raise UsageError(f"{seen[key]} and {option} both name {str(path)!r}; give each output its own file")
        seen[key] = option
    for option, path in named.items():
        if option == "--trace":
            check_trace_path(path)
        check_output_path(path, force)
    return named


def check_trace_path(path: Path) -> Path:
    """``--trace`` writes a Chrome trace: JSON, gzip-compressed when the name ends in .gz."""
    if not str(path).lower().endswith(TRACE_SUFFIXES):
        raise UsageError(f"--trace {str(path)!r}: the trace is Chrome trace JSON; name it *.json or *.json.gz")
    return Path(path)


def kernel_setting_problems(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{variable: what is wrong}`` for every ``PBS_*`` kernel setting with a value the kernels do not
    know (an empty value counts as unset)."""
    environ = os.environ if environ is None else environ
    problems = {}
    for name, allowed in KERNEL_SETTINGS.items():
        value = environ.get(name)
        if value is None or value == "":
            continue
        shown = value.lower() if name == "PBS_BACKEND" else value  # the kernels read PBS_BACKEND in any case
        if shown not in allowed:
            problems[name] = f"{name}={value[:40]!r} is not a valid value; use one of {', '.join(allowed)}, or unset it"
    return problems


def check_kernel_settings(environ: Mapping[str, str] | None = None) -> None:
    """Refuse unknown ``PBS_*`` values (exit 2) and ``PBS_BACKEND=triton`` where Triton cannot run (exit 3):
    without a CUDA GPU, unless ``TRITON_INTERPRET=1`` runs its CPU interpreter."""
    environ = os.environ if environ is None else environ
    problems = kernel_setting_problems(environ)
    if problems:
        raise UsageError(next(iter(problems.values())))
    if environ.get("PBS_BACKEND", "").lower() != "triton":
        return
    from pbs_kernels.backend import triton_available

    if not triton_available():
        raise UnsupportedError("PBS_BACKEND=triton, but triton is not installed; install it or unset PBS_BACKEND")
    import torch

    if not torch.cuda.is_available() and environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise UnsupportedError("PBS_BACKEND=triton needs a CUDA GPU and there is none; unset PBS_BACKEND, or set "
                               "TRITON_INTERPRET=1 for Triton's (slow) CPU interpreter")


def check_triton_device(device: str, environ: Mapping[str, str] | None = None) -> None:
    """``PBS_BACKEND=triton`` runs the Triton kernels on the tensors of ``device``: on a CPU only through
    ``TRITON_INTERPRET=1`` (else Triton finds no driver, deep inside the first kernel launch): exit 3."""
    environ = os.environ if environ is None else environ
    if (environ.get("PBS_BACKEND", "").lower() == "triton" and not str(device).startswith("cuda")
            and environ.get("TRITON_INTERPRET", "0") in ("", "0")):
        raise UnsupportedError(f"PBS_BACKEND=triton runs the Triton kernels on {device} tensors only through "
                               "TRITON_INTERPRET=1 (slow); set it, use a CUDA --device, or unset PBS_BACKEND")
