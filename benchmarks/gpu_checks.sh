#!/usr/bin/env bash
# The GPU checks of the paths that the interpreter cannot run, and the measurements that decide their
# defaults, in parts of a few minutes each. From the repository root, on a Hopper GPU with pbs installed:
#
#   bash benchmarks/gpu_checks.sh kernels OUT   # GPU tests of the Gluon kernels and the sampled selection
#   bash benchmarks/gpu_checks.sh speed OUT     # the selection with and without Gluon scoring, pbs profile
#   bash benchmarks/gpu_checks.sh eval OUT      # the embedded model: bf16 pbs eval on the held-out prose
#   bash benchmarks/gpu_checks.sh prefill OUT   # the embedded model: whole-model prefill against dense
#
# OUT (default gpu-checks/) gets one log per step. Each step has its own time limit, so that one that
# hangs (a Gluon kernel waiting on a barrier that never completes) costs its limit, not the part.
set -uo pipefail
part=${1:?part: kernels, speed, eval or prefill}
out=${2:-gpu-checks}
mkdir -p "$out"

step() {  # step NAME SECONDS COMMAND...: run, log to OUT/NAME.log, print the log's tail
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date -u +%H:%M:%S) UTC)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "   exit $? ; $(tail -n 3 "$out/$name.log" | tr '\n' ' ' | cut -c1-400)"
}

python3 -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, 'transformers', transformers.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee "$out/versions.txt"

case $part in
kernels)
  step gluon-scoring 150 python3 -m pytest -q -p no:cacheprovider tests/test_triton_sampled.py -k "gluon or resuming"
  step gluon-attention-64 100 python3 -m pytest -q -p no:cacheprovider tests/test_gluon_attention.py
  step sampled-plans 120 python3 -m pytest -q -p no:cacheprovider tests/test_triton_sampled.py -k "plan_matches or float8"
  ;;
speed)
  for score in sampled_max sampled_max_fp8; do  # the default's scoring and its float8 option, Triton then Gluon
    step "select-$score" 100 python3 benchmarks/sampled_bench.py --shapes llama --seq-lens 32k,128k \
      --reference-lens '' --check-len 0 --kernels --set "score=$score" --json "$out/select-$score.json"
    PBS_GLUON_SCORING=1 step "select-$score-gluon" 100 python3 benchmarks/sampled_bench.py --shapes llama \
      --seq-lens 32k,128k --reference-lens '' --check-len 0 --kernels --set "score=$score" \
      --json "$out/select-$score-gluon.json"
  done
  step profile-default 90 pbs profile --seq-len 32k,128k --backends pbs,sdpa-cudnn --profile default --markdown \
    -o "$out/profile-default.json"
  PBS_GLUON_SCORING=1 PBS_PERM_MODE=persistent step profile-default-gluon 90 pbs profile --seq-len 32k,128k \
    --backends pbs,sdpa-cudnn --profile default --markdown -o "$out/profile-default-gluon.json"
  ;;
eval)
  # the held-out documents of BENCHMARKS.md ("Held-out prose") made with Python 3.11: pass them in PBS_DOCS
  # (specialnames.txt, compound.txt, news.txt); without it they come from this Python, whose texts may differ
  docs=${PBS_DOCS:-$out/docs}
  if [ -z "${PBS_DOCS:-}" ]; then
    mkdir -p "$docs"
    for topic in specialnames compound; do
      python3 -c "import pydoc_data.topics as t; print(t.topics['$topic'])" > "$docs/$topic.txt"
    done
    cp "$(python3 -c 'import idlelib, os; print(os.path.dirname(idlelib.__file__))')/NEWS.txt" "$docs/news.txt"
  fi
  for profile in ${PBS_EVAL_PROFILES:-default}; do  # e.g. "default fp8" with a preset file in PBS_CONFIG_DIR
    for doc in specialnames compound news; do
      step "eval-$doc-$profile" 90 pbs eval "$docs/$doc.txt" --profile "$profile" --max-tokens 8k --device cuda \
        --json -o "$out/eval-$doc-$profile.json"
    done
  done
  ;;
prefill)
  cat "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"/*.py | head -c 1600000 > "$out/doc.txt"
  for n in 8k 32k 128k; do
    step "prefill-$n" 120 pbs prefill "$out/doc.txt" --profile default --max-tokens "$n" --beyond-context \
      --compare-dense --continuation 0 --json -o "$out/prefill-$n.json"
  done
  ;;
*)
  echo "unknown part $part: kernels, speed, eval or prefill" >&2
  exit 2
  ;;
esac
