"""The attention kernel's default tile configs compile for Hopper (sm_90) and fit its shared memory.

Triton compiles for a GPU target without a GPU, so this runs on the CPU CI machine and catches without
a GPU a change that makes the copy + TMA config (3 stages of 128x128 K and V tiles) ask for more than
the H100's 227 KB per block and fail to launch (BENCHMARKS.md, "Design choices": int16 plan indices).
The compile runs in a subprocess without TRITON_INTERPRET (the suite's conftest sets it,
which turns the kernels into interpreted functions). Shared-memory sizes come from the installed
Triton, which may differ from the GPU machine's; the bound is the hardware's. The warp-specialized
kernel is also checked to come out warp-specialized (Triton drops the split silently when a loop does
not fit its rules, which costs that kernel most of its speed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

H100_SHARED_BYTES = 232_448  # max dynamic shared memory per block on sm_90 (227 KB)


def compiled(script: str, tmp_path) -> list[dict]:
    """The JSON list that ``script`` prints last, run in a subprocess without TRITON_INTERPRET and with an
    empty Triton cache (compiled for real); skips where this Triton install has no ptxas for sm_90."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    if run.returncode != 0 and "ptxas" in run.stderr.lower() and "not found" in run.stderr.lower():
        pytest.skip("this Triton install has no ptxas to compile for sm_90")
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])

_COMPILE = r"""
import inspect
import json, sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pbs_kernels.triton import attention as A
from pbs_kernels.triton import attention_kernel as K

ptr = {name: ("*i32" if name in ("PERM", "KV_NUM", "KV_IDX") else "*fp32" if name == "SINK" else "*bf16")
       for name in ("Q", "K", "V", "KP", "VP", "PERM", "O", "KV_NUM", "KV_IDX", "SINK")}
scalars = {"qk_scale": "fp32", "CAP_IN": "fp32",
           **{n: "i32" for n in ("WINDOW", "N_CTX", "H_Q", "H_KV", "H_PERM", "QB0", "N_QB", "N_KB")}}
# as a launch specializes them: 16-byte aligned tensors and a length divisible by 16. Without these hints
# Triton cannot pipeline the tile loads asynchronously and reports a fraction of the shared memory a real
# launch asks for (head_dim 256: 96 KB here against 256 KB on the GPU)
params = list(inspect.signature(K.pbs_attn_fwd.fn).parameters)
aligned = {(params.index(name),): [["tt.divisibility", 16]] for name in (*ptr, "N_CTX")}
out = []
for d in A.SUPPORTED_HEAD_DIMS:
    for mode, code in A.PERM_MODES.items():
        if mode == "persistent":  # its own kernel, in the next test
            continue
        if A.resolve_perm_mode(32768, 128, torch.empty(1, 1, 1, d, device="meta"), mode) != mode:
            continue  # a mode this head_dim never runs (256: tma)
        # plain causal at both plan blocks; with a window, soft-capping and sinks (all three) at 128
        for block, masked in ((128, False), (64, False), (128, True)):
            cfg = A._default_config(block, d, mode, masked)
            consts = dict(PLAN_BLOCK=block, SEG_BLOCKS=256 // block, SEG_POW2=256 // block, BLOCK_M=cfg["BLOCK_M"],
                          BLOCK_N=cfg["BLOCK_N"], HEAD_DIM=d, PERM_MODE=code, DOT_PREC="tf32", WINDOWED=masked,
                          SOFTCAP=masked, SINKS=masked)
            sig = {**ptr, **scalars, **{c: "constexpr" for c in consts}}
            kernel = triton.compile(ASTSource(fn=K.pbs_attn_fwd, signature=sig, constexprs=consts, attrs=aligned),
                                    target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
            out.append({"head_dim": d, "mode": mode, "block": block, "masked": masked, **cfg,
                        "shared": kernel.metadata.shared})
print(json.dumps(out))
"""


def test_default_configs_fit_hopper_shared_memory(tmp_path):
    results = compiled(_COMPILE, tmp_path)
    # head_dim 64, 128 x read mode x (block 128, 64, masked 128); 256 x (gather, remap) x 3
    assert len(results) == 2 * 3 * 3 + 2 * 3
    too_big = [r for r in results if r["shared"] > H100_SHARED_BYTES]
    assert all(r["shared"] > 0 for r in results)  # every config stages tiles through shared memory
    assert not too_big, f"configs over the H100's {H100_SHARED_BYTES} bytes of shared memory: {too_big}"


_COMPILE_GLUON = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from pbs_kernels.triton import attention as A
from pbs_kernels.triton import attention_gluon_kernel as KG

