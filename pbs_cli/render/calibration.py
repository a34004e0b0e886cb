"""`pbs calibrate`'s record as a Rich table: every tried block size and threshold, and whether it met the target."""

from __future__ import annotations

from rich.table import Table


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
