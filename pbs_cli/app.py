"""The `pbs` Typer application: composes the command modules, nothing else.

Every command is registered up front through Typer's public API. Starting stays fast because the command
modules import only Typer, the shared options, the console and the light engine modules at their top; torch,
transformers, the kernels and the heavy engine and render modules are imported inside the command that needs
them (`pbs --help` imports no torch, `pbs viz-mask` no transformers; tests/test_app.py checks both).
"""

import os
from typing import Annotated

# Progress is shown with Rich on stderr; silence the tqdm bars of transformers/huggingface_hub (tqdm
# reads this variable when it is first imported, which happens later, inside the commands).
os.environ.setdefault("TQDM_DISABLE", "1")

import typer
from typer.core import TyperGroup

from . import __version__, console, errors
from .commands import calibrate, env, prefill, profile, report, viz_mask
from .commands import eval as evaluate

HELP = "Permuted Block-Sparse Attention: faster long-document prefill, measured on your model, text and GPU."


class OneLineErrors(TyperGroup):
    """Typer's group, with the option parser's errors (unknown option or command, a value out of range, a
    missing argument) as one ``error:`` line on stderr and exit 2, like the commands' own usage errors
    (``console.fail``), instead of Typer's boxed panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode: bool = True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except (typer.TyperException, typer.Abort) as exc:  # TyperException: the parser's errors
            if not standalone_mode:
                raise
            code = _exit_code(exc)
        if not standalone_mode:
            return code
        raise SystemExit(code if isinstance(code, int) else errors.OK)


def _exit_code(exc: Exception) -> int:
    """Report a parser error or an abort as one line; the exit code. `pbs` or `pbs report` alone
    (``no_args_is_help``) printed the help already and exits 2 without a line."""
    if isinstance(exc, typer.Abort):
        return console.fail("aborted", errors.RUNTIME).exit_code
    if type(exc).__name__ == "NoArgsIsHelpError":  # as Typer's own error formatter tells it apart
        return exc.exit_code
    return console.fail(usage_line(exc), exc.exit_code).exit_code


def usage_line(exc: typer.TyperException) -> str:
    """One line for an option parser error: its message and where the valid choices are listed."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if ctx is None:
        return message
    return f"{message.rstrip('.')} (see '{ctx.command_path} --help')"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pbs {__version__}")
        raise typer.Exit()


def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    console.set_debug(debug)


app = typer.Typer(
    name="pbs",
    cls=OneLineErrors,
    help=HELP,
    no_args_is_help=True,
    pretty_exceptions_short=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)
app.callback()(_root)
# the order of `pbs --help`: single commands first, then the group
app.command("prefill")(prefill.command)
app.command("env")(env.command)
app.command("viz-mask")(viz_mask.command)
app.command("profile")(profile.command)
app.command("eval")(evaluate.command)
app.command("calibrate")(calibrate.command)
app.add_typer(report.app, name="report")


def main() -> None:
    console.set_one_command_process()
    app()