out = []
for block, d in ((128, 64), (128, 128), (64, 64), (64, 128)):
    layout = gl.NVMMASharedLayout.get_default_for([block, d], gl.bfloat16)
    desc = f"tensordesc<bf16[{block},{d}],{layout!r}>"
    k_stages, v_stages = A._persistent_stages(d, block)
    # both tile pickings and both tile orders with 128-token blocks; one of each with 64
    for dynamic in ((True, False) if block == 128 else (d == 64,)):
        consts = dict(SEG_BLOCKS=256 // block, BLOCK=block, HEAD_DIM=d, K_STAGES=k_stages, V_STAGES=v_stages,
                      DYNAMIC=dynamic, HEAD_MAJOR=dynamic, TOKEN_MAJOR=not dynamic)
        sig = {**{n: desc for n in ("q_desc", "k_desc", "v_desc", "ko_desc", "vo_desc")}, "O": "*bf16",
               "KV_NUM": "*i32", "KV_IDX": "*i32", "COUNTER": "*i32", "qk_scale": "fp32",
               **{n: "i32" for n in ("N_CTX", "H_Q", "H_C", "H_KV", "QB0", "N_ROWS", "N_KB", "N_TILES")},
               **{c: "constexpr" for c in consts}}
        kernel = triton.compile(GluonASTSource(fn=KG.pbs_attn_fwd_persistent, signature=sig, constexprs=consts),
                                target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": 4, **A._persistent_registers(block)})
        ptx = kernel.asm["ptx"]
        maxnreg = int(ptx.split(".maxnreg")[1].split()[0]) if ".maxnreg" in ptx else 255
        out.append({"block": block, "head_dim": d, "dynamic": dynamic, "shared": kernel.metadata.shared,
                    "warps_launched": kernel.metadata.num_warps, "wgmma": ptx.count("wgmma.mma_async"),
                    "registers_launched": maxnreg * 32 * kernel.metadata.num_warps})
print(json.dumps(out))
"""


def test_persistent_gluon_kernel_compiles_for_hopper(tmp_path):
    """The persistent Gluon kernel ("persistent" read mode) compiles for sm_90 with the installed Triton
    (the GPU machine had 3.6, CI has a later one: the kernel bridges the renamed Gluon calls), fits the
    H100's shared memory with the launcher's ring sizes, launches its partitions (with 128-token blocks two
    4-warp consumer groups, with 64-token blocks one; two 1-warp loaders) and multiplies on the tensor
    cores with wgmma. With 64-token blocks two programs fit one SM: half its shared memory and registers
    each (``_persistent_registers``)."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    results = compiled(_COMPILE_GLUON, tmp_path)
    assert len(results) == 6
    for r in results:
        assert 0 < r["shared"] <= H100_SHARED_BYTES, r
        assert r["warps_launched"] >= 4 * (r["block"] // 64) + 1 + 1, r
        assert r["wgmma"] > 0, r
        if r["block"] == 64:
            assert r["shared"] <= H100_SHARED_BYTES // 2, r
            assert r["registers_launched"] <= 65536 // 2, r


_COMPILE_GLUON_SCORING = r"""
import json, os, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from pbs_kernels.triton import sampled_gluon as L
from pbs_kernels.triton import sampled_gluon_kernel as KS

out = []
# the Llama shape's float8 rows (one head per program), the SmolLM2 shape's bf16 rows (its 3 query heads
# per permutation in one program)
for dt, dtype, d, heads, fp8 in (("fp8e4nv", gl.float8e4nv, 128, 1, True), ("bf16", gl.bfloat16, 64, 3, False)):
    qb = L.ROWS // (heads * 16)
    q_layout = gl.NVMMASharedLayout.get_default_for([qb * 16, d], dtype)
    k_layout = gl.NVMMASharedLayout.get_default_for([64, d], dtype)
    consts = dict(HP=heads, QB=qb, M=16, KB=2, BLOCK=64, HEAD_DIM=d, STAGES=L.STAGES, FP8=fp8, ROW_TOP=2)
    scalars = ("n_keys", "n_b", "r0", "r1", "H_q", "G_PERM", "per_seg", "q_blocks", "q_block0")
    sig = {"q_desc": f"tensordesc<{dt}[{qb * 16},{d}],{q_layout!r}>",
           "k_desc": f"tensordesc<{dt}[64,{d}],{k_layout!r}>",
           **{n: "*fp32" for n in ("OUT", "LSE", "LPART", "TOPV")}, "TOPI": "*i32", "RSCALE": "*fp32",
           "scale_log2": "fp32", **{n: "i32" for n in scalars}, **{c: "constexpr" for c in consts}}
    kernel = triton.compile(GluonASTSource(fn=KS.sampled_max_permuted_fwd, signature=sig, constexprs=consts),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptxas = get_ptxas(90) if get_ptxas.__code__.co_argcount else get_ptxas()
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(kernel.asm["ptx"])
        ptx.flush()
        run = subprocess.run([ptxas.path, "-arch=sm_90a", "-v", ptx.name, "-o", os.devnull], capture_output=True,
                             text=True, check=True)
    out.append({"dtype": dt, "shared": kernel.metadata.shared, "warps_launched": kernel.metadata.num_warps,
                "wgmma": kernel.asm["ptx"].count("wgmma.mma_async"), "ptxas": run.stdout + run.stderr})
print(json.dumps(out))
"""


def test_gluon_scoring_kernel_compiles_for_hopper(tmp_path):
    """The Gluon scoring kernel (``SampledTiles.gluon``) compiles for sm_90, fits the H100's shared memory,
    launches two 4-warp consumer groups and a loader, multiplies with wgmma, and ptxas keeps its
    products asynchronous: ptxas serializes every wgmma of a kernel (warning C7514) where an instruction
    reads the accumulator of a product still in flight, which would undo the point of the kernel."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    results = compiled(_COMPILE_GLUON_SCORING, tmp_path)
    assert len(results) == 2
    for r in results:
        assert 0 < r["shared"] <= H100_SHARED_BYTES, r
        assert r["warps_launched"] >= 4 + 4 + 1, r
        assert r["wgmma"] > 0, r
        assert "serialized" not in r["ptxas"], r["ptxas"]
