"""Permutation + block selection on the GPU vs cuDNN dense attention, and selection memory.

Llama-3.1-8B attention shape by default (32 query heads, 8 KV heads, head_dim 128, bf16, block 128,
segment 256, tau 0.9), structured inputs (shared heavy-hitter key directions, a sink token, a local
bias), not Gaussian noise. For each length: the Triton path (``pbs_kernels.triton``), the
plain-PyTorch reference on the same GPU, and dense causal cuDNN SDPA; at one long length the peak
extra memory of permutation and selection (``torch.cuda.max_memory_allocated`` delta).

    python benchmarks/select_bench.py                       # 32k,128k timings, 512k memory
    python benchmarks/select_bench.py --seq-lens 8k --mem-seq-len 0 --json out.json

Timings: CUDA events, median of ``--iters`` runs after warm-up, with min and max.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys

import torch

from pbs_cli.engine.sizes import parse_size


def structured_qkv(b, h_q, h_kv, n, d, dtype, seed=0):
    """q (B, H_q, N, D), k (B, H_kv, N, D) on the GPU: queries share three directions, 6% of keys
    are heavy hitters along one of them, token 0 is a sink, and a slow drift gives locality."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dirs = torch.randn(3, d, device="cuda", generator=gen)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True) * math.sqrt(d)
    drift = torch.randn(d, device="cuda", generator=gen) / math.sqrt(d)
    pos = torch.linspace(0, 6.28, n, device="cuda")[:, None]
    q = torch.empty(b, h_q, n, d, device="cuda", dtype=dtype)
    for h in range(h_q):  # per head, to bound the fp32 temporaries at long N
        x = 0.6 * torch.randn(b, n, d, device="cuda", generator=gen)
        x += torch.rand(b, n, 3, device="cuda", generator=gen) @ dirs
        x += torch.sin(pos * (1 + h % 4)) * drift * 4
        q[:, h] = x.to(dtype)
    k = torch.empty(b, h_kv, n, d, device="cuda", dtype=dtype)
    for h in range(h_kv):
        x = 0.6 * torch.randn(b, n, d, device="cuda", generator=gen)
        heavy = torch.rand(b, n, 1, device="cuda", generator=gen) < 0.06
        which = torch.randint(0, 3, (b, n), device="cuda", generator=gen)
        x += heavy * dirs[which]
        x += torch.sin(pos * (1 + h % 4)) * drift * 4
        x[:, 0] += dirs[0]
        k[:, h] = x.to(dtype)
    return q, k


def cuda_time(fn, warmup: int, iters: int) -> dict:
    """Median / min / max milliseconds of ``fn`` over ``iters`` CUDA-event-timed calls after ``warmup``."""
    from pbs_cli.engine.timing import bench

    t = bench(fn, "cuda", warmup=warmup, min_repeats=iters, max_repeats=iters, memory=False)
    return {"median_ms": t.median_ms, "min_ms": t.min_ms, "max_ms": t.max_ms, "iters": t.repeats}


def dense_cudnn(q, k, warmup, iters):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = q.shape[1] // k.shape[1]
    ke = k.repeat_interleave(g, 1)
    ve = torch.randn_like(ke)
    f = torch.nn.functional.scaled_dot_product_attention
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                f(q, ke, ve, is_causal=True)
                res = cuda_time(lambda: f(q, ke, ve, is_causal=True), warmup, iters)
            res["backend"] = backend.name
            return res
        except RuntimeError as exc:  # noqa: PERF203
            print(f"  {backend.name} unavailable: {str(exc).splitlines()[0]}", file=sys.stderr)
    return None


