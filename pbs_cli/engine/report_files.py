"""`pbs report`'s work, without torch: saved `pbs profile` documents read back (.json, or .jsonl as
``pbs_cli.render.report_formats`` writes it) and checked, a damaged record refused as a usage error, two runs
compared row by row, and the ``--fail-if-slower`` verdict. The tables are drawn by ``pbs_cli.render.report``."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import RUNTIME, USAGE, UsageError
from .profile_records import RESULT_FIELDS, summarize
from .reports import SCHEMA_VERSION


@contextlib.contextmanager
def readable(*paths: Path) -> Iterator[None]:
    """A saved file whose records have the wrong shape (hand-edited, damaged) is a usage error, not a crash."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        names = " / ".join(repr(str(p)) for p in paths)
        raise UsageError(f"{names}: a record is malformed ({type(exc).__name__}: {str(exc)[:120]}); pass files "
                         "written by `pbs profile`") from None


# -- reading ----------------------------------------------------------------------------------------


def load(path: Path) -> dict[str, Any]:
    """Read a profile document from .json or .jsonl. Raises UsageError with what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{str(path)!r} does not exist or is not a file; pass a file written by `pbs profile`")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {str(path)!r}: {exc}") from None
    if path.suffix.lower() == ".jsonl" or (text.lstrip().startswith('{"record"')):
        doc = _from_jsonl(text, path)
    else:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{str(path)!r} is not valid JSON (line {exc.lineno}: {exc.msg}); pass a .json or "
                             ".jsonl file written by `pbs profile`") from None
    return validate(doc, str(path))


def _from_jsonl(text: str, path: Path) -> dict[str, Any]:
    header: dict[str, Any] | None = None
    results: list[dict[str, Any]] = []
    incomplete: dict[str, Any] | None = None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{str(path)!r} line {i} is not valid JSON ({exc.msg})") from None
        kind = item.pop("record", None) if isinstance(item, dict) else None
        if kind == "header" and header is None:
            header = item
        elif kind == "result":
            item.pop("run", None)
            results.append(item)
        elif kind == "incomplete":
            item.pop("run", None)
            incomplete = item
        else:
            raise UsageError(f"{str(path)!r} line {i}: expected a header, result or incomplete record, "
                             f"got {str(kind)!r}")
    if header is None:
        raise UsageError(f"{str(path)!r} has no header line; is it a `pbs profile --jsonl` file?")
    header["results"] = results
    done = list(dict.fromkeys(r.get("seq_len") for r in results if isinstance(r, dict)))
    planned = header.get("seq_lens") if isinstance(header.get("seq_lens"), list) else done
    if incomplete is None and any(n not in done for n in planned):  # a run killed before its end: lengths missing
        incomplete = {"reason": "cut short", "finished_seq_lens": done,
                      "missing_seq_lens": [n for n in planned if n not in done]}
    if incomplete is not None:
        header["incomplete"] = incomplete
    if not header.get("summary"):
        header["summary"] = summarize(results)
    return header


def validate(doc: Any, where: str) -> dict[str, Any]:
    if not isinstance(doc, dict) or doc.get("command") != "profile":
        cmd = doc.get("command") if isinstance(doc, dict) else type(doc).__name__
        raise UsageError(f"{where} is not a `pbs profile` result (command: {cmd!r})")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UsageError(f"{where} has schema_version {version!r}; this pbs reads version {SCHEMA_VERSION}")
    results = doc.get("results")
    if not isinstance(results, list) or any(not isinstance(r, dict) or "backend" not in r or "seq_len" not in r
                                            for r in results):
        raise UsageError(f"{where}: 'results' must be a list of records with seq_len and backend")
    for rec in results:  # records from older or partial runs: absent fields read as None
        for name in RESULT_FIELDS:
            rec.setdefault(name, None)
    return doc


# what two runs must share for their times to be compared: the attention shape, the dtype, the PBS parameters
# and the workload (the machine and the versions may differ: that is what a comparison looks at)
_SAME_SETUP = (("shape", ("batch", "heads", "kv_heads", "head_dim")), ("dtype", None), ("pbs", None),
               ("workload", ("source", "pattern", "seed", "model", "document", "layers")))


def setup_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """'field: A vs B' for each setting of ``_SAME_SETUP`` in which runs ``a`` and ``b`` differ (empty when
    they measured the same thing)."""
    found = []
    for name, keys in _SAME_SETUP:
        va, vb = a.get(name), b.get(name)
        if keys is None and isinstance(va, dict) and isinstance(vb, dict):
            keys = tuple(dict.fromkeys([*va, *vb]))
        if keys is None or not isinstance(va, dict) or not isinstance(vb, dict):
            if va != vb:
                found.append(f"{name} {va!r} vs {vb!r}")
            continue
        for key in keys:
            if va.get(key) != vb.get(key):
                found.append(f"{name}.{key} {va.get(key)!r} vs {vb.get(key)!r}")
    return found


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for every (seq_len, layer, backend) measured (status ok) in both documents.

    delta_pct = (B - A) / A * 100 (positive: B is slower). ``noise`` is True when the spread of either
    run (its interquartile range) is larger than the difference of the medians."""
    def key(r: dict[str, Any]) -> tuple:
        return (r["seq_len"], r.get("layer"), r["backend"])

    index_a = {key(r): r for r in a["results"] if r.get("status") == "ok"}
    rows = []
    for r in b["results"]:
        ra = index_a.get(key(r))
        if r.get("status") != "ok" or ra is None:
            continue
        ta, tb = ra["median_ms"], r["median_ms"]
        spread = max((ra.get("q75_ms") or ta) - (ra.get("q25_ms") or ta),
                     (r.get("q75_ms") or tb) - (r.get("q25_ms") or tb))
        rows.append({"seq_len": r["seq_len"], "layer": r.get("layer"), "backend": r["backend"], "a_ms": ta, "b_ms": tb,
                     "delta_ms": tb - ta, "delta_pct": (tb - ta) / ta * 100 if ta else float("nan"),
                     "spread_ms": spread, "noise": spread > abs(tb - ta),
                     "a_density": ra.get("density"), "b_density": r.get("density"),
                     "a_speedup": ra.get("speedup"), "b_speedup": r.get("speedup")})
    return rows


