"""`pbs calibrate`'s record as a Rich table: every tried block size and threshold, and whether it met the target."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from ..console import out
from .records import deliver as deliver_record
from .tables import emit


def summary_table(rec: dict) -> Table:
    table = Table(title=f"pbs calibrate: {rec['target']['kind']} target {rec['target']['value']:g} on "
                        f"{rec['document']} ({rec['prompt_tokens']} tokens)", title_justify="left")
    for col in ("block", "threshold", "density", "recall", "mean KL", "meets"):
        table.add_column(col, justify="right")
    for r in rec["tried"]:
        table.add_row(str(r["block_size"]), f"{r['threshold']:g}", f"{r['density']:.1%}",
                      f"{r['recall']:.4f}" if r.get("recall") is not None else "-",
                      f"{r['mean_kl']:.4f}" if r.get("mean_kl") is not None else "-", "yes" if r["meets"] else "no")
    return table


def deliver(rec: dict, as_json: bool, output: Path | None, name: str) -> None:
    """The saved record, then JSON or the table of tried thresholds and where the preset went."""
    def show(r: dict) -> None:
        best = r["best"]
        emit(summary_table(r))
        out.print(f"wrote {r['profile_path']}: block {best['config']['block_size']}, threshold "
                  f"{best['config']['threshold']:g}, density {best['density']:.1%}; use it with --profile {name}",
                  highlight=False)

    deliver_record(rec, as_json, output, show, announce=False)
