"""Permutation + sampled-row block selection (the ``default`` preset) on the GPU vs cuDNN dense attention.

For each model shape and length: ``pbs_kernels.permute.compute_permutation`` (Triton importance) and
``pbs_kernels.select.select_blocks`` (``pbs_kernels.triton.sampled``) timed separately, their sum, the
plain-PyTorch reference selection at the ``--reference-lens`` (the path CUDA ran before), dense causal
SDPA (cuDNN, else flash) on the same inputs, and the peak extra memory of permute + select. At
``--check-len`` the GPU plan is compared with the reference plan on fp32 inputs.

    python benchmarks/sampled_bench.py                                  # H100: 8k,32k,128k, both shapes
    python benchmarks/sampled_bench.py --shapes smollm2 --seq-lens 8k --json out.json
    python benchmarks/sampled_bench.py --set score=antidiagonal,sample_rows=4 --sweep   # another selection
    python benchmarks/sampled_bench.py --shapes llama --seq-lens 128k --kernels        # CUDA time per kernel
    # CPU smoke run (Triton interpreter):
    TRITON_INTERPRET=1 PBS_BACKEND=triton python benchmarks/sampled_bench.py \\
        --shapes smollm2 --seq-lens 600 --check-len 600 --reference-lens 600 --dtype float32 --iters 1 --warmup 0

Shapes: smollm2 (9 query / 3 KV heads, head_dim 64), llama (32 / 8, head_dim 128). Inputs are
structured (shared heavy-hitter key directions, a sink token, a slow drift), not Gaussian noise.
Timings: median of ``--iters`` runs after warm-up (CUDA events on a GPU, wall clock on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import tomllib
from importlib import resources

import torch
import triton

import config_changes
from pbs_cli.engine.sizes import parse_size

SHAPES = {"smollm2": (9, 3, 64), "llama": (32, 8, 128)}


def default_config():
    from pbs_kernels.config import PBSConfig

    text = resources.files("pbs_profiles").joinpath("default.toml").read_text()
    return PBSConfig.from_dict(tomllib.loads(text)["pbs"])


def structured_qkv(h_q, h_kv, n, d, dtype, device, seed=0):
    """q (1, H_q, N, D), k (1, H_kv, N, D): queries share three directions, 6% of keys are heavy
    hitters along one of them, token 0 is a sink, a slow drift gives locality."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dirs = torch.randn(3, d, device=device, generator=gen)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True) * math.sqrt(d)
    drift = torch.randn(d, device=device, generator=gen) / math.sqrt(d)
    pos = torch.linspace(0, 6.28, n, device=device)[:, None]

    def head(h, keys):  # one head at a time bounds the fp32 temporaries at long N
        x = 0.6 * torch.randn(n, d, device=device, generator=gen) + torch.sin(pos * (1 + h % 4)) * drift * 4
        if keys:
            heavy = torch.rand(n, 1, device=device, generator=gen) < 0.06
            x += heavy * dirs[torch.randint(0, 3, (n,), device=device, generator=gen)]
            x[0] += dirs[0]
        else:
            x += torch.rand(n, 3, device=device, generator=gen) @ dirs
        return x.to(dtype)

    q = torch.stack([head(h, False) for h in range(h_q)])[None]
    k = torch.stack([head(h, True) for h in range(h_kv)])[None]
    return q, k


