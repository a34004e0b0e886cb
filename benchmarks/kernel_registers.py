"""Registers and spills per thread of the sampled selection's kernels on sm_90, without a GPU.

Compiles ``_sampled_lse_kernel`` (scoring, block maxima, bf16) at a few tiles and ``_sampled_top_p_kernel``
at a few warp counts with Triton's compiler, then asks the ptxas that Triton uses for sm_90 (``-v``)
what each uses. A thread of an H100 has at most 255 registers and an SM 65,536, so registers bound how
many programs an SM keeps in flight; spills go to local memory.

    python benchmarks/kernel_registers.py
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from pbs_kernels.triton.sampled_kernel import _sampled_lse_kernel, _sampled_top_p_kernel

def ptxas_usage(fn, signature: dict, constants: dict, warps: int, stages: int | None = None) -> str:
    """'N registers, S/L bytes spilled (stores/loads), M KiB shared' of ``fn`` compiled for sm_90a."""
    sig = {**signature, **{name: "constexpr" for name in constants}}
    options = {"num_warps": warps, **({"num_stages": stages} if stages else {})}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constants),
                            target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(kernel.asm["ptx"])
        ptx.flush()
        out = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", ptx.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text).group(1)
    stores, loads = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text).groups()
    return f"{regs} registers, {stores}/{loads} bytes spilled, {kernel.metadata.shared / 1024:.0f} KiB shared"


def scoring(head_dim: int, rows: int, key_blocks: int, warps: int, heads: int, tma: bool = False,
            stages: int | None = None) -> str:
    sig = {"Q": "*bf16", "K": "*bf16", "KP": "*bf16", "PERM": "*i32", "OUT": "*fp32", "LSE": "*fp32",
           "LPART": "*fp32", "TOPV": "*fp32", "TOPI": "*i32", "RSCALE": "*fp32", "scale_log2": "fp32"}
    sig.update({name: "i32" for name in ("stride_qb", "stride_qh", "stride_qn", "stride_kb", "stride_kh",
                                         "stride_kn", "stride_pkb", "stride_pkh", "stride_pkn", "stride_pb",
                                         "stride_ph", "n_keys", "n_b", "r0", "r1", "H_q", "G_KV", "G_PERM",
                                         "per_seg")})
    consts = dict(M=16, M_POW2=16, STEP=4, GEOMETRIC=False, QB=rows // (16 * heads), HP=heads, BLOCK_R=rows,
                  BLOCK_N=64, KB=key_blocks, MAX=True, COPY=tma, TMA=tma, FP8=False, ROW_TOP=2, RT_POW2=2, HEAD_DIM=head_dim,
                  D_POW2=head_dim, IEEE=False, RESUME=False)
    return ptxas_usage(_sampled_lse_kernel, sig, consts, warps, stages)


def top_p(blocks: int, warps: int) -> str:
    sig = {"OUT": "*fp32", "LSE": "*fp32", "TOPV": "*fp32", "TOPI": "*i32", "SINK": "*i32", "NUM": "*i32",
           "IDX": "*i32", "threshold": "fp32"}
    sig.update({name: "i32" for name in ("r0", "sub0", "live", "rows", "n_blocks", "H_q", "Q_PER_PERM",
                                         "blocks_per_seg", "local_blocks")})
    consts = dict(M=16, ROW_TOP=2, TOTAL=True, KEEP_ALL=False, USE_SINK=True, FORCED_COUNT=True, BLOCK_R=1,
                  NB_POW2=blocks)
    return ptxas_usage(_sampled_top_p_kernel, sig, consts, warps)


def main() -> None:
    # (head_dim, rows, key blocks, warps, heads, keys from a permuted copy through TMA, stages): the former
    # launch (keys gathered), then the committed tiles (SAMPLED_TILES) for head_dim 128 and 64
    for head_dim, rows, key_blocks, warps, heads, tma, stages in ((128, 64, 2, 4, 1, False, None),
                                                                  (128, 128, 2, 8, 1, True, 4),
                                                                  (64, 128, 2, 8, 1, True, 4)):
        keys = f"TMA copy, {stages} stages" if tma else "gathered"
        print(f"scoring, head_dim {head_dim}, {rows} rows ({heads} heads), {key_blocks} key blocks, {warps} warps, "
              f"{keys}: {scoring(head_dim, rows, key_blocks, warps, heads, tma, stages)}", flush=True)
    for blocks in (512, 2048):
        for warps in (1, 2, 4, 8, 16):
            print(f"top-p, {blocks} key blocks, {warps} warps: {top_p(blocks, warps)}", flush=True)


if __name__ == "__main__":
    main()
