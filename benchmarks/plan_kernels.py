"""GPU time of each kernel of one layer's planning (permutation + block selection), from a profiler trace.

Structured inputs as in ``select_bench.py`` (shared heavy-hitter directions, a sink, locality), laid out
as transformers passes them: (B, H, N, D) views of (B, N, H, D)-contiguous tensors. For each length,
``--iters`` plans (``compute_permutation`` + ``select_blocks``) after a warm-up, traced with
``torch.profiler``; prints µs per plan for each kernel, then the plan's total, and the same total timed
with CUDA events (no profiler). ``--with-copies`` adds the permuted K/V copies of the persistent kernel as
``pbs prefill`` makes them (in the selection's pooling pass; a kernels/ tree without ``BlockSelection``:
``permuted_copies`` after the selection).

    python benchmarks/plan_kernels.py --heads 9 --kv-heads 3 --head-dim 64 --seq-lens 32k,128k
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from select_bench import cuda_time, structured_qkv
from pbs_cli.engine.sizes import parse_size


def kernel_times(fn, iters: int) -> dict[str, float]:
    """µs per call of ``fn`` for each GPU kernel it launches (``pbs_cli.engine.traces.top_ops``: all launches
    of one kernel name together)."""
    from pbs_cli.engine import traces

    fn()
    torch.cuda.synchronize()
    prof = traces.record(lambda: [fn() for _ in range(iters)], "cuda")
    return {row["name"][:60]: row["ms"] * 1e3 / iters for row in traces.top_ops(prof, cuda=True, limit=40)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", default="32k,128k")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--with-copies", action="store_true",
                    help="include the permuted K/V copies the attention kernel reads (v random, like k)")
    ap.add_argument("--tag", default="", help="a label printed with every line (e.g. the tree measured)")
    args = ap.parse_args(argv)

    from pbs_kernels.config import PBSConfig
    from pbs_kernels.triton import permute as tperm
    from pbs_kernels.triton import select as tsel

    cfg = PBSConfig(block_size=128, segment_size=256, threshold=args.threshold)
    for n in map(parse_size, args.seq_lens.split(",")):
        q, k = structured_qkv(1, args.heads, args.kv_heads, n, args.head_dim, torch.bfloat16)
        q, k = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k))  # transformers' layout

        v = torch.randn_like(k) if args.with_copies else None

        def plan(q=q, k=k, v=v):
            perm = tperm.compute_permutation(q, k, cfg)
            if v is None:
                return tsel.select_blocks(q, k, perm, cfg)
            if hasattr(tsel, "BlockSelection"):  # the copies made by the pooling pass, as pbs prefill plans
                selection = tsel.BlockSelection(q, k, perm, cfg, None, values=v)
                return selection.select(0, selection.n_b)
            from pbs_kernels.triton import attention as tatt  # an earlier tree: a copy launch of its own

            return tsel.select_blocks(q, k, perm, cfg), tatt.permuted_copies((k, v), perm)

        per_kernel = kernel_times(plan, args.iters)
        events = cuda_time(plan, 3, args.iters)
        kernels_us = {name: round(us, 1) for name, us in per_kernel.items()}
        print(json.dumps({"tag": args.tag, "seq_len": n, "kernels_us": kernels_us,
                          "kernels_total_us": round(sum(per_kernel.values()), 1),
                          "plan_ms_events": round(events["median_ms"], 4)}), flush=True)
        for name, us in per_kernel.items():
            print(f"{args.tag:6} {n // 1024:>4}K {us:9.1f} us  {name}", file=sys.stderr)
        del q, k, plan
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
