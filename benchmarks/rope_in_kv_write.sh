#!/usr/bin/env bash
# The rotary embedding inside the Pallas K/V write (pallas_kernels/kv_write.py rope_write_kv_kernel,
# switched by jaxllm/layers/attention.py ROPE_IN_KV_WRITE) against XLA's rotation fusions, on one
# GPU, in one call each; every engine a new process, nothing subtracted, JSON under $OUT:
#
#   PYTHONUNBUFFERED=1 bash benchmarks/rope_in_kv_write.sh checks   # MODELS=llama-3.1-8b: ~520 s on an H100
#       the kernel's tests compiled; 'pallas' with the rotating write against 'xla' (tokens of two
#       float32 models); batch-1 decode and TTFT of the SmolLM2-135M and Llama-3.1-8B shapes and
#       128/128 x 1,024 of the 8B, without and with the rotating write
#   PYTHONUNBUFFERED=1 bash benchmarks/rope_in_kv_write.sh mix      # ~250 s
#       the 1,000-request ShareGPT-like mix without and with it (mix_variants.py's table)
#
# OLD=DIR (an older tree's jaxllm and pallas_kernels unpacked there: `git archive <commit> jaxllm
# pallas_kernels | tar -x -C DIR`) adds that tree as a third variant, first; MODELS="..." picks the
# models of `checks` (default: smollm2-135m llama-3.1-8b; on an H100 the compiled tests take ~230 s and
# the 8B ~100 s a variant, so one model a call stays within its 10 minutes).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
B=$repo/benchmarks
export PYTHONPATH=$repo:$B
out=${OUT:-$B/results}
case "${1:-checks}" in
checks)
  echo "=== the kernels' tests, compiled"
  (cd "$repo" && timeout 300 python -m pytest -q -p no:cacheprovider -W ignore tests/test_pallas_kv_write.py tests/test_pallas_decode.py tests/test_pallas_ragged.py 2>&1 | grep -v '^\.*$' | tail -8)
  echo "=== 'pallas' (rotating write) against 'xla'"
  timeout 240 python "$B/gpu_e2e.py" --parts correctness --rope-in-kv-write on --out "$out/rope_correctness" 2>&1 | grep "pallas vs xla\|rror"
  for model in ${MODELS:-smollm2-135m llama-3.1-8b}; do
    offline=none; [ $model = llama-3.1-8b ] && offline=128/128x1024
    for variant in ${OLD:+old_tree} xla_rotation rope_in_kv_write; do
      flag="--rope-in-kv-write on"; [ $variant = xla_rotation ] && flag="--rope-in-kv-write off"
      [ $variant = old_tree ] && flag=
      path=$PYTHONPATH; [ $variant = old_tree ] && path=$(cd "$OLD" && pwd):$B
      echo "=== $model, $variant"
      timeout 160 env PYTHONPATH="$path" python "$B/gpu_e2e.py" --model $model --parts perf --offline $offline $flag \
        --out "$out/rope_${model}_$variant" 2>&1 | grep -v Warn | grep -E 'batch|TTFT|offline|precompiled|error' | head -12
    done
  done
  ;;
mix)
  timeout 560 python "$B/mix_variants.py" ${OLD:+--tree old_tree "$OLD" --variant old_tree ''} \
    --variant xla_rotation '--rope-in-kv-write off' --variant rope_in_kv_write '--rope-in-kv-write on' --timeout 250 2>&1 | grep -v Warn | tail -30
  ;;
*) echo "usage: $0 checks|mix" >&2; exit 2 ;;
esac
