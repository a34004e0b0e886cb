"""Attention-kernel benchmark on one CUDA GPU: PBS Triton kernel vs dense SDPA and FlexAttention.

One process: builds random permuted block masks (the diagonal segment and the sink block always on,
other causal blocks on with probability p, a random permutation inside every segment), checks the
kernel against the PyTorch reference in bf16, then times every method with
``triton.testing.do_bench`` (median, after warm-up) and prints a table last.

    python benchmarks/kernel_bench.py --out $OUT              # everything (Llama + SmolLM2, 32K, 128K)
    python benchmarks/kernel_bench.py --lens 32k --sweep      # also sweep tile configs at 32K
    python benchmarks/kernel_bench.py --block 64              # 64-token plans (the default preset's)
    python benchmarks/kernel_bench.py --graph --kernel-only   # CUDA-graph replays: GPU time, no host launch work

Methods: cuDNN and FLASH SDPA (dense causal; K/V repeated to H_q heads outside the timing),
compiled ``flex_attention`` with an equivalent ``BlockMask`` (K/V permuted up front, outside the
timing, and a mask_mod with the causal rule on original positions), and our kernels in their ways of
reading permuted keys: remap (through perm inside the kernel), gather (a permuted copy of K/V, timed
with the kernel), tma (the copy, read with tensor descriptors), persistent (the persistent Gluon kernel
reading the same copy), the benchmark-only variants of ``VARIANTS`` (e.g. persistent_1tile: one tile per
program; persistent_tm: q, k, v in transformers' (B, N, H, D)
layout, read in place), auto (the launcher's default rule). Modes
without a --configs entry use the launcher's default tile config. ``--kernel-only`` adds, for every
copying mode, its time with the copies made beforehand (MODE/k) and the copy's own time (MODE/copy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from pbs_cli.engine.sizes import parse_size

SHAPES = {  # name: (H_q, H_kv, head_dim)
    "llama": (32, 8, 128),
    "smollm2": (9, 3, 64),
    "gemma3": (16, 8, 256),  # Gemma-3-12B: head_dim 256 runs the remap and gather modes only
}
BLOCK, SEGMENT = 128, 256
# Benchmark-only variants of a read mode: name -> (perm_mode, config)
VARIANTS = {
    # the persistent Gluon kernel with two K slots instead of three (head_dim 128)
    "persistent_k2": ("persistent", {"k_stages": 2, "v_stages": 2}),
    # ... with two K slots and three V slots (a V slot frees a step later than a K slot)
    "persistent_v3": ("persistent", {"k_stages": 2, "v_stages": 3}),
    # ... taking tiles from an atomic counter instead of a fixed stride
    "persistent_dyn": ("persistent", {"dynamic": True}),
    # ... tiles ordered by query block first (every batch-head of one query block together)
    "persistent_qorder": ("persistent", {"head_major": False}),
    # ... one tile per program (not persistent: the hardware hands out programs in launch order)
    "persistent_1tile": ("persistent", {"programs": 1 << 30}),
    # ... reading q, k, v as transformers hands them over, (B, H, N, D) views of (B, N, H, D) tensors, in place
    "persistent_tm": ("persistent", None),
}
TOKEN_MAJOR_VARIANTS = {"persistent_tm"}  # fed token-major views of the same q, k, v


def token_major(*xs):
    """(B, H, N, D) views of (B, N, H, D)-contiguous copies of xs, as transformers' projections leave them."""
    return tuple(x.transpose(1, 2).contiguous().transpose(1, 2) for x in xs)


def attend(q, k, v, plan, mode, cfg, permuted=None):
    """``pbs_attention`` in read mode (or variant) ``mode`` with tile config ``cfg`` (and the K/V copies
    ``permuted`` when given: then the copy is not part of the call)."""
    from pbs_kernels.triton import attention as A

    mode, base = VARIANTS.get(mode, (mode, None))
    return A.pbs_attention(q, k, v, plan, perm_mode=mode, config={**(base or {}), **(cfg or {})} or None,
                           permuted=permuted)


def copies(k, v, plan, mode):
    """The K/V copies read mode (or variant) ``mode`` makes (None for remap)."""
    from pbs_kernels.triton import attention as A

    return A.copies_for(VARIANTS.get(mode, (mode, None))[0], k, v, plan.perm)


def set_block(block: int) -> None:
    """Plan block size of this run's random plans (``--block``)."""
    global BLOCK
    BLOCK = block


# -- masks ------------------------------------------------------------------------------------


