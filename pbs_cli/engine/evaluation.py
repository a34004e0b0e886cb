"""`pbs eval`'s measurements: the compared strategies (the profile, without permutation, the published
method), dense and sparse forwards over a document with their next-token metrics, the Pareto front, and
passkey retrieval with dense and PBS prefill."""

from __future__ import annotations

import random

from pbs_kernels import PBSConfig

from . import fidelity
from ..console import err
from . import models
from .prefill import greedy_generate, run_prefill


# The published method (the `published` preset; a test keeps the two equal): one key permutation per
# query head scored by the last query block, top-p 0.9 over mean-pooled off-diagonal block scores, then
# the sink block added; no local block.
PUBLISHED = PBSConfig(block_size=128, segment_size=256, threshold=0.9, permute=True, per_head_permutation=True,
                      sink=True, forced_in_top_p=False, local_blocks=0)


def strategies(config: PBSConfig, profile: str) -> list[tuple[str, PBSConfig]]:
    """(label, config) of every compared selection: the profile, no permutation, the published one."""
    return [(f"pbs ({profile})", config), (f"no-permutation ({profile})", config.replace(permute=False)),
            ("published PBS-Attn", PUBLISHED)]


def evaluate(mdl, ids, runs: list[tuple[str, PBSConfig]], recall_rows: int,
             continuation: int = 0) -> tuple[dict, list[dict]]:
    """Dense forward, then one PBS forward per (label, config); with ``continuation`` > 0 also
    prefill-then-continue (``fidelity.continuation_metrics``) over the last ``continuation`` tokens.
    Returns (dense row, rows)."""
    n = ids.shape[1]
    with models.progress(f"dense SDPA forward over {n} tokens"):
        dense = fidelity.run_forward(mdl, ids, None)
    floor = noise_floor(mdl, ids, dense.hidden)
    prefix = n - continuation
    dense_continued = None
    if continuation:
        with models.progress(f"dense prefill of {prefix} tokens, then {continuation} tokens over its cache"):
            dense_continued = fidelity.continue_after_prefill(mdl, ids, None, prefix)
    rows = []
    for i, (label, cfg) in enumerate(runs):
        err.print(f"[{i + 1}/{len(runs)}] {label}: threshold {cfg.threshold}", highlight=False, markup=False)
        with models.progress(f"{label}, threshold {cfg.threshold}"):
            res = fidelity.run_forward(mdl, ids, cfg, recall_rows)
            metrics = fidelity.compare_hidden(mdl, dense.hidden, res.hidden, ids)
        row = {"strategy": label, "threshold": cfg.threshold, "density": res.density, "recall": res.recall,
               **metrics, "continuation": None, "config": cfg.to_dict(), "layers": res.layers}
        del res
        if continuation:
            with models.progress(f"{label}: prefill of {prefix} tokens, then {continuation} tokens over its cache"):
                row["continuation"] = fidelity.continuation_metrics(mdl, ids, cfg, prefix, dense_continued)
        rows.append(row)
    ppl = rows[0]["ppl_dense"] if rows else None
    dense_row = {"strategy": "dense SDPA", "density": 1.0, "ppl": ppl, "top1_agreement": 1.0, "mean_kl": 0.0}
    if floor is not None:
        dense_row["noise_floor"] = floor
    return dense_row, rows


def noise_floor(mdl, ids, hidden) -> dict | None:
    """The noise floor of half precision: ``hidden``, the dense forward in the model's bf16/fp16, against the
    dense forward of the same weights computed in float32 (top-1 agreement, mean KL, perplexities). Sparse rows
    are measured against the half-precision dense forward, so differences below this floor are rounding, not
    sparsity. None for a float32 model."""
    import torch

    dtype = mdl.dtype
    if dtype == torch.float32:
        return None
    with models.progress(f"dense forward in float32 (the {str(dtype).removeprefix('torch.')} noise floor)"):
        mdl.to(torch.float32)
        try:
            reference = fidelity.run_forward(mdl, ids, None).hidden
            metrics = fidelity.compare_hidden(mdl, reference, hidden.float(), ids)
        finally:
            mdl.to(dtype)
    return {"reference": "float32", "dtype": str(dtype).removeprefix("torch."), **metrics}


def pareto(rows: list[dict]) -> list[bool]:
    """True where no other row has lower-or-equal density and strictly better (lower) KL."""
    return [not any(o["density"] <= r["density"] and o["mean_kl"] < r["mean_kl"] and o is not r for o in rows)
            for r in rows]


def passkey_eval(mdl, tokenizer, filler: str, lengths: list[int], depths: list[float], trials: int,
                 config: PBSConfig, seed: int, max_new_tokens: int = 8) -> list[dict]:
    """Dense vs PBS retrieval at every (length, depth), ``trials`` random keys each."""
    import torch

    from . import integration

    rng = random.Random(seed)
    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    cells = []
    for length in lengths:
        for depth in depths:
            hits = {"dense": 0, "pbs": 0}
            answers = []
            for _ in range(trials):
                prompt = fidelity.passkey_prompt(tokenizer, filler, length, depth, fidelity.random_key(rng))
                ids = torch.tensor([prompt.ids], device=mdl.device)
                row = {"key": prompt.key}
                for name, attn in (("dense", "sdpa"), ("pbs", integration.NAME)):
                    res = run_prefill(mdl, ids, attn, config, 0, 1, keep_cache=True)
                    gen, _ = greedy_generate(mdl, res.last_logits, res.cache, max_new_tokens, eos_ids)
                    text = tokenizer.decode(gen, skip_special_tokens=True)
                    ok = fidelity.passkey_found(text, prompt.key)
                    hits[name] += ok
                    row[name] = text
                    if name == "pbs":
                        dens = [s.density for s in res.layers if s.density is not None]
                        row["density"] = sum(dens) / max(1, len(dens))
                answers.append(row)
            integration.set_attention(mdl, integration.NAME)
            cells.append({"length": length, "depth": depth, "trials": trials,
                          "dense_accuracy": hits["dense"] / trials, "pbs_accuracy": hits["pbs"] / trials,
                          "answers": answers})
            err.print(f"passkey {length} tokens, depth {depth:g}: dense {hits['dense']}/{trials}, "
                      f"pbs {hits['pbs']}/{trials}", highlight=False, markup=False)
    return cells
