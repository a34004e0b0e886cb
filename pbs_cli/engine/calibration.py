"""`pbs calibrate`'s search: the smallest threshold whose result meets a target, by bisection."""

from __future__ import annotations

from typing import Callable


def search_threshold(evaluate: Callable[[float], dict], meets: Callable[[dict], bool], lo: float = 0.5,
                     hi: float = 1.0, steps: int = 7) -> tuple[dict | None, list[dict]]:
    """Smallest threshold in [lo, hi] whose result ``meets`` the target, by bisection on the gap 1 - tau
    (fidelity grows with tau; tau = 1.0 is dense and always meets it). Returns (best result, all tried)."""
    tried: list[dict] = []

    def run(tau: float) -> dict:
        res = evaluate(tau)
        res["threshold"] = tau
        res["meets"] = meets(res)
        tried.append(res)
        return res

    best = None
    low = run(lo)
    if low["meets"]:
        return low, tried
    a, b = lo, hi  # a fails; b is assumed to meet (dense)
    for _ in range(steps):
        # geometric midpoint of the gaps 1 - a and 1 - b: thresholds near 1 need fine steps
        gap_a, gap_b = 1.0 - a, max(1.0 - b, 2e-3)
        mid = round(1.0 - (gap_a * gap_b) ** 0.5, 5)
        if not a < mid < b:
            break
        res = run(mid)
        if res["meets"]:
            best, b = res, mid
        else:
            a = mid
    if best is None:  # nothing below hi met it: hi itself (1.0 = dense) is the answer if it meets
        res = run(hi)
        best = res if res["meets"] else None
    return best, tried
