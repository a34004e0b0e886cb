"""`pbs report`'s outputs on stdout: a saved profile as a table or in another format, a comparison as a
table or JSON. A record too damaged to draw is a usage error (``report_files.readable``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from ..engine.report_files import Comparison, readable
from .report_formats import compare_table, describe, render, rich_table
from .tables import print_table


def show(doc: dict[str, Any], fmt: str, path: Path) -> None:
    """Print the profile ``doc`` read from ``path``: a Rich table for ``table``, else ``render(doc, fmt)``."""
    with readable(path):
        text = None if fmt == "table" else render(doc, fmt)
        table = rich_table(doc) if fmt == "table" else None
    if table is not None:
        print_table(table)
    else:
        typer.echo(text, nl=False)


def show_comparison(comparison: Comparison, as_json: bool) -> None:
    """Print the comparison's rows: JSON with ``as_json``, else a table titled with both runs."""
    a, b = comparison.a, comparison.b
    if as_json:
        typer.echo(json.dumps({"a": str(a), "b": str(b), "rows": comparison.rows}, indent=2))
        return
    with readable(a, b):
        table = compare_table(comparison.rows, f"A: {a} ({describe(comparison.doc_a)})\n"
                                               f"B: {b} ({describe(comparison.doc_b)})")
    print_table(table)
