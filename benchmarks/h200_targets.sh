#!/usr/bin/env bash
# Issue 21's and 26's targets in one device call each (their figures are the H200's). Prints the card
# first; every part tees its table to $OUT/<part>_<card>.txt and writes its JSON beside it.
#
#   bash benchmarks/h200_targets.sh fp8-fixed     # FP8 weights + KV at trtllm-bench's counts: 128/128 x 30,000, 2048/128 x 3,000
#   bash benchmarks/h200_targets.sh fp8-long      # FP8 128/2048 x 3,000, batch 1 and TTFT
#   bash benchmarks/h200_targets.sh bf16          # bf16: the ShareGPT-like mix, 128/128 x 1,024, 2048/128 x 256, 128/2048 x 1,000, batch 1, TTFT
#   bash benchmarks/h200_targets.sh w4g32         # W4A16 groups of 32 with offsets, 128/128 x 1,024: small-group rows 0 / 8
#
# On a card other than an H200 the H200 parts run w4g32 instead (either card serves it).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$repo:$repo/benchmarks" PYTHONUNBUFFERED=1
out=${OUT:-$repo/benchmarks/results}
part=$1
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "card: $gpu"
case "$gpu" in *H200*) card=h200 ;; *H100*) card=h100 ;; *) card=gpu ;; esac
[ "$card" != h200 ] && [ "$part" != w4g32 ] && { echo "not an H200: running w4g32 instead of $part"; part=w4g32; }
filter='Warning\|warn(\|cuda_timer'
e2e() {  # name, timeout seconds, gpu_e2e.py arguments
  local name=$1 limit=$2; shift 2
  timeout "$limit" python "$repo/benchmarks/gpu_e2e.py" --out "$out/$name" "$@" 2>&1 \
    | grep --line-buffered -v "$filter" | tee "$out/${name}_$card.txt"
}
case "$part" in
  fp8-fixed) e2e fp8_fixed 580 --model llama-3.1-8b-fp8 --kv-cache-dtype fp8 --parts perf --skip-latency \
               --offline 128/128x30000,2048/128x3000 ;;
  fp8-long) e2e fp8_long 580 --model llama-3.1-8b-fp8 --kv-cache-dtype fp8 --parts perf --offline 128/2048x3000 ;;
  bf16)
    timeout 200 python "$repo/benchmarks/realistic_load.py" --card h200 --passes 1 --skip-kernels \
      --out "$out/mix_bf16.json" 2>&1 | grep --line-buffered -v "$filter" | tee "$out/mix_bf16_$card.txt"
    e2e bf16 380 --parts perf --offline 128/128x1024,2048/128x256,128/2048x1000 ;;
  w4g32)
    for rows in 0 8; do
      e2e "w4a16g32z_128x1024_rows$rows" 250 --quantization w4a16 --group-size 32 --zero-point --skip-latency \
        --offline 128/128x1024 --small-group-rows "$rows"
    done ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
