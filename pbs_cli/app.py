"""The `pbs` Typer application: composes the command modules, nothing else."""

from __future__ import annotations

import os
from typing import Annotated

# Progress is shown with Rich on stderr; silence the tqdm bars of transformers/huggingface_hub (tqdm
# reads this variable when it is first imported, which happens later, inside the commands).
os.environ.setdefault("TQDM_DISABLE", "1")

import typer

from . import __version__, console
from .commands import calibrate, env, prefill, profile, report, viz_mask
from .commands import eval as eval_cmd

app = typer.Typer(
    name="pbs",
    help="Permuted Block-Sparse Attention: faster long-document prefill, measured on your model, text and GPU.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
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


app.command("prefill")(prefill.command)
app.command("env")(env.command)
app.command("viz-mask")(viz_mask.command)
app.command("profile")(profile.command)
app.add_typer(report.app, name="report")
app.command("eval")(eval_cmd.command)
app.command("calibrate")(calibrate.command)


def main() -> None:
    app()
