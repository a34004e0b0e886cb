"""`pbs report show FILE` and `pbs report compare A B`: read saved `pbs profile` results."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Iterator

import typer

from ..console import command_boundary, fail
from ..errors import RUNTIME, UsageError
from ..render.tables import print_table
from ..render.report_formats import compare, compare_table, describe, load, render, rich_table, setup_differences

@contextlib.contextmanager
def _readable(*paths: Path) -> Iterator[None]:
    """A saved file whose records have the wrong shape (hand-edited, damaged) is a usage error, not a crash."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        names = " / ".join(repr(str(p)) for p in paths)
        raise UsageError(f"{names}: a record is malformed ({type(exc).__name__}: {str(exc)[:120]}); pass files "
                         "written by `pbs profile`") from None


app = typer.Typer(name="report", help="Show or compare saved `pbs profile` results (.json or .jsonl).",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)


@app.command("show")
@command_boundary
def show(
    file: Annotated[Path, typer.Argument(help="A .json or .jsonl file written by `pbs profile`.", show_default=False)],
    fmt: Annotated[str, typer.Option("--format", "-f", help="table, json, jsonl, csv, markdown or html.")] = "table",
) -> None:
    """Print a saved profile as a table (or convert it to another format on stdout)."""
    formats = ("table", "json", "jsonl", "csv", "markdown", "html")
    if fmt not in formats:
        raise UsageError(f"unknown --format {fmt!r}; use one of {', '.join(formats)}")
    doc = load(file)
    with _readable(file):
        text = None if fmt == "table" else render(doc, fmt)
        table = rich_table(doc) if fmt == "table" else None
    if table is not None:
        print_table(table)
    else:
        typer.echo(text, nl=False)


@app.command("compare")
@command_boundary
def compare_cmd(
    a: Annotated[Path, typer.Argument(help="Baseline profile (.json/.jsonl).", show_default=False)],
    b: Annotated[Path, typer.Argument(help="New profile (.json/.jsonl).", show_default=False)],
    fail_if_slower: Annotated[float | None, typer.Option("--fail-if-slower", min=0.0, help="Exit 1 when pbs got "
                                                         "slower than A by more than this percent at any length.")] = None,
    backend: Annotated[str, typer.Option("--backend", help="Backend that --fail-if-slower checks.")] = "pbs",
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison rows as JSON.")] = False,
    allow_different: Annotated[bool, typer.Option("--allow-different", help="Compare runs of different shapes, "
                                                  "dtypes, PBS parameters or workloads anyway (not with "
                                                  "--fail-if-slower).")] = False,
) -> None:
    """Per matching length/backend(/layer): medians of A and B, the difference, and whether it is within the
    spread (the larger interquartile range of the two runs). A and B must have measured the same setup
    (shape, dtype, PBS parameters, workload); the machine and versions may differ."""
    import json

    doc_a, doc_b = load(a), load(b)
    with _readable(a, b):
        different = setup_differences(doc_a, doc_b)
    if different and (not allow_different or fail_if_slower is not None):
        fix = ("--fail-if-slower needs runs of the same setup" if allow_different
               else "compare runs of one setup, or pass --allow-different to see the table anyway")
        raise UsageError(f"{str(a)!r} and {str(b)!r} measured different setups ({'; '.join(different)[:300]}); {fix}")
    with _readable(a, b):
        rows = compare(doc_a, doc_b)
        table = None if as_json else compare_table(rows, f"A: {a} ({describe(doc_a)})\nB: {b} ({describe(doc_b)})")
    if not rows:
        raise UsageError(f"{str(a)!r} and {str(b)!r} have no (length, backend) measured in both; nothing to compare")
    if as_json:
        typer.echo(json.dumps({"a": str(a), "b": str(b), "rows": rows}, indent=2))
    else:
        print_table(table)
    if fail_if_slower is not None:
        checked = [r for r in rows if r["backend"] == backend]
        if not checked:
            raise UsageError(f"no {backend!r} rows in both files; --fail-if-slower has nothing to check")
        slower = [r for r in checked if r["delta_pct"] > fail_if_slower]
        if slower:
            worst = max(slower, key=lambda r: r["delta_pct"])
            noise = " (within the runs' spread: rerun with more --iters to confirm)" if worst["noise"] else ""
            raise fail(f"{backend} got slower by more than {fail_if_slower:g}% at {len(slower)} length(s); worst "
                       f"{worst['delta_pct']:+.1f}% at N={worst['seq_len']}{noise}", RUNTIME)
