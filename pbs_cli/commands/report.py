"""`pbs report show FILE` and `pbs report compare A B`: read saved `pbs profile` results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import command_boundary, fail
from ..errors import UsageError

SHOW_FORMATS = ("table", "json", "jsonl", "csv", "markdown", "html")

app = typer.Typer(name="report", help="Show or compare saved `pbs profile` results (.json or .jsonl).",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)


@app.command("show")
@command_boundary
def show(
    file: Annotated[Path, typer.Argument(help="A .json or .jsonl file written by `pbs profile`.", show_default=False)],
    fmt: Annotated[str, typer.Option("--format", "-f", help="table, json, jsonl, csv, markdown or html.")] = "table",
) -> None:
    """Print a saved profile as a table (or convert it to another format on stdout)."""
    if fmt not in SHOW_FORMATS:
        raise UsageError(f"unknown --format {fmt!r}; use one of {', '.join(SHOW_FORMATS)}")
    from ..engine import report_files
    from ..render.report import show as show_doc

    show_doc(report_files.load(file), fmt, file)


@app.command("compare")
@command_boundary
def compare_cmd(
    a: Annotated[Path, typer.Argument(help="Baseline profile (.json/.jsonl).", show_default=False)],
    b: Annotated[Path, typer.Argument(help="New profile (.json/.jsonl).", show_default=False)],
    fail_if_slower: Annotated[float | None, typer.Option("--fail-if-slower", min=0.0, help="Exit 1 when pbs got "
                                                         "slower than A by more than this percent at any "
                                                         "length.")] = None,
    backend: Annotated[str, typer.Option("--backend", help="Backend that --fail-if-slower checks.")] = "pbs",
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison rows as JSON.")] = False,
    allow_different: Annotated[bool, typer.Option("--allow-different", help="Compare runs of different shapes, "
                                                  "dtypes, PBS parameters or workloads anyway (not with "
                                                  "--fail-if-slower).")] = False,
) -> None:
    """Per matching length/backend(/layer): medians of A and B, the difference, and whether it is within the
    spread (the larger interquartile range of the two runs). A and B must have measured the same setup
    (shape, dtype, PBS parameters, workload); the machine and versions may differ."""
    from ..engine import report_files
    from ..render.report import show_comparison

    comparison = report_files.compare_files(a, b, allow_different=allow_different,
                                             fail_if_slower=fail_if_slower, backend=backend)
    show_comparison(comparison, as_json)
    if comparison.verdict is not None:
        raise fail(comparison.verdict.message, comparison.verdict.exit_code)
