#!/usr/bin/env bash
# The ShareGPT-like mix (realistic_load.py) on an older tree and on this one, in one call, each a new
# process with its own empty program cache, and one table of the two (mix_variants.py): output
# tok/s of the first pass (compilation included, nothing subtracted; this tree's second pass beside
# it), padding, each step kind's time, host time a step, LLM() ready time.
#
#   git archive <commit> jaxllm pallas_kernels | tar -x -C .old      # here; carry .old to the device
#   PYTHONUNBUFFERED=1 bash benchmarks/side_by_side.sh .old [realistic_load.py options]   # JSON to $OUT
set -euo pipefail
old=$(cd "$1" && pwd); shift
repo=$(cd "$(dirname "$0")/.." && pwd)
exec env PYTHONPATH="$repo:$repo/benchmarks" python "$repo/benchmarks/mix_variants.py" --tree old "$old" \
  --variant old "$*" --variant new "--passes 2 $*"
