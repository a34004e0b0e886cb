"""Writers for `pbs profile` results: Rich table, JSON, JSONL, CSV, Markdown (HTML lives in ``html_report``),
and the table of a comparison. ``pbs_cli.engine.report_files`` reads them back.

A profile document is ``reports.envelope("profile", ...)`` with ``shape``, ``pbs``, ``workload``,
``seq_lens``, ``backends``, ``results`` (one flat record per length x backend [x layer], fields
``profile_records.RESULT_FIELDS``) and ``summary``. JSONL holds the same document as lines: first a header
(the document without ``results``, ``"record": "header"``), then one ``"record": "result"`` line per
result, so a sweep cut short keeps every finished line and still loads.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterable

from rich.table import Table
from rich.text import Text

from ..errors import UsageError
from ..engine.profile_records import RESULT_FIELDS
from ..engine.sizes import format_size
from .cells import (COLUMNS, describe, format_ms, has_layers, incomplete_note, row_cells, skipped_lines,
                    summary_lines)

FORMATS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".md": "markdown", ".markdown": "markdown",
           ".html": "html", ".htm": "html"}


def format_for_path(path: Path) -> str:
    """Output format from a file extension. Raises UsageError for unknown extensions."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise UsageError(f"cannot tell the format of {str(path)!r} from its extension; use one of "
                         f"{', '.join(sorted(FORMATS))}")
    return fmt


# -- JSON / JSONL -----------------------------------------------------------------------------------


def to_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, default=str) + "\n"


def header_line(doc: dict[str, Any]) -> str:
    head = {k: v for k, v in doc.items() if k != "results"}
    return json.dumps({"record": "header", **head}, default=str) + "\n"


def result_line(rec: dict[str, Any], run_id: str) -> str:
    return json.dumps({"record": "result", "run": run_id, **rec}, default=str) + "\n"


def incomplete_line(incomplete: dict[str, Any], run_id: str) -> str:
    """The last line of a sweep cut short: why, and which lengths finished and which did not."""
    return json.dumps({"record": "incomplete", "run": run_id, **incomplete}, default=str) + "\n"


def to_jsonl(doc: dict[str, Any]) -> str:
    run = str(doc.get("timestamp", ""))
    head = {k: v for k, v in doc.items() if k != "incomplete"}
    tail = incomplete_line(doc["incomplete"], run) if doc.get("incomplete") else ""
    return header_line(head) + "".join(result_line(r, run) for r in doc.get("results", [])) + tail


# -- CSV --------------------------------------------------------------------------------------------


def to_csv(doc: dict[str, Any]) -> str:
    """One row per result; a sweep cut short ends in a ``# incomplete: ...`` comment line."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(RESULT_FIELDS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for rec in doc.get("results", []):
        writer.writerow({k: ("" if rec.get(k) is None else rec.get(k)) for k in RESULT_FIELDS})
    note = incomplete_note(doc)
    return buf.getvalue() + (f"# {note}\n" if note else "")


def rich_table(doc: dict[str, Any]) -> Table:
    table = Table(title=f"pbs profile: {describe(doc)}", title_justify="left",
                  caption="\n".join(summary_lines(doc) + skipped_lines(doc)) or None, caption_justify="left")
    layers = has_layers(doc)
    for col in COLUMNS:
        if col == "layer" and not layers:
            continue
        table.add_column(col, justify="left" if col in ("N", "backend", "layer") else "right")
    for rec, cells in _ok_rows(doc, layers):
        style = "bold" if rec["backend"] == "pbs" else None
        table.add_row(*[Text(c) for c in cells], style=style)
    return table


def _ok_rows(doc: dict[str, Any], layers: bool):
    """(record, table cells) of each measured result; the layer column only when records have layers."""
    for rec in doc.get("results", []):
        if rec.get("status") == "ok":
            cells = row_cells(rec)
            if not layers:
                cells.pop(1)
            yield rec, cells


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: dict[str, Any]) -> str:
    layers = has_layers(doc)
    cols = [c for c in COLUMNS if layers or c != "layer"]
    lines = ["## pbs profile", "", _md_escape(describe(doc)), "",
             "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, cells in _ok_rows(doc, layers):
        lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    lines.append("")
    lines += [f"- {_md_escape(s)}" for s in summary_lines(doc) + skipped_lines(doc)]
    lines += ["", "TFLOP/s dense-eq = causal FLOPs / time, causal FLOPs = 2 * N^2 * D * H_q * B; "
              "TFLOP/s computed = density * causal FLOPs / attend time; speedup = best dense SDPA time / time "
              "(total, and the attend phase alone).", ""]
    return "\n".join(lines)


def parse_markdown_table(text: str) -> list[dict[str, str]]:
    """Rows of the first pipe table in ``text`` as dicts (header -> cell). For tests and tooling."""
    rows: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in _split_pipes(line.strip()[1:-1])]
            rows.append(cells)
        elif rows:
            break
    if len(rows) < 2:
        return []
    header, body = rows[0], rows[2:]
    return [dict(zip(header, r)) for r in body]


def _split_pipes(line: str) -> list[str]:
    cells, cur, i = [], "", 0
    while i < len(line):
        if line[i] == "\\" and i + 1 < len(line) and line[i + 1] == "|":
            cur += "\\|"
            i += 2
            continue
        if line[i] == "|":
            cells.append(cur)
            cur = ""
        else:
            cur += line[i]
        i += 1
    cells.append(cur)
    return cells


def render(doc: dict[str, Any], fmt: str) -> str:
    """The document in ``fmt`` (json, jsonl, csv, markdown, html)."""
    if fmt == "json":
        return to_json(doc)
    if fmt == "jsonl":
        return to_jsonl(doc)
    if fmt == "csv":
        return to_csv(doc)
    if fmt == "markdown":
        return to_markdown(doc)
    if fmt == "html":
        from .html_report import to_html

        return to_html(doc)
    raise UsageError(f"unknown format {fmt!r}")


# -- compare ----------------------------------------------------------------------------------------


def compare_table(rows: Iterable[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("N", "layer", "backend", "A ms", "B ms", "delta", "spread ms", "", "speedup A -> B", "density A -> B"):
        table.add_column(col, justify="left" if col in ("N", "layer", "backend", "") else "right")
    for r in rows:
        flag = "within noise" if r["noise"] else ("slower" if r["delta_ms"] > 0 else "faster")
        sp = (f"{r['a_speedup']:.2f}x -> {r['b_speedup']:.2f}x"
              if r["a_speedup"] is not None and r["b_speedup"] is not None else "")
        dn = (f"{r['a_density']:.1%} -> {r['b_density']:.1%}"
              if r["a_density"] is not None and r["b_density"] is not None else "")
        style = None if r["noise"] else ("red" if r["delta_ms"] > 0 else "green")
        table.add_row(format_size(r["seq_len"]), "" if r["layer"] is None else str(r["layer"]), r["backend"],
                      format_ms(r["a_ms"]), format_ms(r["b_ms"]), f"{r['delta_pct']:+.1f}%", format_ms(r["spread_ms"]),
                      flag, sp, dn, style=style)
    return table
