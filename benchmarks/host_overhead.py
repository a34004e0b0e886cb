"""Host (CPU) time of one ``pbs_attention`` call per read mode, on one CUDA GPU.

A small plan (SmolLM2 shape, 16K tokens, 5% of the blocks) keeps the GPU work under the host's, so
the wall time of back-to-back calls is what the host spends per call: the launcher's Python, the
descriptor set-up and Triton's dispatch. ``--profile MODE`` adds the top entries of a cProfile of
that mode's calls. Without CUDA graphs every sparse layer of ``pbs prefill`` pays this once.

    python benchmarks/host_overhead.py --modes remap,tma,persistent --profile persistent
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from kernel_bench import SHAPES, attend, copies, random_plan


def per_call_us(fn, calls: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="remap,tma,persistent")
    ap.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    ap.add_argument("--len", type=int, default=16384)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--profile", default=None, help="a mode whose calls to profile with cProfile")
    args = ap.parse_args(argv)
    h_q, h_kv, d = SHAPES[args.shape]
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, h, args.len, d, device=dev, dtype=torch.bfloat16, generator=g) for h in (h_q, h_kv, h_kv))
    plan = random_plan(1, h_q, h_kv, args.len, 0.05, dev)
    print(f"{args.shape} N={args.len} 5%: host time per call, us (with the K/V copy / with copies made before)")
    for mode in args.modes.split(","):
        pre = copies(k, v, plan, mode)
        with_copy = lambda: attend(q, k, v, plan, mode, None)  # noqa: E731
        without = lambda: attend(q, k, v, plan, mode, None, permuted=pre)  # noqa: E731
        for fn in (with_copy, without):
            per_call_us(fn, 20)  # compile, warm up
        print(f"  {mode:12s} {per_call_us(with_copy, args.calls):8.1f} {per_call_us(without, args.calls):8.1f}")
        if mode == args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.calls):
                without()
            torch.cuda.synchronize()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