def check_against_reference(q, k, config):
    """Triton plan vs the reference plan on the same inputs: permutation and selection agreement."""
    from pbs_kernels import reference
    from pbs_kernels.triton import permute as tperm
    from pbs_kernels.triton import select as tsel

    imp_t = tperm.key_importance(q, k, config.block_size)
    imp_r = reference.key_importance(q, k, config.block_size)
    perm_t = tperm.compute_permutation(q, k, config)
    perm_r = reference.segment_permutation(imp_r, config.segment_size)
    gap = (imp_r.gather(-1, perm_t.long()) - imp_r.gather(-1, perm_r.long())).abs().max()
    num_t, idx_t = tsel.select_blocks(q, k, perm_r, config)
    num_r, idx_r = reference.select_blocks(q, reference.permute_keys(k, perm_r), perm_r, config)
    same_row = (num_t == num_r) & (idx_t == idx_r).all(-1)
    return {
        "importance_max_rel_err": ((imp_t - imp_r).abs().max() / imp_r.abs().max()).item(),
        "perm_equal_fraction": (perm_t == perm_r).float().mean().item(),
        "perm_max_importance_gap_rel": (gap / imp_r.abs().max()).item(),
        "selection_rows_identical": same_row.float().mean().item(),
        "kept_blocks_triton": int(num_t.sum().item()),
        "kept_blocks_reference": int(num_r.sum().item()),
    }


