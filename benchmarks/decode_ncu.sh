#!/usr/bin/env bash
# Nsight Compute over the Pallas decode-attention kernel, a bf16 cache against a float8 one at the
# same shapes: where each kernel's time goes (speed of light, memory, warp stalls, occupancy) and
# its hottest SASS lines. One call; the tables go to $OUT/decode_ncu_<card>.txt, the reports to
# $OUT/decode_ncu_<card>_<kv>_<shape>.ncu-rep.
#
#   bash benchmarks/decode_ncu.sh [B:CTX:PAGE,...]      # default 256:2112:32,64:2048:32
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$repo:$repo/benchmarks" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
out=${OUT:-$repo/benchmarks/results}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$gpu" in *H200*) card=h200 ;; *H100*) card=h100 ;; *) card=gpu ;; esac
configs=${1:-256:2112:32,64:2048:32}
{
  echo "card: $gpu; $(ncu --version | tail -1)"
  for config in ${configs//,/ }; do
    for kv in bfloat16 fp8; do
      rep="$out/decode_ncu_${card}_${kv}_${config//:/x}"
      echo "== $kv cache, batch:context:page $config"
      # The first launch compiles and warms up; the second is profiled (each section replays it).
      timeout 240 ncu --clock-control none -k regex:paged_decode --launch-skip 1 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        --section Occupancy --section LaunchStats --section SchedulerStats --section SourceCounters \
        --import-source no -f -o "$rep" \
        python "$repo/benchmarks/kernel_tuning.py" --split-targets 264 --decode-configs "$config" --kv-dtype "$kv" 2>&1 |
        grep -v '^==PROF==' | tail -3
      ncu -i "$rep.ncu-rep" --print-details all 2>&1 | grep -v '^ *$' | head -200
      # The SASS lines with the most warp-stall samples.
      ncu -i "$rep.ncu-rep" --page source --csv --print-source sass 2>/dev/null > "$rep.sass.csv"
      python - "$rep.sass.csv" <<'EOF'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
if not rows:
    print("(no source page)"); sys.exit()
head = rows[0]
col = next((i for i, h in enumerate(head) if h.startswith("Warp Stall Sampling (All")), None)
src = next((i for i, h in enumerate(head) if h == "Source"), 1)
if col is None:
    print("columns:", head[:20]); sys.exit()
body = [r for r in rows[1:] if len(r) > col and r[col].replace(".", "").isdigit()]
total = sum(float(r[col]) for r in body) or 1
print(f"SASS lines {len(body)}, stall samples {total:.0f}; the 25 hottest:")
for r in sorted(body, key=lambda r: -float(r[col]))[:25]:
    print(f"  {100 * float(r[col]) / total:5.1f}%  {r[src][:110]}")
EOF
      rm -f "$rep.sass.csv"
    done
  done
} 2>&1 | tee "$out/decode_ncu_$card.txt"
