#!/usr/bin/env bash
# Issue 21's and 26's targets in one device call each (their figures are the H200's). Prints the card
# first; every part appends its tables to $OUT/<part>_<card>.txt and its runs' JSON to $OUT/<part>_<card>.json
# (two files a call: a call brings back at most eight).
#
#   bash benchmarks/h200_targets.sh fp8-fixed     # FP8 weights + KV at trtllm-bench's counts: 128/128 x 30,000, 2048/128 x 3,000
#   bash benchmarks/h200_targets.sh fp8-long      # FP8 128/2048 x 3,000, batch 1 and TTFT
#   bash benchmarks/h200_targets.sh bf16          # bf16: the ShareGPT-like mix, 128/128 x 1,024, 2048/128 x 256, 128/2048 x 1,000, batch 1, TTFT
#   bash benchmarks/h200_targets.sh either        # either card: quantized models' 16-row decode steps with Triton GEMMs
#                                                 # up to 8 / 16 rows (FP8, W8A16, W4A16), then W4A16 groups of 32 with
#                                                 # offsets at 128/128 x 1,024 with small-group rows 0 / 8, as time allows
#   bash benchmarks/h200_targets.sh diagnose      # either card: the SmolLM2-135M shape's batch-1 decode under the profiler
#   bash benchmarks/h200_targets.sh wide          # either card: W8A16 and W4A16 with Triton GEMMs up to 16 / 1,024
#                                                 # tokens a program: 128/128 x 1,024, as time allows
#   bash benchmarks/h200_targets.sh fp8-formats   # either card: a float checkpoint in FP8 + FP8 KV, activations per
#                                                 # token against calibrated static scales (calib_config, 64 samples)
#   bash benchmarks/h200_targets.sh sampler       # either card: top-k / top-p truncation masks, the library's halving
#                                                 # against a sort of every row and other searches (truncation_cost.py),
#                                                 # then sample()'s plain and truncating flavors (sampler_cost.py)
#
# On a card other than an H200 the H200 parts run `wide` instead (`either` was measured on an H100),
# or the part ELSE names (an H200 part then runs on that card), unless ANY_CARD=1 (then they run as
# asked, on that card).
# A run is skipped if it could end past $DEADLINE seconds (default 590: a call's 600 s), or cut to the
# time left when that is at least 3/4 of its time limit.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$repo:$repo/benchmarks" PYTHONUNBUFFERED=1
out=${OUT:-$repo/benchmarks/results}
part=$1
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "card: $gpu"
case "$gpu" in *H200*) card=h200 ;; *H100*) card=h100 ;; *) card=gpu ;; esac
case "$part" in either | wide | diagnose | fp8-formats | sampler) ;; *)  # the H200 parts
  [ -z "${ANY_CARD:-}" ] && [ "$card" != h200 ] && \
    { echo "not an H200: running '${ELSE:-wide}' instead of $part"; part=${ELSE:-wide}; } ;;
esac
filter='Warning\|warn(\|cuda_timer'
e2e() {  # name, timeout seconds, gpu_e2e.py arguments
  local name=$1 limit=$2 left=$((${DEADLINE:-590} - SECONDS)); shift 2
  # a run that would end past the deadline is skipped, or cut to the time left when that is 3/4 of its limit
  if [ $((4 * left)) -lt $((3 * limit)) ]; then echo "skipped $name: the call's time"; return; fi
  [ "$left" -lt "$limit" ] && { echo "(cut to ${left} s by the call's time)"; limit=$left; }
  echo "== $name: gpu_e2e.py $*"
  timeout "$limit" python "$repo/benchmarks/gpu_e2e.py" --out "$runs/$name" "$@" 2>&1 | grep --line-buffered -v "$filter"
}
runs=$(mktemp -d)
trap 'python -c "import json, pathlib, sys; print(json.dumps({p.parent.name: json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob(\"*/*.json\"))}, indent=1))" "$runs" > "$out/${part}_$card.json"' EXIT
case "$part" in
  fp8-fixed) e2e fp8_fixed 580 --model llama-3.1-8b-fp8 --kv-cache-dtype fp8 --parts perf --skip-latency \
               --offline 128/128x30000,2048/128x3000 ;;
  fp8-long) e2e fp8_long 580 --model llama-3.1-8b-fp8 --kv-cache-dtype fp8 --parts perf --offline 128/2048x3000 ;;
  bf16)
    timeout 200 python "$repo/benchmarks/realistic_load.py" --card h200 --passes 1 --skip-kernels \
      --out "$runs/mix/realistic_load.json" 2>&1 | grep --line-buffered -v "$filter"
    e2e bf16 380 --parts perf --offline 128/128x1024,2048/128x256,128/2048x1000 ;;
  either)
    for q in fp8 w8a16 w4a16; do
      case $q in fp8) args="--model llama-3.1-8b-fp8 --kv-cache-dtype fp8" ;; *) args="--quantization $q" ;; esac
      for rows in 8 16; do  # the second process loads every program but the 9-16-token ones from the first's cache
        e2e "triton_rows_${q}_$rows" $([ "$rows" = 8 ] && echo 170 || echo 110) $args --parts perf --skip-latency \
          --offline 128/128x16 --quantized-triton-rows "$rows"
      done
    done
    for rows in 0 8; do
      e2e "w4a16g32z_128x1024_rows$rows" 200 --parts perf --quantization w4a16 --group-size 32 --zero-point --skip-latency \
        --offline 128/128x1024 --small-group-rows "$rows"
    done ;;
  diagnose)
    e2e smollm2_batch1_profile 150 --model smollm2-135m --parts perf --offline none --profile ;;
  fp8-formats)  # each a new process that compiles its programs: the same 95, the calibrated one's scales static
    for calibrate in 0 64; do
      e2e "fp8_calibrate$calibrate" 280 --quantization fp8 --kv-cache-dtype fp8 --calibrate "$calibrate" --parts perf \
        --offline 128/128x8192,2048/128x1024
    done ;;
  sampler)  # the masks alone, then the whole sampler, plain and truncating (top_p 0.9)
    timeout 300 python "$repo/benchmarks/truncation_cost.py" --rows 2048,256,1 --vocab 128256 2>&1 \
      | grep --line-buffered -v "$filter"
    for top_p in 1.0 0.9; do
      timeout 120 python "$repo/benchmarks/sampler_cost.py" --rows 2048,256,1 --vocab 128256 --repeats 1 \
        --top-p $top_p 2>&1 | grep --line-buffered -v "$filter"
    done ;;
  wide)
    for q in w8a16 w4a16; do
      for rows in 16 1024; do
        e2e "triton_wide_${q}_$rows" $([ "$rows" = 16 ] && echo 130 || echo 200) --quantization "$q" --parts perf \
          --skip-latency --offline 128/128x1024 --quantized-triton-rows "$rows"
      done
    done ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac 2>&1 | tee "$out/${part}_$card.txt"
