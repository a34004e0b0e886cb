"""`pbs eval`'s record as Rich tables on stdout (strategies, per layer, passkey) and its density-fidelity plot."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from ..console import err
from .tables import emit


def print_table(rec: dict) -> None:
    cont = rec.get("continuation_tokens") or 0
    caption = ("top-1, KL: every position's next token, teacher-forced over one sparse forward (a position's "
               "selection has seen later tokens of its block); recall: attention mass kept on sampled rows; "
               "pareto *: no sparser row has lower KL")
    floor = rec["dense"].get("noise_floor")
    if floor:
        caption += (f"; noise floor of {floor['dtype']}: dense {floor['dtype']} against dense float32 (same weights) "
                    f"agrees on top-1 {floor['top1_agreement']:.2%}, mean KL {floor['mean_kl']:.4f}")
    if cont:
        caption += (f"; continued: the last {cont} tokens scored with dense attention over the KV cache of a "
                    "sparse prefill of the rest (the selection never saw them)")
    table = Table(title=f"pbs eval: {rec['document']} ({rec['prompt_tokens']} tokens, {rec['model']['name']})",
                  title_justify="left", caption=caption, caption_justify="left")
    table.add_column("strategy", no_wrap=True)
    columns = ["tau", "density", "perplexity", "top-1", "mean KL (nats)", "recall", "pareto"]
    if cont:
        columns[5:5] = ["continued ppl", "continued top-1", "continued KL (nats)"]
    for col in columns:
        table.add_column(col, justify="right")
    d = rec["dense"]
    dense_cont = ["-", "100.00%", "0"] if cont else []
    if cont and rec["results"]:
        dense_cont[0] = f"{rec['results'][0]['continuation']['ppl_dense']:.3f}"
    table.add_row(d["strategy"], "-", "100.0%", f"{d['ppl']:.3f}" if d["ppl"] else "-", "100.00%", "0",
                  *dense_cont, "1", "")
    for r, best in zip(rec["results"], rec["pareto"]):
        c = r["continuation"] if cont else None
        continued = [f"{c['ppl']:.3f} ({c['ppl_increase']:+.1%})", f"{c['top1_agreement']:.2%}",
                     f"{c['mean_kl']:.4f}"] if c else []
        table.add_row(r["strategy"], f"{r['threshold']:g}", f"{r['density']:.1%}",
                      f"{r['ppl']:.3f} ({r['ppl_increase']:+.1%})", f"{r['top1_agreement']:.2%}",
                      f"{r['mean_kl']:.4f}", *continued, f"{r['recall']:.4f}" if r["recall"] is not None else "-",
                      "*" if best else "")
    emit(table)
    worst = min(rec["results"], key=lambda r: min(ly["recall_min_head"] for ly in r["layers"]) if r["layers"] else 1)
    if worst["layers"]:
        ly = min(worst["layers"], key=lambda x: x["recall_min_head"])
        err.print(f"lowest head recall: {worst['strategy']} t={worst['threshold']:g}, layer {ly['layer']}: "
                  f"{ly['recall_min_head']:.3f} (layer mean {ly['recall']:.3f}, density {ly['density']:.1%})",
                  highlight=False, markup=False)


def print_layers(rec: dict) -> None:
    """Per-layer density and recall (mean and lowest head) of every evaluated strategy."""
    for r in rec["results"]:
        table = Table(title=f"{r['strategy']}, tau {r['threshold']:g}: per layer", title_justify="left")
        for col in ("layer", "path", "density", "recall", "lowest head recall"):
            table.add_column(col, justify="right")
        for ly in r["layers"]:
            table.add_row(str(ly["layer"]), ly["path"], f"{ly['density']:.1%}", f"{ly['recall']:.4f}",
                          f"{ly['recall_min_head']:.4f}")
        emit(table)


def save_png(rec: dict, path: Path) -> None:
    """Density (x) against mean KL and perplexity increase (y), one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    by: dict[str, list[dict]] = {}
    for r in rec["results"]:
        by.setdefault(r["strategy"], []).append(r)
    for label, rows in by.items():
        rows = sorted(rows, key=lambda r: r["density"])
        x = [100 * r["density"] for r in rows]
        axes[0].plot(x, [r["mean_kl"] for r in rows], "o-", label=label)
        axes[1].plot(x, [100 * r["ppl_increase"] for r in rows], "o-", label=label)
    axes[0].set_ylabel("mean KL(dense || sparse), nats")
    axes[1].set_ylabel("perplexity increase, %")
    for ax in axes:
        ax.set_xlabel("density, % of causal blocks")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{rec['model']['name']}, {rec['prompt_tokens']} tokens of {Path(rec['document']).name}")
    fig.tight_layout()
    from .viz import save_figure

    save_figure(fig, path, "png")  # temp file + rename in the same folder; closes the figure


def print_passkey(rec: dict) -> None:
    table = Table(title=f"pbs eval --passkey ({rec['model']['name']}, filler {rec['document']})", title_justify="left")
    for col in ("length", "dense accuracy", "pbs accuracy", "difference"):
        table.add_column(col, justify="right")
    for length in sorted({c["length"] for c in rec["passkey"]}):
        cells = [c for c in rec["passkey"] if c["length"] == length]
        n = sum(c["trials"] for c in cells)
        d = sum(c["dense_accuracy"] * c["trials"] for c in cells) / n
        p = sum(c["pbs_accuracy"] * c["trials"] for c in cells) / n
        table.add_row(str(length), f"{d:.0%}", f"{p:.0%}", f"{100 * (p - d):+.0f} pts")
    emit(table)


def deliver(rec: dict, as_json: bool, output: Path | None, png: Path | None, per_layer: bool) -> None:
    """`pbs eval`'s record: the Pareto plot (``png``), the saved record, then JSON or the tables."""
    from .records import deliver as deliver_record

    if rec["mode"] == "passkey":
        deliver_record(rec, as_json, output, print_passkey, announce=False)
        return
    if png is not None:
        save_png(rec, png)
        err.print(f"saved {png}", highlight=False, markup=False)

    def show(r: dict) -> None:
        print_table(r)
        if per_layer:
            print_layers(r)

    deliver_record(rec, as_json, output, show)
