"""Fidelity sweep of PBS selection options on a real model and real text (CPU is fine, slow).

Two measurements:

* ``proxy``: one dense forward captures every layer's post-RoPE q/k (``pbs_cli.engine.fidelity.capture_qk``);
  each config then builds its plan per layer and we measure the attention-mass recall of sampled query rows
  (``pbs_cli.engine.fidelity.plan_stats``; cheap: no sparse forward).
* ``full``: the model runs end to end with PBS attention in every layer; perplexity, next-token top-1
  agreement and mean KL(dense || sparse) over all positions against a dense SDPA forward
  (``pbs_cli.engine.fidelity.run_forward`` and ``compare_hidden``, as `pbs eval` computes them);
* ``passkey``: greedy retrieval of a hidden key after a dense and after each config's prefill
  (``pbs_cli.engine.evaluation.passkey_answer``, as `pbs eval --passkey`).

The script adds what `pbs eval` does not offer: any selection options (``--config NAME:key=value``),
several documents, and pre-tokenized ids; the metrics are the engine's.

The forwards go through the "pbs" attention of ``pbs_cli.engine.integration``.

Usage (see BENCHMARKS.md "Fidelity (CPU)" for the runs we report)::

    python benchmarks/fidelity_sweep.py --model /tmp/smol-cache --doc argparse --mode proxy \\
        --config published --config 'sampled:score=sampled,threshold=0.9'
    python benchmarks/fidelity_sweep.py --model /tmp/smol-cache --doc inspect --mode full --config published

``--doc`` is a standard-library module name (its source file is the text) or a path.
A config is ``NAME`` from ``NAMED`` below or ``NAME:key=value,...`` on top of ``POOLED`` (the published
blocks and tau with the default ranking: one permutation per KV head, forced blocks counted in tau).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
import time
from pathlib import Path

import torch

import config_changes
from pbs_kernels import PBSConfig
from pbs_cli.engine import evaluation, fidelity, integration

# the base of NAME:key=value configs: the published blocks and tau with the config defaults' ranking
POOLED = PBSConfig(block_size=128, segment_size=256, threshold=0.9, local_blocks=0)
# the published method exactly (the `published` preset)
PUBLISHED = POOLED.replace(per_head_permutation=True, forced_in_top_p=False)
NAMED = {
    "published": PUBLISHED,
    "noperm": POOLED.replace(permute=False),
}

def parse_config(text: str) -> tuple[str, PBSConfig]:
    name, _, spec = text.partition(":")
    return name, config_changes.apply(POOLED, spec) if spec else NAMED[name]


def load(model: str, device: str = "cpu"):
    """A model directory (safetensors) or a .gguf file, in fp32 on ``device``."""
    import transformers

    path = Path(model)
    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    folder = path.parent if kw else path
    m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).to(device)
    integration.set_attention(m, integration.NAME)
    m.eval()
    tok = None if kw else transformers.AutoTokenizer.from_pretrained(folder)
    return m, tok


def doc_text(doc: str) -> str:
    path = Path(doc)
    if not path.exists():
        path = Path(inspect.getsourcefile(importlib.import_module(doc)))
    return path.read_text()


def metrics(model, dense_hidden: torch.Tensor, hidden: torch.Tensor, ids: torch.Tensor) -> dict:
    """Perplexity of the text, top-1 agreement and mean KL(dense || sparse) over all positions, as `pbs eval`
    computes them (``pbs_cli.engine.fidelity.compare_hidden``), under this script's short keys."""
    m = fidelity.compare_hidden(model, dense_hidden, hidden, ids)
    return {"ppl": m["ppl"], "top1": m["top1_agreement"], "kl": m["mean_kl"]}


def proxy(model, ids, configs, rows: int = 256) -> list[dict]:
    """Density and attention recall of each config's plans on the captured dense q/k
    (``pbs_cli.engine.fidelity.plan_stats``: ``rows`` query rows per layer from the first segment's end on)."""
    t = time.time()
    _, captured = fidelity.capture_qk(model, ids)
    print(f"capture forward {time.time() - t:.1f}s", file=sys.stderr)
    results = []
    for name, cfg in configs:
        t = time.time()
        st = fidelity.plan_stats(captured, cfg, rows)
        res = {"name": name, "density": st["density"], "recall": st["recall"],
               "min_layer_recall": min(x["recall"] for x in st["layers"]),
               "per_layer_recall": [round(x["recall"], 4) for x in st["layers"]
                                    if cfg.for_layer(x["layer"]) is not None],
               "config": cfg.to_dict(), "seconds": time.time() - t}
        print(json.dumps({k: v for k, v in res.items() if k not in ("config", "per_layer_recall")}), flush=True)
        results.append(res)
    return results