def sweep(args, cfg, dtype) -> list:
    """Time each phase under alternative tiles (``pbs_kernels.triton.tiles``, passed as ``tiles=``) at each length."""
    import dataclasses

    from pbs_kernels.triton import permute as tperm
    from pbs_kernels.triton import select as tsel
    from pbs_kernels.triton.tiles import PERMUTE_TILES, PermuteTiles, SelectTiles

    out = []
    for n in [parse_size(x) for x in args.seq_lens.split(",") if x]:
        q, k = structured_qkv(args.batch, args.heads, args.kv_heads, n, args.head_dim, dtype)
        perm = tperm.compute_permutation(q, k, cfg)
        row = {"seq_len": n,
               "pool_q": cuda_time(lambda: tsel.pool_blocks(q, cfg.block_size), 2, 5),
               "pool_k": cuda_time(lambda: tsel.pool_blocks(k, cfg.block_size, perm), 2, 5),
               "importance": [], "select": []}
        perm_tiles = [PermuteTiles(block_m=bm, block_n=bn, num_warps=w)
                      for bm, bn, w in ((64, 64, 4), (64, 128, 4), (128, 64, 8), (128, 128, 8), (64, 128, 8))]
        perm_tiles += [dataclasses.replace(PERMUTE_TILES, span=span) for span in (512, 1024, 2048, 4096, 8192)]
        for tiles in perm_tiles:
            t = cuda_time(lambda: tperm.key_importance(q, k, cfg.block_size, tiles=tiles), 2, 5)
            row["importance"].append({**dataclasses.asdict(tiles), **t})
        for tile, warps, sb in ((4096, None, 32), (2048, None, 32), (8192, None, 32), (4096, 8, 32),
                                (4096, None, 64)):
            tiles = SelectTiles(tile_elements=tile, top_p_warps=warps, score_block=sb)
            t = cuda_time(lambda: tsel.select_blocks(q, k, perm, cfg, tiles=tiles), 2, 5)
            row["select"].append({**dataclasses.asdict(tiles), **t})
        print(json.dumps(row), file=sys.stderr)
        out.append(row)
        del q, k, perm
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", default="32k,128k")
    ap.add_argument("--mem-seq-len", default="512k", help="length for the memory measurement (0: skip)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--segment-size", type=int, default=256)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-reference", action="store_true", help="skip the PyTorch reference timings")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--check-len", default="32k", help="length of the Triton-vs-reference check (0: skip)")
    ap.add_argument("--sweep", action="store_true", help="time alternative GPU tiles of each phase and stop")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    import triton

    from pbs_kernels import attention as api
    from pbs_kernels import reference
    from pbs_kernels.config import PBSConfig
    from pbs_kernels.triton import permute as tperm
    from pbs_kernels.triton import select as tsel

    if not torch.cuda.is_available():
        print("select_bench needs a CUDA GPU", file=sys.stderr)
        return 3
    dtype = torch.bfloat16
    cfg = PBSConfig(block_size=args.block_size, segment_size=args.segment_size, threshold=args.threshold)
    env = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "command": " ".join(sys.argv),
    }
    shape = {"batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
             "dtype": "bfloat16", **cfg.to_dict()}
    results = {"env": env, "shape": shape, "lengths": [], "memory": None, "check": None}
    print(json.dumps(env), file=sys.stderr)

    if args.sweep:
        results["sweep"] = sweep(args, cfg, dtype)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results, fh, indent=2)
        return 0

    check_len = parse_size(args.check_len)
    if check_len:
        q, k = structured_qkv(args.batch, args.heads, args.kv_heads, check_len, args.head_dim, dtype)
        results["check"] = {"seq_len": check_len, **check_against_reference(q, k, cfg)}
        print("check", json.dumps(results["check"]), file=sys.stderr)
        del q, k

    for n in [parse_size(x) for x in args.seq_lens.split(",") if x]:
        q, k = structured_qkv(args.batch, args.heads, args.kv_heads, n, args.head_dim, dtype)
        row = {"seq_len": n}
        perm = tperm.compute_permutation(q, k, cfg)
        # no host syncs: any synchronizing call inside raises in this mode
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            tsel.select_blocks(q, k, tperm.compute_permutation(q, k, cfg), cfg)
            row["host_syncs"] = "none"
        except RuntimeError as exc:
            row["host_syncs"] = str(exc).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        row["permute"] = cuda_time(lambda: tperm.compute_permutation(q, k, cfg), args.warmup, args.iters)
        row["importance"] = cuda_time(lambda: tperm.key_importance(q, k, cfg.block_size), args.warmup, args.iters)
        row["select"] = cuda_time(lambda: tsel.select_blocks(q, k, perm, cfg), args.warmup, args.iters)
        row["plan"] = cuda_time(lambda: tsel.select_blocks(q, k, tperm.compute_permutation(q, k, cfg), cfg),
                                args.warmup, args.iters)
        num, idx = tsel.select_blocks(q, k, perm, cfg)
        n_b = idx.shape[-1]
        row["density"] = num.double().sum().item() / (args.batch * args.heads * n_b * (n_b + 1) / 2)
        del num, idx
        if not args.no_reference:
            def ref_plan():
                imp = reference.key_importance(q, k, cfg.block_size)
                p = reference.segment_permutation(imp, cfg.segment_size)
                return reference.select_blocks(q, reference.permute_keys(k, p), p, cfg)
            try:
                row["reference_plan"] = cuda_time(ref_plan, 1, max(2, args.iters // 3))
            except torch.cuda.OutOfMemoryError:
                row["reference_plan"] = "out of memory"
            torch.cuda.empty_cache()
        if not args.no_dense:
            row["dense"] = dense_cudnn(q, k, 1 if n > 65536 else 2, max(3, args.iters // 2))
            if row["dense"]:
                row["plan_share_of_dense"] = row["plan"]["median_ms"] / row["dense"]["median_ms"]
        results["lengths"].append(row)
        print(json.dumps(row), file=sys.stderr)
        del q, k, perm
        torch.cuda.empty_cache()

    mem_len = parse_size(args.mem_seq_len)
    if mem_len:
        q, k = structured_qkv(args.batch, args.heads, args.kv_heads, mem_len, args.head_dim, dtype)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        perm = tperm.compute_permutation(q, k, cfg)
        torch.cuda.synchronize()
        perm_peak = torch.cuda.max_memory_allocated() - base
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        num, idx = tsel.select_blocks(q, k, perm, cfg)
        torch.cuda.synchronize()
        sel_peak = torch.cuda.max_memory_allocated() - base
        out_bytes = num.nbytes + idx.nbytes
        mem = {
            "seq_len": mem_len, "permute_peak_extra_bytes": perm_peak, "select_peak_extra_bytes": sel_peak,
            "select_output_bytes": out_bytes, "select_workspace_bytes": sel_peak - out_bytes,
            "permute": cuda_time(lambda: tperm.compute_permutation(q, k, cfg), 1, 3),
            "select": cuda_time(lambda: tsel.select_blocks(q, k, perm, cfg), 1, 3),
        }
        n_b = idx.shape[-1]
        mem["density"] = num.double().sum().item() / (args.batch * args.heads * n_b * (n_b + 1) / 2)
        whole_num = num
        del num, idx
        # the same selection in row chunks, as pbs_prefill_attention runs it at this length
        rows = api.plan_chunk_rows(q, cfg)
        if rows is not None:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            nums = []
            for _, part_num, part_idx in tsel.select_row_chunks(q, k, perm, cfg, None, rows):
                nums.append(part_num)
                del part_idx
            torch.cuda.synchronize()
            mem["chunk_rows"] = rows
            mem["chunked_select_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
            mem["chunked_counts_equal"] = bool(torch.equal(torch.cat(nums, -1), whole_num))

            def chunked():
                for _ in tsel.select_row_chunks(q, k, perm, cfg, None, rows):
                    pass
            mem["chunked_select"] = cuda_time(chunked, 1, 3)
            del nums
        # plan + attend in one call at this length: row chunks (the default) vs one whole plan
        v = torch.randn_like(k)
        for name, budget in (("prefill_chunked", api.PLAN_CHUNK_BYTES), ("prefill_whole", 1 << 62)):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out, _ = api.pbs_prefill_attention(q, k, v, cfg, plan_bytes=budget)
            torch.cuda.synchronize()
            mem[name + "_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
            mem[name] = cuda_time(lambda: api.pbs_prefill_attention(q, k, v, cfg, plan_bytes=budget), 1, 2)
            if name == "prefill_chunked":
                first = out
            else:
                mem["prefill_outputs_equal"] = bool(torch.equal(first, out))
            del out
        del first, v
        results["memory"] = mem
        print(json.dumps(mem), file=sys.stderr)

    # human summary on stdout
    gib = 1 << 30
    print(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['date'][:10]}")
    print(f"shape B={args.batch} Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} bf16, "
          f"block {cfg.block_size}, segment {cfg.segment_size}, tau {cfg.threshold}")
    for r in results["lengths"]:
        dense = r.get("dense") or {}
        ref = r.get("reference_plan")
        ref_s = f"{ref['median_ms']:.2f} ms" if isinstance(ref, dict) else str(ref)
        print(f"N={r['seq_len']}: permute {r['permute']['median_ms']:.3f} ms (importance {r['importance']['median_ms']:.3f}), "
              f"select {r['select']['median_ms']:.3f} ms, plan {r['plan']['median_ms']:.3f} ms; "
              f"reference plan {ref_s}; dense {dense.get('backend', '-')} {dense.get('median_ms', float('nan')):.2f} ms; "
              f"plan/dense {r.get('plan_share_of_dense', float('nan')):.2%}; density {r['density']:.1%}; "
              f"host syncs: {r['host_syncs']}")
    if results["memory"]:
        m = results["memory"]
        print(f"N={m['seq_len']}: permute peak extra {m['permute_peak_extra_bytes'] / gib:.3f} GiB; select peak extra "
              f"{m['select_peak_extra_bytes'] / gib:.3f} GiB = plan output {m['select_output_bytes'] / gib:.3f} GiB + "
              f"workspace {m['select_workspace_bytes'] / gib:.3f} GiB; permute {m['permute']['median_ms']:.2f} ms, "
              f"select {m['select']['median_ms']:.2f} ms, density {m['density']:.1%}")
        if "chunk_rows" in m:
            print(f"  in chunks of {m['chunk_rows']} query blocks: select peak extra "
                  f"{m['chunked_select_peak_extra_bytes'] / gib:.3f} GiB, {m['chunked_select']['median_ms']:.2f} ms, "
                  f"counts equal: {m['chunked_counts_equal']}")
        print(f"  pbs_prefill_attention: chunked {m['prefill_chunked']['median_ms']:.1f} ms, peak extra "
              f"{m['prefill_chunked_peak_extra_bytes'] / gib:.3f} GiB; whole plan {m['prefill_whole']['median_ms']:.1f} ms, "
              f"peak extra {m['prefill_whole_peak_extra_bytes'] / gib:.3f} GiB; outputs equal: {m['prefill_outputs_equal']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
