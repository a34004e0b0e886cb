# One call (no model): where planning time goes at short and long lengths. `pbs profile --trace` of one
# PBS pass (SmolLM2 and Llama shapes, $LENS), its kernels summed from the trace; then select_bench.py
# --sweep (tiles and importance spans) for both shapes. Summaries last.
source benchmarks/device/setup.sh
for shape in smollm2 llama; do
  args=""; [ $shape = smollm2 ] && args="--heads 9 --kv-heads 3 --head-dim 64"
  for n in ${LENS:-8k 32k 128k}; do
    pbs profile --seq-len $n $args --backends pbs --trace "$OUT/trace_${shape}_$n.json" -o "$OUT/profile_${shape}_$n.json" \
      > /dev/null 2> "$OUT/profile_${shape}_$n.err"
  done
  python3 benchmarks/select_bench.py $args --seq-lens ${SWEEP_LENS:-32k,128k} --sweep --json "$OUT/sweep_$shape.json" \
    2> "$OUT/sweep_$shape.err" > /dev/null
done
python3 - "$OUT" <<'PY'
import collections, glob, json, sys
for path in sorted(glob.glob(sys.argv[1] + "/trace_*.json")):
    ev = json.load(open(path))["traceEvents"]
    agg = collections.Counter()
    for e in ev:
        if e.get("cat") == "kernel":
            agg[e["name"][:60]] += e["dur"]
    print(path.split("/")[-1], " ".join(f"{k}={v:.0f}us" for k, v in agg.most_common(12)))
for path in sorted(glob.glob(sys.argv[1] + "/sweep_*.json")):
    for row in json.load(open(path))["sweep"]:
        imp = " ".join(f"{r.get('block_m')}/{r.get('block_n')}/{r.get('num_warps')}/s{r.get('span')}={r['median_ms']:.3f}" for r in row["importance"])
        sel = " ".join(f"{r['tile_elements']}/{r['top_p_warps']}/{r['score_block']}={r['median_ms']:.3f}" for r in row["select"])
        print(path.split("/")[-1], row["seq_len"], "pool_q", f"{row['pool_q']['median_ms']:.3f}", "pool_k", f"{row['pool_k']['median_ms']:.3f}")
        print("  importance", imp)
        print("  select", sel)
PY
