"""The `pbs` Typer application: composes the command modules, nothing else.

Commands are registered lazily: ``pbs viz-mask`` imports only ``commands/viz_mask.py`` (and what
it imports), not the modules of the other commands, which pull in torch, transformers and the
kernels at import time. ``pbs --help`` lists the commands from their docstrings, read from the
source without importing the modules.
"""


import ast
import difflib
import importlib
import inspect
import os
from pathlib import Path
from typing import Annotated

# Progress is shown with Rich on stderr; silence the tqdm bars of transformers/huggingface_hub (tqdm
# reads this variable when it is first imported, which happens later, inside the commands).
os.environ.setdefault("TQDM_DISABLE", "1")

import typer
try:  # newer typer vendors click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
    from typer.exceptions import Abort as ClickAbort
    from typer._click.exceptions import UsageError as ClickUsageError
except ImportError:
    from click.exceptions import Abort as ClickAbort
    from click.exceptions import ClickException, NoArgsIsHelpError
    from click.exceptions import UsageError as ClickUsageError
from typer.core import TyperCommand, TyperGroup
from typer.main import get_command_from_info, get_group_from_info
from typer.models import CommandInfo, TyperInfo

from . import __version__, console, errors

# name -> (module under pbs_cli.commands, attribute): a function ``command`` or a Typer ``app``
# (a command group). The order is that of `pbs --help`: single commands first, then groups.
COMMANDS: dict[str, tuple[str, str]] = {
    "prefill": ("prefill", "command"),
    "env": ("env", "command"),
    "viz-mask": ("viz_mask", "command"),
    "profile": ("profile", "command"),
    "eval": ("eval", "command"),
    "calibrate": ("calibrate", "command"),
    "report": ("report", "app"),
}
_PRETTY_EXCEPTIONS_SHORT = True
_MARKUP = "rich"


def load_command(name: str):
    """The click command of ``name``, built from its module (imported now)."""
    module_name, attr = COMMANDS[name]
    target = getattr(importlib.import_module(f"{__package__}.commands.{module_name}"), attr)
    if attr == "app":
        return get_group_from_info(TyperInfo(target, name=name), pretty_exceptions_short=_PRETTY_EXCEPTIONS_SHORT,
                                   suggest_commands=True, rich_markup_mode=_MARKUP)
    return get_command_from_info(CommandInfo(name=name, callback=target),
                                 pretty_exceptions_short=_PRETTY_EXCEPTIONS_SHORT, rich_markup_mode=_MARKUP)


def listed_help(name: str) -> str:
    """The help text of command ``name`` as `pbs --help` lists it, read from its module's source
    without importing it: the ``command`` function's docstring (or a later ``command.__doc__ = X``),
    or the ``help=`` of the group's ``typer.Typer(...)``. Imports the module when the source says
    it some other way."""
    module_name, attr = COMMANDS[name]
    path = Path(__file__).parent / "commands" / f"{module_name}.py"
    try:
        found = _help_in_source(ast.parse(path.read_text(encoding="utf-8"), str(path)), attr)
    except (OSError, SyntaxError, ValueError):
        found = None
    return found if found is not None else (load_command(name).help or "")


def _help_in_source(tree: ast.Module, attr: str) -> str | None:
    constants, doc = {}, None
    for node in tree.body:
        if not isinstance(node, ast.Assign):
            if attr == "command" and isinstance(node, ast.FunctionDef) and node.name == "command":
                doc = ast.get_docstring(node, clean=False)
            continue
        value = node.value
        for target in node.targets:
            if isinstance(target, ast.Name) and isinstance(value, ast.Constant) and isinstance(value.value, str):
                constants[target.id] = value.value
            elif (attr == "command" and isinstance(target, ast.Attribute) and target.attr == "__doc__"
                  and getattr(target.value, "id", None) == "command"):
                doc = value.value if isinstance(value, ast.Constant) else constants.get(getattr(value, "id", None))
                if doc is None:
                    return None
            elif attr == "app" and getattr(target, "id", None) == "app" and isinstance(value, ast.Call):
                helps = [kw.value for kw in value.keywords if kw.arg == "help"]
                if not helps or not isinstance(helps[0], ast.Constant):
                    return None
                doc = helps[0].value
    return inspect.cleandoc(doc) if isinstance(doc, str) else None


class LazyGroup(TyperGroup):
    """A Typer group whose commands are imported when first used; its own help lists them from
    their source without importing them."""

    _listing = False

    def list_commands(self, ctx) -> list[str]:
        return [*COMMANDS, *(n for n in self.commands if n not in COMMANDS)]

    def get_command(self, ctx, cmd_name: str):
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            if self._listing:  # only the name and help text are shown: don't import the module
                return TyperCommand(name=cmd_name, help=listed_help(cmd_name), rich_markup_mode=_MARKUP)
            self.commands[cmd_name] = load_command(cmd_name)
        return self.commands.get(cmd_name)

    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except ClickUsageError as exc:  # Typer suggests only loaded commands: suggest the others too
            if self.suggest_commands and args and "Did you mean" not in exc.message:
                matches = difflib.get_close_matches(args[0], self.list_commands(ctx))
                if matches:
                    exc.message = f"{exc.message.rstrip('.')}. Did you mean {', '.join(repr(m) for m in matches)}?"
            raise

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode: bool = True, **extra):
        """Click's main, with the option parser's errors (unknown option or command, a value out of range,
        a missing argument) as one ``error:`` line on stderr and exit 2, like the commands' own usage errors
        (``console.fail``), instead of Typer's boxed panel."""
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as exc:  # `pbs` or `pbs report` alone: exit 2 after the help (Typer printed it)
            if not standalone_mode:
                raise
            code = exc.exit_code
        except ClickException as exc:
            if not standalone_mode:
                raise
            code = console.fail(usage_line(exc), exc.exit_code).exit_code
        except ClickAbort:
            if not standalone_mode:
                raise
            code = console.fail("aborted", errors.RUNTIME).exit_code
        if not standalone_mode:
            return code
        raise SystemExit(code if isinstance(code, int) else errors.OK)

    def format_help(self, ctx, formatter) -> None:
        self._listing = True
        try:
            return super().format_help(ctx, formatter)
        finally:
            self._listing = False


def usage_line(exc: ClickException) -> str:
    """One line for an option parser error: its message and where the valid choices are listed."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if ctx is None:
        return message
    return f"{message.rstrip('.')} (see '{ctx.command_path} --help')"


app = typer.Typer(
    name="pbs",
    cls=LazyGroup,
    help="Permuted Block-Sparse Attention: faster long-document prefill, measured on your model, text and GPU.",
    no_args_is_help=True,
    pretty_exceptions_short=_PRETTY_EXCEPTIONS_SHORT,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=_MARKUP,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pbs {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    console.set_debug(debug)


def main() -> None:
    console.set_one_command_process()
    app()
