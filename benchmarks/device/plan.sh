# One call (no model): GPU time of each kernel of one layer's plan (benchmarks/plan_kernels.py), SmolLM2 and
# Llama shapes at $LENS (default 32k,128k). With OLD=DIR (a folder holding a copy of an earlier kernels/ as
# pbs_kernels/, untracked in the repository), the earlier kernels run too, alternating with these: old, new,
# old, new for SmolLM2, then old, new for Llama. PLAN_ARGS: more arguments (e.g. --with-copies). The tests of the
# selection on the GPU first.
source benchmarks/device/setup.sh
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_triton_select.py tests/test_row_chunks.py 2>&1 | tail -3 \
  | tee "$OUT/tests.log"
run() {  # TAG ARGS...: TAG starting with "old" runs the kernels in $OLD
  local tag=$1 pp=$PYTHONPATH; shift
  [ "${tag#old}" != "$tag" ] && pp=$PWD/$OLD:$PYTHONPATH
  PYTHONPATH=$pp timeout 60 python3 benchmarks/plan_kernels.py --tag "$tag" --seq-lens "${LENS:-32k,128k}" ${PLAN_ARGS:-} "$@" \
    2> "$OUT/plan_$tag.log" >> "$OUT/plan.jsonl"
}
llama=(--heads 32 --kv-heads 8 --head-dim 128)
if [ -n "${OLD:-}" ]; then
  run old1; run new1; run old2; run new2; run oldL "${llama[@]}"; run newL "${llama[@]}"
else
  run new; run newL "${llama[@]}"
fi
python3 - "$OUT/plan.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    top = sorted(r["kernels_us"].items(), key=lambda kv: -kv[1])[:5]
    print(f"{r['tag']:5} {r['seq_len'] // 1024:>4}K total {r['kernels_total_us']:8.1f} us  "
          + "  ".join(f"{name.strip('_')[:18]}={us:.1f}" for name, us in top))
PY
