# One call, no model: the persistent Gluon kernel's GPU tests, then the kernel benchmark against the
# earlier defaults (Llama: ws; SmolLM2: tma), copies timed in and apart (--kernel-only), as CUDA-graph
# replays (--graph: GPU time, as pbs prefill sees it; without it the small head_dim-64 calls time the host).
# MODES / MODES64 override the compared modes (e.g. MODES=ws,persistent,persistent_1tile); LENS / LENS64
# the lengths.
source benchmarks/device/setup.sh
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_gluon_attention.py tests/test_graphs.py \
  tests/test_triton_attention.py -k "persistent or graph or auto" 2>&1 | tail -6 \
  | tee "$OUT/gluon_tests.log" || exit 1
timeout 240 python3 benchmarks/kernel_bench.py --shapes llama --lens ${LENS:-32k,128k} --no-flash --no-flex --graph \
  --modes ${MODES:-ws,persistent} --kernel-only --out "$OUT" 2>&1 | grep -v '^{"shape' | tail -24 | tee "$OUT/llama.log"
timeout 150 python3 benchmarks/kernel_bench.py --shapes smollm2 --lens ${LENS64:-${LENS:-32k,128k}} --no-flash --no-flex --graph \
  --modes ${MODES64:-tma,persistent} --kernel-only --out "$OUT" 2>&1 | grep -v '^{"shape' | tail -18 | tee "$OUT/smollm2.log"
