"""`pbs profile`'s outputs: the stdout format, the -o file, the --html report. JSONL lines are written
(and flushed) as each length finishes; the other formats when the sweep ends. After Ctrl-C every
output gets the finished lengths, marked incomplete."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, TextIO

import typer

from ..console import err
from ..engine import reports
from ..engine.sizes import format_size
from ..errors import INTERRUPTED, OutOfMemory, PBSError, UsageError
from .report_formats import format_for_path, header_line, incomplete_line, render, result_line, rich_table
from .tables import print_table


class ProfileOutputs:
    """Where results go: stdout format, -o file, --html file; JSONL lines are flushed per length."""

    def __init__(self, stdout_fmt: str | None, output: Path | None, html: Path | None):
        """The paths were checked (``options.check_outputs``); here: the formats they name."""
        self.stdout_fmt = stdout_fmt
        self.output, self.html = output, html
        self.file_fmt = format_for_path(output) if output is not None else None
        if html is not None and format_for_path(html) != "html":
            raise UsageError(f"--html {str(html)!r} must end in .html")
        self._jsonl: TextIO | None = None
        self.run_id = ""

    def start(self, doc: dict[str, Any]) -> None:
        self.run_id = str(doc["timestamp"])
        if self.stdout_fmt == "jsonl":
            sys.stdout.write(header_line(doc))
            sys.stdout.flush()
        if self.file_fmt == "jsonl":
            assert self.output is not None
            self._jsonl = open(self.output, "w", encoding="utf-8")
            self._jsonl.write(header_line(doc))
            self._flush()

    def _flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
            os.fsync(self._jsonl.fileno())

    def _stream(self, lines: str) -> None:
        if self.stdout_fmt == "jsonl":
            sys.stdout.write(lines)
            sys.stdout.flush()
        if self._jsonl is not None:
            self._jsonl.write(lines)
            self._flush()

    def records(self, recs: list[dict[str, Any]]) -> None:
        """Called once per finished length."""
        self._stream("".join(result_line(r, self.run_id) for r in recs))

    def mark_incomplete(self, incomplete: dict[str, Any]) -> None:
        """The JSONL streams end in an ``"incomplete"`` record (the other formats carry it in the document)."""
        self._stream(incomplete_line(incomplete, self.run_id))

    def finish(self, doc: dict[str, Any]) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            err.print(f"saved {self.output}", highlight=False, markup=False)
        elif self.output is not None:
            reports.atomic_write_text(self.output, render(doc, self.file_fmt or "json"))
            err.print(f"saved {self.output}", highlight=False, markup=False)
        if self.html is not None:
            reports.atomic_write_text(self.html, render(doc, "html"))
            err.print(f"saved {self.html}", highlight=False, markup=False)
        if self.stdout_fmt in ("json", "csv", "markdown"):
            typer.echo(render(doc, self.stdout_fmt), nl=False)
        elif self.stdout_fmt is None:
            print_table(rich_table(doc))

    def discard_files(self) -> None:
        """Write no files: remove the JSONL file this run created, forget -o and --html."""
        if self._jsonl is not None:
            self._jsonl.close()
            Path(self._jsonl.name).unlink(missing_ok=True)
            self._jsonl = None
        self.output = self.html = None

    def close(self) -> None:
        if self._jsonl is not None and not self._jsonl.closed:
            self._jsonl.close()


def deliver(outputs: ProfileOutputs, result, trace: Path | None) -> None:
    """Write a finished (or interrupted) sweep, a ``ProfileResult``, to every output; a sweep where
    nothing fit in memory writes no file and is exit 4, an interrupted one exit 130."""
    if not result.main:  # tensor parallel: rank 0 alone writes
        outputs = ProfileOutputs(None, None, None)
    if result.interrupted:
        _interrupted(outputs, result)
    nothing_fit = result.nothing_fit
    if nothing_fit:  # no report of nothing but failures: drop this run's JSONL file, write no -o/--html file
        outputs.discard_files()
    outputs.finish(result.doc)
    if trace is not None:
        err.print(f"saved {trace}" if result.traced else "no trace written: pbs did not run at any length",
                  highlight=False, markup=False)
    if nothing_fit:
        raise OutOfMemory(f"no length fit in memory (tried {', '.join(map(format_size, result.sizes))}); try a "
                          "shorter --seq-len, fewer heads or --dtype bfloat16")


def _interrupted(outputs: ProfileOutputs, result) -> None:
    """After Ctrl-C: write what finished to every requested output, marked ``incomplete`` (nothing when no
    length finished), then exit 130 with one line that says where it went."""
    done = result.finished
    if not done:
        outputs.discard_files()
        raise PBSError("interrupted before any length finished; nothing was written", INTERRUPTED)
    outputs.mark_incomplete(result.doc["incomplete"])
    outputs.finish(result.doc)
    kept = ", ".join(str(p) for p in (outputs.output, outputs.html) if p is not None) or "the output above"
    raise PBSError(f"interrupted after {len(done)} of {len(result.sizes)} lengths "
                   f"({', '.join(map(format_size, done))}); they are in {kept}, marked incomplete", INTERRUPTED)