# -- `pbs report compare` ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """Why ``--fail-if-slower`` fails the comparison: one line and its exit code (given after the table)."""

    message: str
    exit_code: int


@dataclass(frozen=True)
class Comparison:
    """Two runs of one setup, read and compared: the rows of ``compare``, never empty."""

    a: Path
    b: Path
    doc_a: dict[str, Any]
    doc_b: dict[str, Any]
    rows: list[dict[str, Any]]
    verdict: Verdict | None = None  # --fail-if-slower failed


def compare_files(a: Path, b: Path, allow_different: bool = False, fail_if_slower: float | None = None,
                  backend: str = "pbs") -> Comparison:
    """Read runs ``a`` (the baseline) and ``b``, refuse runs of different setups (with ``allow_different``
    the table is still shown, but never gated) and runs with nothing measured in both; then, with
    ``fail_if_slower`` (percent), the verdict on ``backend``'s rows."""
    doc_a, doc_b = load(a), load(b)
    with readable(a, b):
        different = setup_differences(doc_a, doc_b)
    if different and (not allow_different or fail_if_slower is not None):
        fix = ("--fail-if-slower needs runs of the same setup" if allow_different
               else "compare runs of one setup, or pass --allow-different to see the table anyway")
        raise UsageError(f"{str(a)!r} and {str(b)!r} measured different setups ({'; '.join(different)[:300]}); {fix}")
    with readable(a, b):
        rows = compare(doc_a, doc_b)
    if not rows:
        raise UsageError(f"{str(a)!r} and {str(b)!r} have no (length, backend) measured in both; nothing to compare")
    verdict = None if fail_if_slower is None else slower_verdict(rows, backend, fail_if_slower)
    return Comparison(Path(a), Path(b), doc_a, doc_b, rows, verdict)


def slower_verdict(rows: list[dict[str, Any]], backend: str, limit_pct: float) -> Verdict | None:
    """A usage verdict when ``backend`` has no rows; a runtime one when it got slower than A by more than
    ``limit_pct`` percent at any length (the worst named, and flagged when within the runs' spread)."""
    checked = [r for r in rows if r["backend"] == backend]
    if not checked:
        return Verdict(f"no {backend!r} rows in both files; --fail-if-slower has nothing to check", USAGE)
    slower = [r for r in checked if r["delta_pct"] > limit_pct]
    if not slower:
        return None
    worst = max(slower, key=lambda r: r["delta_pct"])
    noise = " (within the runs' spread: rerun with more --iters to confirm)" if worst["noise"] else ""
    return Verdict(f"{backend} got slower by more than {limit_pct:g}% at {len(slower)} length(s); worst "
                   f"{worst['delta_pct']:+.1f}% at N={worst['seq_len']}{noise}", RUNTIME)