def timeit(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn`` over ``iters`` calls after ``warmup`` (CUDA events on a GPU)."""
    from pbs_cli.engine.timing import bench

    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = max(1, iters)
    return bench(fn, device, warmup=warmup, min_repeats=n, max_repeats=n, memory=False).median_ms


def dense_time(q, k, warmup, iters):
    """(ms, backend name) of dense causal SDPA on expanded K/V: cuDNN, else flash; the default on a CPU."""
    f = torch.nn.functional.scaled_dot_product_attention
    ke = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    ve = torch.randn_like(ke)
    if not q.is_cuda:
        return timeit(lambda: f(q, ke, ve, is_causal=True), warmup, iters), "cpu-default"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                f(q, ke, ve, is_causal=True)
                return timeit(lambda: f(q, ke, ve, is_causal=True), warmup, iters), backend.name
        except RuntimeError as exc:  # noqa: PERF203
            print(f"  {backend.name} unavailable: {str(exc).splitlines()[0]}", file=sys.stderr)
    return float("nan"), "none"


def check_plan(q, k, cfg) -> dict:
    """GPU plan vs the reference plan on the same (fp32) inputs and the same permutation."""
    from pbs_kernels import reference, select
    from pbs_kernels.permute import compute_permutation

    perm = compute_permutation(q, k, cfg)
    perm_r = reference.compute_permutation(q, k, cfg)
    num, idx = select.select_blocks(q, k, perm_r, cfg)
    num_r, idx_r = reference.select_blocks(q, reference.permute_keys(k, perm_r), perm_r, cfg, k=k)
    same = (num == num_r) & (idx == idx_r).all(-1)
    return {"perm_equal_fraction": (perm == perm_r).float().mean().item(),
            "plan_rows_identical": same.float().mean().item(),
            "kept_blocks": int(num.sum()), "kept_blocks_reference": int(num_r.sum())}


# the scoring tiles the sweep times (SampledTiles fields): keys gathered through the permutation, then tiles
# reading a permuted copy of K (rows, warps, heads, key blocks, pipelining stages, TMA descriptor loads, the
# Gluon kernel)
SWEEP_TILES = (dict(rows=64, num_warps=4, num_stages=None, copy_keys=False, tma=False),
               *(dict(rows=rows, num_warps=warps, heads=heads, key_blocks=kb, num_stages=stages, copy_keys=True,
                      tma=tma)
                 for rows, warps, heads, kb, stages, tma in (
                     (64, 4, 1, 2, None, False), (64, 4, 1, 2, None, True), (128, 8, 1, 2, None, False),
                     (128, 8, 1, 2, None, True), (128, 8, 1, 2, 2, True), (128, 8, 1, 2, 4, True),
                     (128, 8, 1, 4, None, True), (128, 4, 1, 2, None, True), (256, 8, 4, 2, None, True))),
               # the default tile with the blocks before each program's segments in the Gluon kernel (block maxima)
               dict(gluon=True))


def sweep(q, k, perm, cfg, warmup, iters) -> dict:
    """Median ms of the GPU sampled selection (``pbs_kernels.triton.sampled``) per tile of its scoring
    kernel (``SWEEP_TILES``, or key stripes for score "antidiagonal"; passed as ``tiles=``), then the
    plan's top-p kernel (warps, one query block per program) after the current scoring tile."""
    from pbs_kernels.triton import sampled
    from pbs_kernels.triton.tiles import SAMPLED_TILES, SampledTiles

    stripes = cfg.score == "antidiagonal"

    def name(t: SampledTiles) -> str:
        reads = "-gluon" if t.gluon else "-tma" if t.tma else "-copy" if t.copy_keys else ""
        keys = f"kt{t.key_stripes}" if stripes else f"kb{t.key_blocks}{reads}"
        return f"rows{t.rows}-h{t.heads}-w{t.num_warps}-{keys}-s{t.num_stages or 'default'}"

    def time_tiles(tiles: SampledTiles) -> float:  # inf where the tile does not fit the card
        try:
            return timeit(lambda: sampled.select_blocks(q, k, perm, cfg, tiles=tiles), warmup, iters)
        except triton.runtime.errors.OutOfResources as exc:
            print(f"  {tiles}: {exc}", file=sys.stderr)
            return math.inf

    if stripes:
        grid = [SampledTiles(rows=rows, num_warps=warps, key_stripes=keys)
                for rows, warps, keys in itertools.product((64, 128), (4, 8), (32, 64, 128))]
    else:
        grid = [dataclasses.replace(SAMPLED_TILES, **fields) for fields in SWEEP_TILES]
    res = {}
    for tiles in grid:
        res[name(tiles)] = time_tiles(tiles)
        print(f"  {name(tiles)}: {res[name(tiles)]:.2f} ms", file=sys.stderr, flush=True)
    for warps in (2, 4, 8, 16):  # the plan's top-p kernel
        res[f"top-p-w{warps}-r1"] = time_tiles(dataclasses.replace(SAMPLED_TILES, top_p_warps=warps, top_p_rows=1))
        print(f"  top-p-w{warps}-r1: {res[f'top-p-w{warps}-r1']:.2f} ms", file=sys.stderr, flush=True)
    best = min(res, key=res.get)
    now = name(SAMPLED_TILES)
    print(f"  sweep: best {best} {res[best]:.2f} ms; current {now} {res.get(now, float('nan')):.2f} ms", file=sys.stderr)
    return res


def kernel_times(q, k, perm, cfg) -> dict:
    """CUDA milliseconds per kernel name of one GPU selection (after two warm-up calls), by ``torch.profiler``."""
    from pbs_kernels.select import select_blocks

    for _ in range(2):
        select_blocks(q, k, perm, cfg)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        select_blocks(q, k, perm, cfg)
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / 1e3 for e in prof.key_averages() if e.device_time_total > 0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="smollm2,llama", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--seq-lens", default="8k,32k,128k")
    ap.add_argument("--reference-lens", default="8k", help="lengths that also time the reference selection")
    ap.add_argument("--check-len", default="8k", help="length of the GPU-vs-reference plan check (0: skip)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--sweep", action="store_true",
                    help="also time the GPU selection with alternative tiles (pbs_kernels.triton.tiles.SampledTiles)")
    ap.add_argument("--set", default="", help="change the default preset, e.g. score=antidiagonal,sample_rows=4")
    ap.add_argument("--kernels", action="store_true", help="also the CUDA time of each kernel of one selection")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    from pbs_kernels import reference
    from pbs_kernels.backend import use_triton
    from pbs_kernels.permute import compute_permutation
    from pbs_kernels.select import select_blocks

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    cfg = config_changes.apply(default_config(), args.set)
    ref_lens = {parse_size(x) for x in args.reference_lens.split(",") if x.strip()}
    check_len = parse_size(args.check_len) if args.check_len.strip() not in ("", "0") else 0
    probe = torch.empty(1, device=device)
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, GPU path: {use_triton(probe)}, "
          f"{args.dtype}, preset default: {cfg}", file=sys.stderr)
    rows = []
    for shape in args.shapes.split(","):
        h_q, h_kv, d = SHAPES[shape.strip()]
        for n in (parse_size(x) for x in args.seq_lens.split(",")):
            q, k = structured_qkv(h_q, h_kv, n, d, dtype, device)
            perm = compute_permutation(q, k, cfg)
            row = {"shape": shape, "n": n, "heads": f"{h_q}/{h_kv}", "head_dim": d, "dtype": args.dtype}
            row["permute_ms"] = timeit(lambda: compute_permutation(q, k, cfg), args.warmup, args.iters)
            row["select_ms"] = timeit(lambda: select_blocks(q, k, perm, cfg), args.warmup, args.iters)
            row["plan_ms"] = row["permute_ms"] + row["select_ms"]
            if args.sweep:
                row["sweep"] = sweep(q, k, perm, cfg, args.warmup, args.iters)
            if args.kernels and device == "cuda":
                row["kernels_ms"] = kernel_times(q, k, perm, cfg)
                for name, ms in sorted(row["kernels_ms"].items(), key=lambda x: -x[1])[:8]:
                    print(f"  {shape} {n}: {ms:9.2f} ms  {name[:90]}", file=sys.stderr)
            num, _ = select_blocks(q, k, perm, cfg)
            n_b = -(-n // cfg.block_size)
            row["density"] = num.sum().item() / (num.numel() // n_b * n_b * (n_b + 1) / 2)
            if device == "cuda":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                select_blocks(q, k, compute_permutation(q, k, cfg), cfg)
                torch.cuda.synchronize()
                row["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            if n in ref_lens:
                row["reference_select_ms"] = timeit(
                    lambda: reference.select_blocks(q, reference.permute_keys(k, perm), perm, cfg, k=k), 0, 1)
            row["dense_ms"], row["dense_backend"] = dense_time(q, k, args.warmup, args.iters)
            row["plan_over_dense"] = row["plan_ms"] / row["dense_ms"]
            if n == check_len:
                qf, kf = structured_qkv(h_q, h_kv, n, d, torch.float32, device, seed=1)
                row.update(check_plan(qf, kf, cfg))
            rows.append(row)
            del q, k, perm
            if device == "cuda":
                torch.cuda.empty_cache()

    cols = [("shape", "{}"), ("n", "{}"), ("permute_ms", "{:.2f}"), ("select_ms", "{:.2f}"), ("plan_ms", "{:.2f}"),
            ("reference_select_ms", "{:.1f}"), ("dense_ms", "{:.2f}"), ("plan_over_dense", "{:.2f}"),
            ("density", "{:.3f}"), ("peak_extra_mib", "{:.0f}"), ("plan_rows_identical", "{:.6f}")]
    table = [[name for name, _ in cols]] + [[fmt.format(r[c]) if c in r else "-" for c, fmt in cols] for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(cols))]
    for line in table:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))
    for r in rows:
        if "kept_blocks" in r:
            print(f"check {r['shape']} {r['n']}: perm equal {r['perm_equal_fraction']:.6f}, plan rows identical "
                  f"{r['plan_rows_identical']:.6f}, kept {r['kept_blocks']} vs reference {r['kept_blocks_reference']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                       "torch": torch.__version__, "config": cfg.to_dict(), "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
