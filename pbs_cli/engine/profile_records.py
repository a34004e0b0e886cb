"""What a `pbs profile` run reports, without torch: the backends it can time, the fields of one result
record, and the summary over records (the best dense backend per length, the break-even length). `pbs report`
reads and writes profile documents through these alone; ``profiling`` measures and fills the records."""

from __future__ import annotations

from typing import Any, Iterable

DENSE_BACKENDS = ("sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math")
BACKENDS = ("pbs", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math", "flex", "reference")
SPARSE_BACKENDS = ("pbs", "flex", "reference")

RESULT_FIELDS = (
    "seq_len", "layer", "backend", "status", "reason", "median_ms", "q25_ms", "q75_ms", "min_ms", "max_ms",
    "repeats", "permute_ms", "select_ms", "attend_ms", "density", "tflops", "tflops_computed", "speedup",
    "attend_speedup", "plan_share", "best_dense", "rel_l2_error", "error_vs", "recall_mean", "recall_min",
    "peak_mem_mib", "kernel", "notes",
)


def causal_flops(batch: int, heads: int, seq_len: int, head_dim: int) -> float:
    """FLOPs of causal attention: 2 matmuls x 2 FLOPs x N^2 x D x H_q x B, halved by the causal mask."""
    return 2.0 * 2.0 * seq_len * seq_len * head_dim * heads * batch / 2.0


def result(seq_len: int, backend: str, layer: int | None = None, **fields: Any) -> dict[str, Any]:
    """A result record with every field of ``RESULT_FIELDS`` (missing ones None)."""
    rec = {name: None for name in RESULT_FIELDS}
    rec.update(seq_len=seq_len, backend=backend, layer=layer, status="ok")
    rec.update(fields)
    return rec


def skipped(seq_len: int, backend: str, reason: str, layer: int | None = None) -> dict[str, Any]:
    return result(seq_len, backend, layer, status="skipped", reason=reason)


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Per length: the best dense backend; per sparse backend: the break-even length and the speedup at the
    longest length.

    Break-even is the smallest tested N from which the backend beats the best dense backend at that and
    every longer tested length by more than the runs' spread (its 75th-percentile time below the dense
    backend's 25th); None if never. Lengths where the median is faster but within the spread are listed
    in ``within_spread`` instead of being claimed."""
    recs = [r for r in records if r["status"] == "ok"]
    lengths = sorted({r["seq_len"] for r in recs})
    best_dense: dict[str, str] = {}
    dense_of: dict[tuple, dict[str, Any]] = {}  # (seq_len, layer) -> the fastest dense record
    for r in recs:
        if r["backend"] in DENSE_BACKENDS:
            key = (r["seq_len"], r.get("layer"))
            if key not in dense_of or r["median_ms"] < dense_of[key]["median_ms"]:
                dense_of[key] = r
    for n in lengths:
        dense = [r for r in recs if r["seq_len"] == n and r["backend"] in DENSE_BACKENDS]
        if dense:
            best_dense[str(n)] = min(dense, key=lambda r: r["median_ms"])["backend"]
    break_even: dict[str, int | None] = {}
    longest: dict[str, float | None] = {}
    within: dict[str, list[int]] = {}
    for name in SPARSE_BACKENDS:
        mine = [r for r in recs if r["backend"] == name and r["speedup"] is not None]
        if not mine:
            continue
        per_len: dict[int, list[dict[str, Any]]] = {}
        for r in mine:
            per_len.setdefault(r["seq_len"], []).append(r)
        faster = {n: sum(r["speedup"] for r in rs) / len(rs) > 1.0 for n, rs in per_len.items()}
        clear = {n: faster[n] and all(_beyond_spread(r, dense_of.get((n, r.get("layer")))) for r in rs)
                 for n, rs in per_len.items()}
        found = None
        for n in sorted(per_len, reverse=True):  # the longest run of clear wins that reaches the longest length
            if not clear[n]:
                break
            found = n
        break_even[name] = found
        unclear = [n for n in sorted(per_len) if faster[n] and not clear[n]]
        if unclear:
            within[name] = unclear
        top = max(per_len)
        longest[name] = sum(r["speedup"] for r in per_len[top]) / len(per_len[top])
    return {"best_dense": best_dense, "break_even": break_even, "speedup_at_longest": longest,
            "within_spread": within}


def _beyond_spread(rec: dict[str, Any], dense: dict[str, Any] | None) -> bool:
    """Whether ``rec`` is faster than ``dense`` beyond both runs' spread (interquartile ranges)."""
    if dense is None:
        return False
    slow = rec.get("q75_ms") if rec.get("q75_ms") is not None else rec["median_ms"]
    fast = dense.get("q25_ms") if dense.get("q25_ms") is not None else dense["median_ms"]
    return slow < fast