def full(model, ids, configs) -> list[dict]:
    t = time.time()
    dense = fidelity.run_forward(model, ids, None)
    base = metrics(model, dense.hidden, dense.hidden, ids)
    print(json.dumps({"name": "dense", "density": 1.0, **base, "seconds": time.time() - t}), flush=True)
    results = []
    for name, cfg in configs:
        t = time.time()
        res = fidelity.run_forward(model, ids, cfg, recall_rows=0)
        res = {"name": name, "density": res.density, **metrics(model, dense.hidden, res.hidden, ids),
               "seconds": time.time() - t, "config": cfg.to_dict(),
               "layer_density": [round(layer["density"], 4) for layer in res.layers]}
        print(json.dumps({k: v for k, v in res.items() if k not in ("config", "layer_density")}), flush=True)
        results.append(res)
    return results


def passkey(model, tok, filler_ids: torch.Tensor, configs, lengths, depths, trials: int, seed: int = 0) -> list[dict]:
    """Dense vs each config: greedy retrieval of a random key hidden at ``depths`` of real filler text
    (``pbs_cli.engine.evaluation.passkey_answer``, as `pbs eval --passkey` runs it)."""
    import random

    filler = tok.decode(filler_ids[0].tolist())
    rng = random.Random(seed)
    rows = []
    for length in lengths:
        for depth in depths:
            for _ in range(trials):
                p = fidelity.passkey_prompt(tok, filler, length, depth, fidelity.random_key(rng))
                ids = torch.tensor([p.ids], device=model.device)
                row = {"length": length, "depth": depth, "key": p.key}
                for name, cfg in [("dense", None)] + list(configs):
                    text, _ = evaluation.passkey_answer(model, tok, ids, cfg)
                    row[name] = fidelity.passkey_found(text, p.key)
                    row[name + "_text"] = text
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a transformers model directory (safetensors)")
    ap.add_argument("--doc", action="append", default=[],
                    help="stdlib module name or path (repeatable); with --ids, a key of that file")
    ap.add_argument("--ids", help="torch file {doc name: int64 (1, N) token ids} (tokenized elsewhere)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--mode", choices=["proxy", "full", "passkey"], default="proxy")
    ap.add_argument("--tokenizer", help="tokenizer folder or .gguf (passkey mode, when --model has none)")
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--config", action="append", default=[])
    ap.add_argument("--config-file", help="one config spec per line (as --config)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load(args.model, args.device)
    specs = args.config + (Path(args.config_file).read_text().split() if args.config_file else [])
    configs = [parse_config(c) for c in specs] or list(NAMED.items())
    stored = torch.load(args.ids) if args.ids else {}
    results = {}
    if args.mode == "passkey":
        import transformers

        t = Path(args.tokenizer or args.model)
        tok = transformers.AutoTokenizer.from_pretrained(t.parent, gguf_file=t.name) if t.suffix == ".gguf" \
            else transformers.AutoTokenizer.from_pretrained(t)
        doc = (args.doc or ["argparse"])[0]
        filler = stored[doc] if doc in stored else tok(doc_text(doc), return_tensors="pt").input_ids
        results = passkey(model, tok, filler, configs, [int(x) for x in args.lengths.split(",")],
                          [float(x) for x in args.depths.split(",")], args.trials)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        for name, _ in [("dense", None)] + configs:
            by = {}
            for r in results:
                by.setdefault(r["length"], []).append(r[name])
            print(name, {k: f"{sum(v)}/{len(v)}" for k, v in by.items()}, flush=True)
        return
    for doc in args.doc or ["argparse"]:
        ids = stored[doc] if doc in stored else tok(doc_text(doc), return_tensors="pt").input_ids
        ids = ids[:, : args.tokens].to(args.device)
        print(f"doc {doc}: {ids.shape[1]} tokens", file=sys.stderr, flush=True)
        print(json.dumps({"doc": doc}), flush=True)
        results[doc] = (proxy if args.mode == "proxy" else full)(model, ids, configs)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