def random_plan(b: int, h_q: int, h_kv: int, n: int, density: float, device, seed: int = 0):
    """PermutedBlockMask with random perm (inside full segments) and random kept blocks.

    Forced: every causal block of the diagonal segment and the sink block (holding original token 0).
    Other causal blocks kept with probability p, chosen so the expected density is ``density``."""
    from pbs_kernels import PermutedBlockMask

    g = torch.Generator(device=device).manual_seed(seed)
    n_qb = -(-n // BLOCK)
    per_seg = SEGMENT // BLOCK
    full = (n // SEGMENT) * SEGMENT
    perm = torch.arange(n, device=device, dtype=torch.int64).repeat(b, h_kv, 1)
    if full:
        r = torch.rand(b, h_kv, full // SEGMENT, SEGMENT, generator=g, device=device)
        base = torch.arange(0, full, SEGMENT, device=device)[:, None]
        perm[..., :full] = (r.argsort(-1) + base).reshape(b, h_kv, full)
    rows = torch.arange(n_qb, device=device)[:, None]
    cols = torch.arange(n_qb, device=device)[None, :]
    diag_start = rows // per_seg * per_seg
    candidate = cols < diag_start
    forced = (cols >= diag_start) & (cols <= rows)
    sink = (perm == 0).int().argmax(-1) // BLOCK  # (B, H_kv)
    sink = sink.repeat_interleave(h_q // h_kv, 1)[:, :, None, None]
    forced = forced | (candidate & (cols == sink))
    n_forced = forced.sum().item() / (b * h_q) if forced.dim() == 4 else forced.sum().item()
    n_cand = candidate.sum().item()
    causal = n_qb * (n_qb + 1) // 2
    p = 1.0 if density >= 1.0 else max(0.0, min(1.0, (density * causal - n_forced) / max(1, n_cand)))
    keep = forced | (candidate & (torch.rand(b, h_q, n_qb, n_qb, generator=g, device=device) < p))
    num = keep.sum(-1, dtype=torch.int32)
    idx = torch.where(keep, cols, cols + n_qb).sort(-1).indices.to(torch.int32)
    return PermutedBlockMask(perm.to(torch.int32), num, idx, BLOCK, SEGMENT, n)


def flex_block_mask(plan, h_q: int, h_kv: int):
    """Equivalent FlexAttention BlockMask over K/V permuted everywhere (diagonal segment included).

    Full blocks: kept blocks of earlier segments (no mask). Partial blocks: every block of the
    diagonal segment, with mask_mod ``perm[kv] <= q`` (causal on original positions)."""
    from torch.nn.attention.flex_attention import BlockMask

    b, _, n_qb, n_kb = plan.kv_indices.shape
    per_seg = plan.segment_size // plan.block_size
    dev = plan.kv_indices.device
    rows = torch.arange(n_qb, device=dev)[:, None]
    cols = torch.arange(n_kb, device=dev)[None, :]
    diag_start = rows // per_seg * per_seg
    dense = plan.to_dense()
    full = dense & (cols < diag_start)
    partial = ((cols >= diag_start) & (cols < diag_start + per_seg)).expand_as(dense)

    def pack(m):
        return m.sum(-1, dtype=torch.int32), torch.where(m, cols, cols + n_kb).sort(-1).indices.to(torch.int32)

    f_num, f_idx = pack(full)
    p_num, p_idx = pack(partial)
    perm = plan.perm.long()
    g = h_q // perm.shape[1]

    def mask_mod(bi, h, q_idx, kv_idx):
        return perm[bi, h // g, kv_idx] <= q_idx

    return BlockMask.from_kv_blocks(p_num, p_idx, f_num, f_idx, BLOCK_SIZE=plan.block_size, mask_mod=mask_mod,
                                    seq_lengths=(plan.seq_len, plan.seq_len))


# -- timing -----------------------------------------------------------------------------------


GRAPH = False  # --graph: time CUDA-graph replays of each call


def graphed(fn):
    """fn captured in a CUDA graph after two warm-up calls on a side stream (compiling, autotuning,
    allocating): its replay runs the same GPU work without the host's launch work."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def bench(fn) -> float:
    """Median ms of fn() with do_bench (L2 flushed before every call); warm-up and repeat windows
    scale with one call's time. With ``GRAPH``, fn's CUDA-graph replay is timed instead: GPU time
    alone, as in ``pbs prefill`` and ``pbs profile``, which replay graphs too."""
    import triton.testing

    if GRAPH:
        try:
            fn = graphed(fn)
        except Exception as e:  # noqa: BLE001 - say so, time it eagerly
            print(f"graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); timed eagerly",
                  flush=True)
            torch.cuda.synchronize()
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=max(25, 2 * est), rep=max(100, 8 * est), return_mode="median")


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


# -- the run ----------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama,smollm2")
    ap.add_argument("--lens", default="32k,128k")
    ap.add_argument("--densities", default="0.05,0.1,0.2,0.4,1.0")
    ap.add_argument("--modes", default="remap,gather,tma")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-flash", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="sweep tile configs at the first length")
    ap.add_argument("--sweep-densities", default="0.2", help="densities of the sweep (comma list)")
    ap.add_argument("--sweep-modes", default="", help="modes to sweep (default: --modes)")
    ap.add_argument("--configs", default="", help="JSON {shape: {mode: config}} fixed configs to use")
    ap.add_argument("--kernel-only", action="store_true",
                    help="also time every copying mode with its K/V copies made beforehand (column MODE/k)")
    ap.add_argument("--block", type=int, default=BLOCK, help="plan block size (128: the gpu preset; 64: default)")
    ap.add_argument("--graph", action="store_true",
                    help="time CUDA-graph replays (GPU time without the host's launch work)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    set_block(args.block)
    global GRAPH
    GRAPH = args.graph

    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    from pbs_kernels import reference as R
    from pbs_kernels.triton import attention as A

    dev = torch.device("cuda")
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv, "graph": args.graph}
    print(json.dumps(env), flush=True)
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "kernel_bench.jsonl"), "a")

    def record(**kw):
        kw.update(gpu=env["gpu"])
        log.write(json.dumps(kw) + "\n")
        log.flush()
        print(json.dumps(kw), flush=True)

    modes = [m for m in args.modes.split(",") if m]
    fixed = json.loads(args.configs) if args.configs else {}
    flex = torch.compile(flex_attention, dynamic=False)

    # -- correctness: bf16 kernel vs fp32 reference, small sizes, odd N --
    for shape in args.shapes.split(","):
        h_q, h_kv, d = SHAPES[shape]
        for n in (4096, 3000):
            torch.manual_seed(1)
            q, k, v = (torch.randn(1, h, n, d, device=dev, dtype=torch.bfloat16) for h in (h_q, h_kv, h_kv))
            plan = random_plan(1, h_q, h_kv, n, 0.3, dev, seed=1)
            ref = R.block_sparse_attention(q.float(), k.float(), v.float(), plan)
            low = R.block_sparse_attention(q, k, v, plan)  # the same math with bf16 rounding of the output
            tm = token_major(q, k, v) if TOKEN_MAJOR_VARIANTS & set(modes) else None
            for mode in modes:
                qq, kk, vv = tm if mode in TOKEN_MAJOR_VARIANTS else (q, k, v)
                out = attend(qq, kk, vv, plan, mode, fixed.get(shape, {}).get(mode))
                record(check=shape, n=n, mode=mode, density=round(plan.density(), 4),
                       max_abs_err=(out.float() - ref).abs().max().item(), rel_err=rel_err(out, ref),
                       rel_err_bf16_reference=rel_err(low, ref), nan=bool(out.isnan().any()))
            if n % BLOCK == 0 and not args.no_flex:
                bm = flex_block_mask(plan, h_q, h_kv)
                kp, vp = A.permuted_copy(k, plan.perm), A.permuted_copy(v, plan.perm)
                fo = flex(q, kp, vp, block_mask=bm, enable_gqa=True)
                record(check=shape, n=n, mode="flex", rel_err=rel_err(fo, ref))

    # -- config sweep --
    if args.sweep:
        n = parse_size(args.lens.split(",")[0])
        for shape in args.shapes.split(","):
            h_q, h_kv, d = SHAPES[shape]
            q, k, v = (torch.randn(1, h, n, d, device=dev, dtype=torch.bfloat16) for h in (h_q, h_kv, h_kv))
            for p in map(float, args.sweep_densities.split(",")):
                plan = random_plan(1, h_q, h_kv, n, p, dev)
                best = {}
                for mode in (args.sweep_modes.split(",") if args.sweep_modes else modes):
                    for c in A._sweep_configs(BLOCK, d):
                        cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                        try:
                            ms = bench(lambda: attend(q, k, v, plan, mode, cfg))
                        except Exception as e:  # out of resources for this tile shape
                            record(sweep=shape, n=n, density=p, mode=mode, config=cfg,
                                   error=str(e).splitlines()[0][:200])
                            continue
                        record(sweep=shape, n=n, density=p, mode=mode, config=cfg, ms=ms)
                        if mode not in best or ms < best[mode][0]:
                            best[mode] = (ms, cfg)
                for mode, (ms, cfg) in best.items():
                    record(sweep_best=shape, n=n, density=p, mode=mode, config=cfg, ms=ms)
                    fixed.setdefault(shape, {}).setdefault(mode, cfg)  # the first density's winner is used below
                del plan
            del q, k, v
        record(best_configs=fixed)

    # -- timings --
    rows = []
    for shape in args.shapes.split(","):
        h_q, h_kv, d = SHAPES[shape]
        for n in map(parse_size, args.lens.split(",")):
            torch.manual_seed(0)
            q, k, v = (torch.randn(1, h, n, d, device=dev, dtype=torch.bfloat16) for h in (h_q, h_kv, h_kv))
            g = h_q // h_kv
            k_rep, v_rep = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
            tm = token_major(q, k, v) if TOKEN_MAJOR_VARIANTS & set(modes) else None
            flops = 2.0 * n * n * d * h_q  # causal work, as in REFERENCE.md
            dense = {}
            backends = [("cudnn", SDPBackend.CUDNN_ATTENTION)] + ([] if args.no_flash else [("flash", SDPBackend.FLASH_ATTENTION)])
            for name, be in backends:
                def f(be=be):
                    with sdpa_kernel(be):
                        return F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True)
                dense[name] = bench(f)
                record(shape=shape, n=n, method=name, density=1.0, ms=dense[name], tflops=flops / dense[name] / 1e9)
            del k_rep, v_rep
            for target in map(float, args.densities.split(",")):
                plan = random_plan(1, h_q, h_kv, n, target, dev, seed=2)
                dens = plan.density()
                row = {"shape": shape, "n": n, "density": dens, "cudnn": dense["cudnn"]}
                if not args.no_flex:
                    bm = flex_block_mask(plan, h_q, h_kv)
                    kp, vp = A.permuted_copy(k, plan.perm), A.permuted_copy(v, plan.perm)
                    row["flex"] = bench(lambda: flex(q, kp, vp, block_mask=bm, enable_gqa=True))
                    del kp, vp, bm
                for mode in modes:
                    cfg = fixed.get(shape, {}).get(mode)
                    qq, kk, vv = tm if mode in TOKEN_MAJOR_VARIANTS else (q, k, v)
                    row[mode] = bench(lambda: attend(qq, kk, vv, plan, mode, cfg))
                    pre = copies(kk, vv, plan, mode) if args.kernel_only else None
                    if pre is not None:
                        row[mode + "/k"] = bench(lambda: attend(qq, kk, vv, plan, mode, cfg, permuted=pre))
                        row[mode + "/copy"] = bench(lambda: copies(kk, vv, plan, mode))
                    del pre
                if any(m in modes for m in ("gather", "tma")):
                    row["copy"] = bench(lambda: (A.permuted_copy(k, plan.perm), A.permuted_copy(v, plan.perm)))
                record(**row, tflops={m: dens * flops / row[m] / 1e9 for m in modes + (["flex"] if "flex" in row else [])})
                rows.append(row)
                del plan
            del q, k, v, tm
            torch.cuda.empty_cache()

    # -- table last --
    print("\n" + ("CUDA-graph replays, " if GRAPH else "") + "ms (median); x = cuDNN dense / time; ideal = density x cuDNN; ratio = time / ideal; TF/s on kept blocks")
    hdr = f"{'shape':8} {'N':>6} {'dens':>6} {'cuDNN':>8} {'flex':>8} " + " ".join(f"{m:>8}" for m in modes) + \
        f" {'best':>6} {'TF/s':>5} {'x':>5} {'ratio':>5} {'vsflex':>6}"
    print(hdr)
    extra = sorted({key for r in rows for key in r if "/" in key})
    for r in rows:
        best = min(modes, key=lambda m: r[m])
        t = r[best]
        h_q, h_kv, d = SHAPES[r["shape"]]
        tf = r["density"] * 2.0 * r["n"] ** 2 * d * h_q / t / 1e9
        flex_ms = r.get("flex", float("nan"))
        print(f"{r['shape']:8} {r['n'] // 1024:>5}K {r['density']:>6.1%} {r['cudnn']:>8.3f} {flex_ms:>8.3f} "
              + " ".join(f"{r[m]:>8.3f}" for m in modes)
              + f" {best:>6} {tf:>5.0f} {r['cudnn'] / t:>5.2f} {t / (r['density'] * r['cudnn']):>5.2f} {flex_ms / t:>6.2f}")
    if extra:  # kernels without their copies: ms and ratio to density x cuDNN
        print("\nwithout the copy (--kernel-only): ms / ratio; MODE/copy: the copy alone, ms")
        for r in rows:
            cells = [f"{key}={r[key]:.3f}" + ("" if key.endswith("/copy") else f"/{r[key] / (r['density'] * r['cudnn']):.2f}")
                     for key in extra if key in r]
            print(f"{r['shape']:8} {r['n'] // 1024:>5}K {r['density']:>6.1%} " + " ".join(cells))
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
