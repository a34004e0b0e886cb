"""The words and cells every format of a `pbs profile` document shows: the table's columns and cells of one
record, the summary lines under it, the skipped lengths, and the run's setup in one line. The writers in
``report_formats`` and ``html_report`` both build on these.
"""

from __future__ import annotations

from typing import Any

from ..engine.profile_records import summarize
from ..engine.sizes import format_size


def incomplete_note(doc: dict[str, Any]) -> str:
    """'incomplete: interrupted; no results for 4K, 8K' for a sweep cut short, else ''."""
    inc = doc.get("incomplete")
    if not inc:
        return ""
    missing = inc.get("missing_seq_lens") or []
    shown = ", ".join(format_size(int(n)) for n in missing) if missing else "none"
    return f"incomplete: {inc.get('reason') or 'cut short'}; no results for {shown}"


COLUMNS = ("N", "layer", "backend", "ms (±IQR/2)", "permute/select/attend ms", "density", "TF/s dense-eq",
           "TF/s computed", "speedup (total / attend)", "rel. L2 err", "recall mean/min", "peak MiB")


def _f(x: Any, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def format_ms(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:.3g}" if x < 100 else f"{x:,.0f}"


def row_cells(rec: dict[str, Any]) -> list[str]:
    """The human-readable cells of one measured record (COLUMNS order); skipped records get the reason."""
    layer = "" if rec.get("layer") is None else str(rec["layer"])
    if rec.get("status") != "ok":
        return [format_size(rec["seq_len"]), layer, rec["backend"], f"skipped: {rec.get('reason') or ''}"] + [""] * 8
    iqr = (rec["q75_ms"] - rec["q25_ms"]) if rec.get("q75_ms") is not None else None
    phases = ""
    if rec.get("permute_ms") is not None:
        phases = f"{format_ms(rec['permute_ms'])} / {format_ms(rec['select_ms'])} / {format_ms(rec['attend_ms'])}"
        if rec.get("plan_share") is not None:
            phases += f" (plan {rec['plan_share']:.0%} of dense)"
    recall = ""
    if rec.get("recall_mean") is not None:
        recall = f"{rec['recall_mean']:.3f} / {rec['recall_min']:.3f}"
    return [format_size(rec["seq_len"]), layer, rec["backend"],
            f"{format_ms(rec['median_ms'])} ±{format_ms(iqr / 2 if iqr is not None else None)}",
            phases, _f(rec.get("density"), ".1%"), _f(rec.get("tflops"), ".3g"), _f(rec.get("tflops_computed"), ".3g"),
            _f(rec.get("speedup"), ".2f") + ("x" if rec.get("speedup") is not None else "")
            + (f" / {rec['attend_speedup']:.2f}x" if rec.get("attend_speedup") is not None else ""),
            _f(rec.get("rel_l2_error"), ".2e"), recall, _f(rec.get("peak_mem_mib"), ",.0f")]


def skipped_lines(doc: dict[str, Any]) -> list[str]:
    """'skipped: BACKEND at 1K, 2K: reason' lines, one per (backend, reason)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in doc.get("results", []):
        if r.get("status") != "ok":
            where = format_size(r["seq_len"]) + (f" layer {r['layer']}" if r.get("layer") is not None else "")
            groups.setdefault((r["backend"], r.get("reason") or "no reason given"), []).append(where)
    return [f"skipped: {b} at {', '.join(dict.fromkeys(w))}: {why}" for (b, why), w in groups.items()]


def has_layers(doc: dict[str, Any]) -> bool:
    return any(r.get("layer") is not None for r in doc.get("results", []))


def summary_lines(doc: dict[str, Any]) -> list[str]:
    s = doc.get("summary") or summarize(doc.get("results", []))
    lines = [incomplete_note(doc)] if doc.get("incomplete") else []
    if s.get("best_dense"):
        lines.append("best dense (speedup baseline): "
                     + ", ".join(f"{format_size(int(n))} {b}" for n, b in s["best_dense"].items()))
    for name, n in (s.get("break_even") or {}).items():
        at = (s.get("speedup_at_longest") or {}).get(name)
        tail = f"; {at:.2f}x at the longest length" if at is not None else ""
        lines.append(f"{name} break-even: {format_size(n) if n else 'not reached in this sweep'}{tail}")
        unclear = (s.get("within_spread") or {}).get(name)
        if unclear:
            lines.append(f"{name} median faster at {', '.join(format_size(int(x)) for x in unclear)}, but within "
                         "the runs' spread: not counted (more --iters or --budget narrows it)")
    kernels = dict.fromkeys(r["kernel"] for r in doc.get("results", [])
                            if r.get("backend") == "pbs" and r.get("kernel"))
    if kernels:
        lines.append("pbs attention kernel: " + ", ".join(kernels))
    below = (doc.get("pbs") or {}).get("dense_below") or 0
    short = sorted({r["seq_len"] for r in doc.get("results", []) if r.get("backend") == "pbs" and r["seq_len"] < below})
    if short:
        lines.append(f"pbs rows at {', '.join(format_size(n) for n in short)} time the sparse path; with these "
                     f"parameters `pbs prefill` runs dense below {format_size(below)} tokens (dense_below)")
    return lines


def describe(doc: dict[str, Any]) -> str:
    """One line: shape, dtype, device, workload, PBS parameters."""
    sh = doc.get("shape", {})
    wl = doc.get("workload", {})
    cfg = doc.get("pbs", {})
    src = wl.get("source", "?")
    what = (f"synthetic '{wl.get('pattern')}' seed {wl.get('seed')}" if src == "synthetic"
            else f"captured from {wl.get('model')} on {wl.get('document')}")
    gpu = (doc.get("env") or {}).get("gpu")
    dev = gpu["name"] if gpu and str(doc.get("device", "")).startswith("cuda") else doc.get("device", "?")
    return (f"batch {sh.get('batch')}, heads {sh.get('heads')}/{sh.get('kv_heads')} (q/kv), "
            f"head_dim {sh.get('head_dim')}, {doc.get('dtype')} on {dev}; {what}; "
            f"PBS block {cfg.get('block_size')}, segment {cfg.get('segment_size')}, "
            f"threshold {cfg.get('threshold')}, permute {cfg.get('permute')}")
