"""`pbs calibrate`'s work: the candidate block sizes, the smallest threshold of each whose result meets a
target (by bisection), the sparsest of them saved as a named preset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pbs_kernels import PBSConfig

from ..console import debug_enabled, err
from ..errors import UsageError
from . import fidelity, models, presets, reports
from .documents import read_document
from .prefill import tokenize


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


@dataclass(frozen=True)
class CalibrateRequest:
    """The options of one `pbs calibrate`; exactly one target (checked by ``check``)."""

    doc: str
    name: str
    model: str
    target_recall: float | None = None
    target_kl: float | None = None
    profile: str | None = None
    block_sizes: tuple[int, ...] = (64, 128)
    max_tokens: int | None = None
    recall_rows: int = 64
    device: str = "auto"
    dtype: str = "auto"
    force: bool = False

    @property
    def target(self) -> tuple[str, float]:
        return ("recall", self.target_recall) if self.target_recall is not None else ("kl", self.target_kl)


def check(req: CalibrateRequest) -> None:
    """The target and the preset name, refused before anything loads."""
    import math

    if (req.target_recall is None) == (req.target_kl is None):
        raise UsageError("pass exactly one of --target-recall R (e.g. 0.95) or --target-kl K (e.g. 0.01)")
    if req.target_recall is not None and not 0.0 < req.target_recall <= 1.0:
        raise UsageError(f"--target-recall must be in (0, 1], got {req.target_recall}")
    if req.target_kl is not None and not 0.0 < req.target_kl < math.inf:
        raise UsageError(f"--target-kl must be a finite number of nats > 0 (e.g. 0.01), got {req.target_kl}")
    presets.check_new_profile(req.name, req.force)  # a bad or built-in --name: refused before the model loads


def candidates(base: PBSConfig, sizes: tuple[int, ...]) -> list[PBSConfig]:
    """``base`` at each block size (segment and sampled rows fitted to it)."""
    found = []
    for bs in sizes:
        try:
            seg = max(base.segment_size, bs)
            found.append(base.replace(block_size=bs, segment_size=seg - seg % bs,
                                      sample_rows=min(base.sample_rows, bs)))
        except ValueError as exc:
            raise UsageError(f"--block-sizes: {exc}") from None
    return found


def _recall_search(mdl, ids, cands: list[PBSConfig], target: float, rows: int) -> tuple[dict | None, list[dict]]:
    """Plans on captured dense q/k: attention recall of sampled rows against ``target``."""
    with models.progress("dense forward (capturing q/k of every layer)"):
        _, captured = fidelity.capture_qk(mdl, ids)

    def evaluate(cfg: PBSConfig) -> dict:
        with models.progress(f"block {cfg.block_size}, threshold {cfg.threshold:g}"):
            st = fidelity.plan_stats(captured, cfg, rows)
        err.print(f"block {cfg.block_size}, threshold {cfg.threshold:g}: density {st['density']:.1%}, "
                  f"recall {st['recall']:.4f}", highlight=False, markup=False)
        return {"block_size": cfg.block_size, "density": st["density"], "recall": st["recall"],
                "recall_min_head": st["recall_min_head"], "mean_kl": None, "config": cfg.to_dict()}

    return _sparsest(cands, evaluate, lambda r: r["recall"] >= target)


def _kl_search(mdl, ids, cands: list[PBSConfig], target: float) -> tuple[dict | None, list[dict]]:
    """A PBS forward per step: mean KL of the next-token distributions against ``target``."""
    with models.progress("dense forward"):
        dense = fidelity.run_forward(mdl, ids, None)

    def evaluate(cfg: PBSConfig) -> dict:
        with models.progress(f"block {cfg.block_size}, threshold {cfg.threshold:g}: PBS forward"):
            res = fidelity.run_forward(mdl, ids, cfg, 0)
            m = fidelity.compare_hidden(mdl, dense.hidden, res.hidden, ids)
        err.print(f"block {cfg.block_size}, threshold {cfg.threshold:g}: density {res.density:.1%}, "
                  f"KL {m['mean_kl']:.4f}", highlight=False, markup=False)
        return {"block_size": cfg.block_size, "density": res.density, "recall": None,
                "mean_kl": m["mean_kl"], "top1_agreement": m["top1_agreement"],
                "ppl_increase": m["ppl_increase"], "config": cfg.to_dict()}

    return _sparsest(cands, evaluate, lambda r: r["mean_kl"] <= target)


def _sparsest(cands: list[PBSConfig], evaluate: Callable[[PBSConfig], dict],
              meets: Callable[[dict], bool]) -> tuple[dict | None, list[dict]]:
    """Each candidate's smallest threshold that meets the target; the sparsest of those, and all tried."""
    tried: list[dict] = []
    best: dict | None = None
    for cand in cands:
        found, steps = search_threshold(lambda tau, cand=cand: evaluate(cand.replace(threshold=tau)), meets)
        tried += steps
        if found is not None and (best is None or found["density"] < best["density"]):
            best = found
    return best, tried


