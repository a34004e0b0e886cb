"""Time-to-first-token of a Llama-3.1-8B-shaped model (random weights) on 1 GPU vs N GPUs tensor-parallel.

    python benchmarks/tp_bench.py --tp 2 --lengths 32k,128k,256k,512k --dense-max 128k --out /tmp/tp_bench

Steps (each can run alone, so every device command stays short; results accumulate in --out):

1. build: a random-weight ``LlamaForCausalLM`` with Llama-3.1-8B's config (32 layers, hidden 4096,
   32 query / 8 KV heads, head_dim 128, MLP 14336, vocabulary 128256, llama3 RoPE), bf16, saved as
   safetensors in --model-dir (skipped when it exists). ``--shape tiny`` builds a 2-layer 4/2-head
   model instead, for a CPU smoke test (gloo).
2. run 1: one process, whole model on cuda:0 (``--only 1``).
3. run N: N ranks through ``pbs_cli.engine.distributed.launch`` (torchrun's engine), transformers'
   ``tp_plan="auto"`` sharding heads and MLP (``--only N``).
4. compare: a table of TTFT per length and attention (pbs, dense sdpa), 1 vs N GPUs, peak memory,
   PBS density, and how far the N-GPU last-token logits are from the 1-GPU ones.

TTFT here = one forward over N prompt tokens (no KV cache kept) plus the LM head on the last
position, synchronized; median of --iters runs after --warmup; for N ranks, each run's slowest rank.
Lengths ascend; after an out-of-memory a length and every longer one are reported as "oom".

Logit check: err = max |logits_N - logits_1| / max |logits_1| on the last position (bf16 both). Dense
SDPA under tensor parallelism differs from one GPU only by reduction order; its err is the noise floor.
PBS "matches" when err_pbs <= 2 * err_sdpa + 0.01 (the tolerance rule with dense TP as the reference
noise; 0.01 absorbs blocks whose selection flips at the threshold) and the top-1 token agrees.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from pbs_cli.engine import distributed  # noqa: E402
from pbs_cli.engine.sizes import format_size, parse_sizes  # noqa: E402

LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                   max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001,
                   tie_word_embeddings=False,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192})
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=131072, tie_word_embeddings=False)


# -- build ----------------------------------------------------------------------------------


def build_model(model_dir: Path, shape: str, layers: int | None, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors")):
        print(f"model: reusing {model_dir}", file=sys.stderr)
        return
    fields = dict(LLAMA_31_8B if shape == "8b" else TINY)
    if layers:
        fields["num_hidden_layers"] = layers
    config = LlamaConfig(**fields)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        model = LlamaForCausalLM(config)  # transformers' own init: normal(0, initializer_range)
    torch.set_default_dtype(torch.float32)
    model.config.dtype = torch.bfloat16
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
    tmp.rename(model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: built {n_params / 1e9:.2f}B random parameters ({shape}) in {model_dir} "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    del model


# -- one side of the comparison (1 process, or one rank of N) --------------------------------


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def worker(args) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from pbs_cli.engine import dense_sdpa, integration

    from pbs_cli.engine import presets

    info = distributed.tp_context(None, "auto")
    integration.register()
    t0 = time.perf_counter()
    place = distributed.load_kwargs_for_tp(info.size) or ({"device_map": "cuda"} if torch.cuda.is_available() else {})
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16 if torch.cuda.is_available()
                                                 else torch.float32, attn_implementation="pbs", **place)
    model.eval()
    load_s = distributed.reduce_max(time.perf_counter() - t0)
    device = model.device
    lengths = parse_sizes(args.lengths)
    dense_max = parse_sizes(args.dense_max)[0] if args.dense_max else max(lengths)
    # the preset pbs uses on a GPU, with this run's threshold / block / segment
    config, _ = presets.resolve_config("gpu", threshold=args.threshold, block_size=args.block_size,
                                       segment_size=args.segment_size)
    # dense attention on cuDNN where it runs this shape (the fastest SDPA backend on an H100), else PyTorch's choice
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads // info.size, cfg.num_key_value_heads // info.size
    dense = None
    if torch.cuda.is_available():
        mode, _ = dense_sdpa.probe_sdpa("sdpa-cudnn", device, torch.bfloat16, heads, kv_heads, cfg.head_dim)
        dense = dense_sdpa.DenseChoice("sdpa-cudnn", mode) if mode else None
    gen = torch.Generator().manual_seed(args.seed)
    ids_all = torch.randint(0, model.config.vocab_size, (1, max(lengths)), generator=gen).to(device)
    out = Path(args.out)
    tag = f"tp{info.size}"
    results: dict = {"tp": info.size, "backend": info.backend, "dense_sdpa": dense.name if dense else "pytorch", "device": torch.cuda.get_device_name()
                     if torch.cuda.is_available() else "cpu", "load_s": load_s, "config": config.to_dict(),
                     "model": {k: getattr(model.config, k) for k in ("num_hidden_layers", "num_attention_heads",
                                                                     "num_key_value_heads", "head_dim", "hidden_size")},
                     "lengths": lengths, "runs": []}
    logits: dict[str, torch.Tensor] = {}
    oom_from: dict[str, int] = {}

    def save() -> None:
        if info.is_main:
            (out / f"{tag}.json").write_text(json.dumps(results, indent=1))
            if logits:
                save_file(logits, str(out / f"{tag}_logits.safetensors"))

    attns = [a for a in args.attn.split(",") if a]
    for n in lengths:
        ids = ids_all[:, :n]
        for attn in attns:
            if attn == "sdpa" and n > dense_max:
                continue
            if attn in oom_from:
                results["runs"].append({"n": n, "attn": attn, "status": "oom"})
                continue
            integration.set_attention(model, integration.NAME if attn == "pbs" else integration.DENSE_NAME)
            recorder = integration.Recorder()
            times: list[float] = []
            try:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                with torch.inference_mode(), integration.pbs_run(config, recorder, dense):
                    for i in range(args.warmup + args.iters):
                        recorder.reset()
                        distributed.barrier()
                        _sync()
                        t = time.perf_counter()
                        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
                        last = model.lm_head(hidden[:, -1:]).float()[0, -1]
                        _sync()
                        if i >= args.warmup:
                            times.append((time.perf_counter() - t) * 1e3)
                        del hidden
            except torch.OutOfMemoryError as exc:
                print(f"{tag} N={n} {attn}: out of memory ({str(exc).splitlines()[0][:120]})", file=sys.stderr)
                results["runs"].append({"n": n, "attn": attn, "status": "oom"})
                oom_from[attn] = n
                save()
                if info.active:  # the other ranks wait in a collective: end the job (the launcher stops them)
                    sys.stderr.flush()
                    os._exit(4)
                continue
            times = distributed.reduce_max(times)
            layers = recorder.prefill_layers()
            distributed.merge_layer_stats(layers)
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
            run = {"n": n, "attn": attn, "status": "ok", "ttft_ms": statistics.median(times), "times_ms": times,
                   "peak_gib": distributed.reduce_max(peak), "density": recorder.density() if attn == "pbs" else 1.0,
                   "paths": sorted({s.path for s in layers})}
            results["runs"].append(run)
            logits[f"{attn}_{n}"] = last.cpu().contiguous()
            if info.is_main:
                print(f"{tag} N={format_size(n)} {attn}: {run['ttft_ms']:.1f} ms, peak {run['peak_gib']:.1f} GiB/GPU"
                      + (f", density {run['density']:.1%}" if attn == "pbs" else ""), file=sys.stderr, flush=True)
            save()
    save()


# -- compare --------------------------------------------------------------------------------


def compare(out: Path, tp: int, markdown: bool) -> int:
    from safetensors.torch import load_file

    one_path, many_path = out / "tp1.json", out / f"tp{tp}.json"
    if not one_path.is_file() or not many_path.is_file():
        print(f"compare: needs {one_path} and {many_path}; run --only 1 and --only {tp} first", file=sys.stderr)
        return 2
    one, many = json.loads(one_path.read_text()), json.loads(many_path.read_text())
    l1 = load_file(str(out / "tp1_logits.safetensors")) if (out / "tp1_logits.safetensors").is_file() else {}
    ln = load_file(str(out / f"tp{tp}_logits.safetensors")) if (out / f"tp{tp}_logits.safetensors").is_file() else {}
    runs1 = {(r["n"], r["attn"]): r for r in one["runs"]}
    runsn = {(r["n"], r["attn"]): r for r in many["runs"]}
    errs: dict[tuple[int, str], tuple[float, bool]] = {}
    for key in set(runs1) & set(runsn):
        name = f"{key[1]}_{key[0]}"
        if name in l1 and name in ln:
            a, b = l1[name].double(), ln[name].double()
            errs[key] = ((a - b).abs().max().item() / max(a.abs().max().item(), 1e-30),
                         int(a.argmax()) == int(b.argmax()))
    lengths = sorted({k[0] for k in list(runs1) + list(runsn)})
    rows = []
    for n in lengths:
        for attn in ("pbs", "sdpa"):
            r1, rn = runs1.get((n, attn)), runsn.get((n, attn))
            if r1 is None and rn is None:
                continue

            def ms(r):
                if r is None:
                    return "not run"
                return f"{r['ttft_ms'] / 1e3:.2f} s" if r["status"] == "ok" else r["status"]

            speed = (f"{r1['ttft_ms'] / rn['ttft_ms']:.2f}x" if r1 and rn and r1["status"] == rn["status"] == "ok"
                     else "")
            mem = " / ".join(f"{r['peak_gib']:.1f}" if r and r["status"] == "ok" else "-" for r in (r1, rn))
            dens = next((f"{r['density']:.1%}" for r in (rn, r1) if r and r["status"] == "ok" and attn == "pbs"), "")
            check = ""
            if (n, attn) in errs:
                err, top1 = errs[(n, attn)]
                floor = errs.get((n, "sdpa"), (None, None))[0]
                ok = top1 and (attn == "sdpa" or floor is None or err <= 2 * floor + 0.01)
                check = f"{err:.2e}{'' if top1 else ' top-1 differs'}" + (" ok" if ok else " MISMATCH")
            rows.append((format_size(n), attn, ms(r1), ms(rn), speed, mem, dens, check))
    head = ("N", "attention", "1 GPU TTFT", f"{tp} GPUs TTFT", "speedup", "peak GiB/GPU (1 / N)", "PBS density",
            "logits rel. err (N vs 1)")
    m = one.get("model", {})
    shape = (f"{m.get('num_hidden_layers')} layers, {m.get('num_attention_heads')} q / {m.get('num_key_value_heads')} kv "
             f"heads, hidden {m.get('hidden_size')}")
    print(f"# TTFT, random-weight Llama ({shape}), {one['device']}: 1 GPU vs {tp} GPUs (tensor parallel, "
          f"{many['backend']}); PBS threshold {one['config']['threshold']}, block {one['config']['block_size']}, "
          f"segment {one['config']['segment_size']}")
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)] if rows else [len(h) for h in head]
        for row in (head, *rows):
            print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    bad = [r for r in rows if "MISMATCH" in r[-1]]
    return 1 if bad else 0


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2, help="GPUs of the tensor-parallel run (default 2)")
    p.add_argument("--lengths", default="32k,128k,256k", help="prompt lengths, ascending (k = 1024)")
    p.add_argument("--dense-max", default="128k", help="longest length timed with dense SDPA too ('' = all)")
    p.add_argument("--attn", default="pbs,sdpa", help="attentions to time: pbs, sdpa")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--segment-size", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", choices=("8b", "tiny"), default="8b", help="8b = Llama-3.1-8B; tiny = CPU smoke test")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (faster, less memory)")
    p.add_argument("--model-dir", default="/tmp/pbs-tp-bench/model", help="where the random model is (built once)")
    p.add_argument("--out", default="/tmp/pbs-tp-bench/results", help="results folder (JSON + last-token logits)")
    p.add_argument("--only", default="build,1,N,compare",
                   help="steps to run, comma list of build, 1, N, compare (default: all)")
    p.add_argument("--markdown", action="store_true", help="print the comparison as a Markdown table")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        worker(args)
        return 0
    import subprocess

    steps = {s.strip() for s in args.only.split(",") if s.strip()}
    model_dir, out = Path(args.model_dir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    if "build" in steps:
        build_model(model_dir, args.shape, args.layers, args.seed)
    passthrough = ["--worker", "--model-dir", str(model_dir), "--out", str(out), "--lengths", args.lengths,
                   "--dense-max", args.dense_max, "--attn", args.attn, "--threshold", str(args.threshold),
                   "--block-size", str(args.block_size), "--segment-size", str(args.segment_size),
                   "--warmup", str(args.warmup), "--iters", str(args.iters), "--seed", str(args.seed)]
    env = distributed.child_env(1)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    if "1" in steps:
        print("run: 1 process", file=sys.stderr, flush=True)
        code = subprocess.run([sys.executable, "-u", __file__, *passthrough], env=env).returncode
        if code:
            print(f"run 1: exit code {code} (results so far are kept)", file=sys.stderr)
    if "N" in steps or str(args.tp) in steps:
        print(f"run: {args.tp} ranks (tensor parallel)", file=sys.stderr, flush=True)
        code = distributed.launch(args.tp, [__file__, *passthrough])
        if code:
            print(f"run {args.tp}: exit code {code} (results so far are kept)", file=sys.stderr)
    if "compare" in steps:
        return compare(out, args.tp, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
