"""Consoles (results to stdout, everything else to stderr) and the error boundary of every command."""

from __future__ import annotations

import functools
import os
import sys
import traceback

import typer
from rich.console import Console

from . import errors

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)  # diagnostics stay one line each (logs, grep), like `out`

_state = {"debug": bool(os.environ.get("PBS_DEBUG"))}


def set_debug(on: bool) -> None:
    _state["debug"] = on


def debug_enabled() -> bool:
    return _state["debug"]


def fail(message: str, code: int) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True) if err.is_terminal else print(
        f"error: {message}", file=sys.stderr
    )
    return typer.Exit(code)


def _is_oom(exc: BaseException) -> bool:
    return errors.is_out_of_memory(exc)


def command_boundary(fn):
    """Turn exceptions into one clear stderr line and a documented exit code (see ``errors``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
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
            if _is_oom(exc):
                raise fail(f"out of memory: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                           "try a shorter --seq-len, --dtype bfloat16, or fewer layers", errors.OUT_OF_MEMORY) from None
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise fail(f"{type(exc).__name__}: {first} (rerun with --debug for the traceback)", errors.RUNTIME) from None

    return wrapper
