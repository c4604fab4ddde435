#!/usr/bin/env bash
# The rotating K/V write reading the fused QKV output in place (pallas_kernels/kv_write.py `qkv`)
# against an older tree that hands it q, k and v (three slice copies a layer): batch-1 decode and
# TTFT of the SmolLM2-135M and Llama-3.1-8B shapes, each tree a new process, the trees alternating;
# SmolLM2's batch-1 decode also under the profiler (kernels a token). One table at the end; each
# run's JSON under $OUT/fused_qkv_write_<card>.json.
#
#   git archive <commit> jaxllm pallas_kernels | tar -x -C .old      # here; carry .old to the device
#   [MODELS=smollm2-135m] bash benchmarks/fused_qkv_write.sh .old
set -uo pipefail
old=$(cd "$1" && pwd)
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$repo/benchmarks/results}
export PYTHONUNBUFFERED=1
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$gpu" in *H200*) card=h200 ;; *H100*) card=h100 ;; *) card=gpu ;; esac
runs=$(mktemp -d)
{
  echo "card: $gpu"
  for model in ${MODELS:-smollm2-135m llama-3.1-8b}; do
    profile=$([ "$model" = smollm2-135m ] && echo --profile)
    for tree in old new; do
      src=$([ "$tree" = old ] && echo "$old" || echo "$repo")
      echo "== $model, $tree tree ($src)"
      PYTHONPATH="$src:$repo/benchmarks" timeout 170 python "$repo/benchmarks/gpu_e2e.py" --model "$model" \
        --parts perf --offline none $profile --out "$runs/${model}_$tree" 2>&1 |
        grep --line-buffered -v 'Warning\|warn(\|cuda_timer\|Source Location\|external/xla\|^E1'
    done
  done
  python - "$runs" <<'EOF'
import json, pathlib, sys
runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*/*.json"))}
print("\n| run | batch-1 decode, ms a token | TTFT 128 / 2,048, ms | programs compiled in, s |\n|---|---|---|---|")
for name, r in runs.items():
    p = r.get("perf", {})
    b = p.get("batch1", {}).get("decode_ms_per_token", float("nan"))
    print(f"| {name} | {b:.3f} | {p.get('ttft_128_ms', float('nan')):.1f} / {p.get('ttft_2048_ms', float('nan')):.1f}"
          f" | {p.get('precompile_s', float('nan')):.0f} |")
json.dump(runs, open(sys.argv[1] + "/all.json", "w"), indent=1)
EOF
  cp "$runs/all.json" "$out/fused_qkv_write_$card.json"
} 2>&1 | tee "$out/fused_qkv_write_$card.txt"
