"""A command's JSON record delivered: saved to ``--output``, then printed as JSON (``--json``) or as the
command's own table on stdout."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import typer

from ..console import err
from ..engine import reports


def deliver(rec: dict[str, Any], as_json: bool, output: Path | None, show: Callable[[dict[str, Any]], None],
            announce: bool = True) -> None:
    """Save ``rec`` at ``output`` (saying so on stderr with ``announce``), then print it: JSON with
    ``as_json``, else ``show(rec)``."""
    if output is not None:
        reports.atomic_write_text(output, reports.to_json(rec))
        if announce:
            err.print(f"saved {output}", highlight=False, markup=False)
    if as_json:
        typer.echo(reports.to_json(rec), nl=False)
    else:
        show(rec)