def run(req: CalibrateRequest) -> dict[str, Any]:
    """Search, save the preset; the JSON record (``profile_path``: the preset file written)."""
    import torch

    check(req)
    dev = models.resolve_device(req.device)
    base, base_name = presets.resolve_config(req.profile, device=dev)  # what `pbs prefill` would start from here
    cands = candidates(base, req.block_sizes)
    torch_dtype = models.resolve_dtype(req.dtype, dev)
    text, doc_name = read_document(req.doc)
    spec = models.resolve_model(req.model)
    err.print(f"model: {spec.describe()}", highlight=False, markup=False)
    models.quiet_transformers(debug_enabled())
    source = models.ModelSource(spec)
    context = source.max_positions()
    cap = min(x for x in (req.max_tokens, context) if x) if (req.max_tokens or context) else None
    loaded = source.load(torch_dtype, dev, attn_implementation="pbs")
    mdl = loaded.model
    ids_list, doc_tokens = tokenize(loaded.tokenizer, text, cap, True, 0, doc_name)
    ids = torch.tensor([ids_list], device=mdl.device)
    kind, value = req.target
    best, tried = (_recall_search(mdl, ids, cands, value, req.recall_rows) if kind == "recall"
                   else _kl_search(mdl, ids, cands, value))
    rec = reports.envelope("calibrate", model={**spec.to_dict(), "weights": str(loaded.weights)}, document=doc_name,
                           device=str(mdl.device), dtype=str(torch_dtype).removeprefix("torch."),
                           base_profile=base_name, document_tokens=doc_tokens, prompt_tokens=len(ids_list),
                           target={"kind": kind, "value": value}, tried=tried, best=best)
    rec["profile_path"] = str(_save(req, rec, spec.name))
    return rec


def _save(req: CalibrateRequest, rec: dict[str, Any], model_name: str) -> Path:
    """The best result as preset ``req.name``."""
    kind, value = req.target
    best = rec["best"]
    if best is None:
        # tau = 1.0 (dense) always meets a target; only a failed search over a bad range ends here
        raise UsageError(f"no threshold in [0.5, 1.0) met {kind} {value:g}; even dense may be needed — "
                         "try a looser target")
    what = f"recall >= {value:g}" if kind == "recall" else f"mean KL <= {value:g}"
    return presets.save_user_profile(
        req.name, PBSConfig.from_dict(best["config"]),
        description=f"calibrated by pbs calibrate on {Path(rec['document']).name}: {what}, "
                    f"density {best['density']:.1%}",
        extra={"calibration": {"model": model_name, "document": rec["document"], "tokens": rec["prompt_tokens"],
                               "target": kind, "value": value, "density": round(best["density"], 5),
                               "achieved": round(best["recall"] if kind == "recall" else best["mean_kl"], 6),
                               "timestamp": rec["timestamp"]}},
        force=req.force)
