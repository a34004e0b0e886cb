"""`pbs eval`'s measurements: the compared strategies (the profile, without permutation, the published
method), dense and sparse forwards over a document with their next-token metrics, the Pareto front, and
passkey retrieval with dense and PBS prefill."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from pbs_kernels import PBSConfig

from . import fidelity
from ..console import debug_enabled, err
from ..errors import UsageError
from . import models, presets, reports
from .documents import read_document
from .prefill import greedy_generate, run_prefill, tokenize
from .sizes import parse_sizes


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


def passkey_answer(mdl, tokenizer, ids, config: PBSConfig | None, max_new_tokens: int = 8) -> tuple[str, float]:
    """Greedy answer to a passkey prompt ids (1, N) after a prefill with ``config`` (None: dense SDPA);
    decoding runs dense over the prefill's KV cache and stops at an end-of-sequence token. Returns
    (text, mean density of the prefill's layers)."""
    from . import integration

    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    attn = "sdpa" if config is None else integration.NAME
    res = run_prefill(mdl, ids, attn, config, 0, 1, keep_cache=True)
    gen, _ = greedy_generate(mdl, res.last_logits, res.cache, max_new_tokens, eos_ids)
    dens = [s.density for s in res.layers if s.density is not None]
    return tokenizer.decode(gen, skip_special_tokens=True), sum(dens) / max(1, len(dens))


def passkey_eval(mdl, tokenizer, filler: str, lengths: list[int], depths: list[float], trials: int,
                 config: PBSConfig, seed: int, max_new_tokens: int = 8) -> list[dict]:
    """Dense vs PBS retrieval at every (length, depth), ``trials`` random keys each."""
    import torch

    from . import integration

    rng = random.Random(seed)
    cells = []
    for length in lengths:
        for depth in depths:
            hits = {"dense": 0, "pbs": 0}
            answers = []
            for _ in range(trials):
                prompt = fidelity.passkey_prompt(tokenizer, filler, length, depth, fidelity.random_key(rng))
                ids = torch.tensor([prompt.ids], device=mdl.device)
                row = {"key": prompt.key}
                for name, cfg in (("dense", None), ("pbs", config)):
                    text, density = passkey_answer(mdl, tokenizer, ids, cfg, max_new_tokens)
                    hits[name] += fidelity.passkey_found(text, prompt.key)
                    row[name] = text
                    if name == "pbs":
                        row["density"] = density
                answers.append(row)
            integration.set_attention(mdl, integration.NAME)
            cells.append({"length": length, "depth": depth, "trials": trials,
                          "dense_accuracy": hits["dense"] / trials, "pbs_accuracy": hits["pbs"] / trials,
                          "answers": answers})
            err.print(f"passkey {length} tokens, depth {depth:g}: dense {hits['dense']}/{trials}, "
                      f"pbs {hits['pbs']}/{trials}", highlight=False, markup=False)
    return cells


# -- `pbs eval`: a request to its record ------------------------------------------------------------


@dataclass(frozen=True)
class EvalRequest:
    """The options of one `pbs eval` (thresholds, depths and --max-tokens parsed)."""

    doc: str
    model: str
    profile: str | None = None
    thresholds: tuple[float | None, ...] = (None,)  # None: the profile's threshold alone
    max_tokens: int | None = None
    recall_rows: int = 64
    continuation: int | None = None
    passkey: bool = False
    lengths: str = ""
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    trials: int = 2
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0


def run(req: EvalRequest) -> dict[str, Any]:
    """Load the model, then the text evaluation (or passkey retrieval with ``passkey``); the JSON record."""
    import torch

    dev = models.resolve_device(req.device)
    # the profile `pbs prefill` would run on this device (on CUDA an unchosen default may become `gpu`)
    config, profile_name = presets.resolve_config(req.profile, device=dev)
    torch_dtype = models.resolve_dtype(req.dtype, dev)
    text, doc_name = read_document(req.doc)
    spec = models.resolve_model(req.model)
    if req.profile is None and spec.profile and spec.profile != profile_name:
        config, profile_name = presets.resolve_config(spec.profile, device=dev, explicit=False)
    err.print(f"model: {spec.describe()}", highlight=False, markup=False)
    models.quiet_transformers(debug_enabled())
    torch.manual_seed(req.seed)
    source = models.ModelSource(spec)
    context = source.max_positions()
    loaded = source.load(torch_dtype, dev, attn_implementation="pbs")
    base = dict(model={**spec.to_dict(), "weights": str(loaded.weights)}, document=doc_name,
                device=str(loaded.model.device), dtype=str(torch_dtype).removeprefix("torch."), profile=profile_name,
                config=config.to_dict())
    run_mode = _passkey if req.passkey else _text
    return run_mode(req, loaded, text, doc_name, context, config, profile_name, base)


def _cap(limit: int | None, context: int | None) -> int | None:
    return min(x for x in (limit, context) if x) if (limit or context) else None


def _passkey(req: EvalRequest, loaded, text: str, doc_name: str, context: int | None, config: PBSConfig,
             profile_name: str, base: dict[str, Any]) -> dict[str, Any]:
    top = _cap(req.max_tokens, context) or 8192
    sizes = parse_sizes(req.lengths) if req.lengths else [n for n in (1024, 2048, 4096, 8192, 16384, 32768)
                                                          if n <= top]
    too_long = [n for n in sizes if context and n > context]
    if too_long:
        raise UsageError(f"--lengths {too_long} exceed the model's {context} positions; pass lengths <= {context}")
    depths = list(req.depths)
    cells = passkey_eval(loaded.model, loaded.tokenizer, text, sizes, depths, req.trials, config, req.seed)
    return reports.envelope("eval", mode="passkey", **base, lengths=sizes, depths=depths, trials=req.trials,
                            passkey=cells)


def _text(req: EvalRequest, loaded, text: str, doc_name: str, context: int | None, config: PBSConfig,
          profile_name: str, base: dict[str, Any]) -> dict[str, Any]:
    import torch

    mdl = loaded.model
    ids_list, doc_tokens = tokenize(loaded.tokenizer, text, _cap(req.max_tokens, context), True, 0, doc_name)
    ids = torch.tensor([ids_list], device=mdl.device)
    cont = 0
    if req.continuation != 0:
        try:
            cont = fidelity.continuation_tokens(len(ids_list), req.continuation)
        except ValueError as exc:
            raise UsageError(f"--continuation: {exc} (0 skips it)") from None
    runs = [(label, cfg.replace(threshold=t)) for t in req.thresholds
            for label, cfg in strategies(config, profile_name)]
    dense, rows = evaluate(mdl, ids, runs, req.recall_rows, cont)
    rec = reports.envelope("eval", mode="text", **base, document_tokens=doc_tokens, prompt_tokens=len(ids_list),
                           continuation_tokens=cont, thresholds=[r for r in req.thresholds if r is not None],
                           dense=dense, results=rows)
    rec["pareto"] = pareto(rows)
    return rec
