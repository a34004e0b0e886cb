# Tensor-parallel TTFT on a 2-GPU machine (issue #8), in two calls: STEP=1 builds the random-weight
# Llama-3.1-8B and times one GPU; STEP=2 times 2 GPUs and prints the comparison. The model and the
# results stay in /tmp between the two calls (the machine stays warm for 30 s).
source benchmarks/device/setup.sh
env | grep -E "NCCL_NVLS|MULTICAST|NVSHMEM" | tee "$OUT/nccl_env.txt"
LENGTHS=${LENGTHS:-128k,256k,512k,768k}
common=(--tp 2 --lengths "$LENGTHS" --dense-max "${DENSE_MAX:-128k}" --warmup 1 --iters 1
        --model-dir /tmp/pbs-tp-bench/model --out /tmp/pbs-tp-bench/results)
mkdir -p /tmp/pbs-tp-bench/results
if [ "$STEP" = 1 ]; then
  python3 benchmarks/tp_bench.py "${common[@]}" --only build,1 2>&1 | grep -v "Loading weights" | tee "$OUT/tp1.log"
else
  python3 benchmarks/tp_bench.py "${common[@]}" --only N 2>&1 | grep -v "Loading weights" | tee "$OUT/tp2.log"
  python3 benchmarks/tp_bench.py "${common[@]}" --only compare --markdown 2>&1 | tee "$OUT/tp_compare.md"
  # the product command on 2 GPUs (torchrun engine): a byte-level test tokenizer next to the random weights
  python3 -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from fixtures import build_tokenizer; build_tokenizer(Path('/tmp/pbs-tp-bench/model'))"
  stdlib=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
  cat "$stdlib"/*.py | head -c 400000 > /tmp/doc.txt
  timeout 240 pbs prefill /tmp/doc.txt --model /tmp/pbs-tp-bench/model --tp 2 --max-tokens 32k --compare-dense \
    -o "$OUT/prefill_tp2.json" 2>&1 | grep -v "Loading weights" | tail -30 | tee "$OUT/prefill_tp2.log"
fi
cp /tmp/pbs-tp-bench/results/*.json "$OUT/" 2>/dev/null; true
