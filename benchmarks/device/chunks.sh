# One call (no model): the CUDA test files, then select_bench.py -- selection timings at 32K/128K and,
# at 512K, the selection's peak memory whole vs in row chunks and pbs_prefill_attention chunked vs
# whole (time, memory, equal outputs) -- and a short `pbs profile`. Summaries last.
source benchmarks/device/setup.sh
python3 -m pytest -q -p no:cacheprovider tests/test_triton_attention.py tests/test_triton_select.py \
  tests/test_triton_sampled.py tests/test_row_chunks.py tests/test_dense_sdpa.py tests/test_presets_gpu.py \
  tests/test_integration.py 2>&1 | tail -3 | tee "$OUT/gpu_tests.log"
python3 benchmarks/select_bench.py --json "$OUT/select_bench.json" > "$OUT/select_bench.txt" 2> "$OUT/select_bench.err"
pbs profile --seq-len ${LENS:-32k,128k} --backends pbs,sdpa-cudnn -o "$OUT/profile.json" --markdown \
  2> "$OUT/profile.err" > "$OUT/profile.md"
grep "| pbs\|| sdpa" "$OUT/profile.md"
cat "$OUT/select_bench.txt"; tail -3 "$OUT/select_bench.err"
