"""Consoles (results to stdout, everything else to stderr) and the error boundary of every command."""

from __future__ import annotations

import contextlib
import functools
import gc
import sys
import traceback

import typer
from rich.console import Console

from . import errors

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)  # diagnostics stay one line each (logs, grep), like `out`

_state = {"debug": False, "one_command": False}  # debug: `pbs --debug`


def set_one_command_process() -> None:
    """Called by the ``pbs`` entry point: this process runs one command and exits (see ``heavy_imports``)."""
    _state["one_command"] = True


def set_debug(on: bool) -> None:
    _state["debug"] = on


def debug_enabled() -> bool:
    return _state["debug"]


@contextlib.contextmanager
def heavy_imports():
    """Import torch and friends with the cyclic garbage collector paused; in the ``pbs`` process,
    then freeze what they allocated.

    ``import torch`` creates about a million long-lived objects that the collector would rescan in
    every full collection, including the one at interpreter exit (0.4-0.8 s of a 1.2-2 s start on a
    2-core CPU). Frozen objects are never scanned again; objects created later are collected as
    usual. Only the one-command ``pbs`` process freezes: a long-lived host (tests, a notebook
    calling the app) keeps its collector untouched.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if _state["one_command"]:
            gc.freeze()
        if was_enabled:
            gc.enable()


def fail(message: str, code: int) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True) if err.is_terminal else print(
        f"error: {message}", file=sys.stderr
    )
    return typer.Exit(code)


def command_boundary(fn=None, *, check_settings: bool = True):
    """Turn exceptions into one clear stderr line and a documented exit code (see ``errors``). First,
    unless ``check_settings`` is False (``pbs env``, which reports them), refuse ``PBS_*`` kernel
    settings the kernels do not know (``options.check_kernel_settings``)."""
    if fn is None:
        return functools.partial(command_boundary, check_settings=check_settings)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            if check_settings:
                from .options import check_kernel_settings

                check_kernel_settings()
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            raise fail("interrupted", errors.INTERRUPTED) from None
        except errors.PBSError as exc:
            if debug_enabled():
                traceback.print_exc()
            raise fail(str(exc), exc.exit_code) from None
        except Exception as exc:  # noqa: BLE001 - the boundary: nothing escapes as a traceback
            if debug_enabled():
                traceback.print_exc()
            if errors.is_out_of_memory(exc):
                raise fail(f"out of memory: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                           "try a shorter --seq-len, --dtype bfloat16, or fewer layers", errors.OUT_OF_MEMORY) from None
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise fail(f"{type(exc).__name__}: {first} (rerun with --debug for the traceback)",
                       errors.RUNTIME) from None

    return wrapper
