"""`pbs viz-mask --json` and `pbs profile --json` give the records that the golden files under tests/golden/
hold: the same fields and values on fixed inputs, apart from timings and the environment.

The golden files were written by the code before the application's modules were rearranged into engine,
render and thin commands; this test keeps that rearrangement (and later ones) from changing what a run
reports. Regenerate them only for a change that is meant to change the records:
``python tests/test_json_golden.py`` (then review the diff).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from fixtures import assert_clean_outcome, invoke

GOLDEN = Path(__file__).parent / "golden"
# fixed inputs: a synthetic workload with a seed, small shapes, CPU, one timed call
CASES = {
    "viz_mask": ["viz-mask", "--json", "--seq-len", "2k", "--seed", "3", "--device", "cpu"],
    "profile": ["profile", "--json", "--device", "cpu", "--seq-len", "1k", "--heads", "2", "--kv-heads", "1",
                "--head-dim", "32", "--backends", "pbs,reference,sdpa-math", "--seed", "3", "--budget", "0",
                "--iters", "1", "--warmup", "1", "--recall-rows", "8"],
}
# what depends on the clock, the machine or the process (argv: the in-process runner sees pytest's), not on the inputs
VOLATILE = {"timestamp", "env", "argv", "repeats", "peak_mem_mib", "tflops", "tflops_computed", "speedup",
            "attend_speedup", "plan_share", "break_even", "speedup_at_longest", "within_spread"}


def stable(value):
    """``value`` without the fields that depend on time or the machine (``VOLATILE``, ``*_ms``)."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE and not k.endswith("_ms")}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def assert_same(got, expected, where="record"):
    """Equal structure and values; floats equal to 1e-5 relative (thread counts reorder float sums)."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and list(got) == list(expected), f"{where}: keys {list(got)} != {list(expected)}"
        for key in expected:
            assert_same(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), f"{where}: {got!r} != {expected!r}"
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_same(g, e, f"{where}[{i}]")
    elif isinstance(expected, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        assert math.isclose(got, expected, rel_tol=1e-5, abs_tol=1e-9), f"{where}: {got!r} != {expected!r}"
    else:
        assert got == expected, f"{where}: {got!r} != {expected!r}"


def run(name: str) -> dict:
    result = invoke(CASES[name])
    assert_clean_outcome(result, {0})
    return stable(json.loads(result.stdout))


@pytest.mark.parametrize("name", list(CASES))
def test_json_record_is_the_golden_one(name):
    expected = json.loads((GOLDEN / f"{name}.json").read_text(encoding="utf-8"))
    assert_same(run(name), expected)


def test_stable_drops_only_the_volatile_fields():
    record = {"timestamp": "t", "env": {}, "results": [{"median_ms": 1.0, "density": 0.5, "speedup": 2.0}], "seed": 3}
    assert stable(record) == {"results": [{"density": 0.5}], "seed": 3}


if __name__ == "__main__":  # write the golden files from the code as it is now
    for case in CASES:
        (GOLDEN / f"{case}.json").write_text(json.dumps(run(case), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {GOLDEN / f'{case}.json'}", file=sys.stderr)
