#!/usr/bin/env bash
# The ShareGPT-like mix (realistic_load.py) on an older tree and on this one, in one call, each with
# its own empty program cache, and a table of the two: output tok/s of the first pass (compilation
# included, nothing subtracted; this tree's second pass beside it), host time a step, the share of
# steps dispatched ahead of the last one's read, and LLM() ready time.
#
#   git archive <commit> jaxllm pallas_kernels | tar -x -C .old      # here; carry .old to the device
#   PYTHONUNBUFFERED=1 bash benchmarks/side_by_side.sh .old [realistic_load.py options]   # JSON to $OUT
set -euo pipefail
old=$(cd "$1" && pwd); shift
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$repo/benchmarks/results}
mkdir -p "$out"
stamp=$(date +%Y-%m-%d)
# The old tree's jaxllm is found first (cwd and PYTHONPATH), with this tree's benchmarks/ scripts.
(cd "$old" && JAXLLM_COMPILE_CACHE=/tmp/jaxllm-cache-old PYTHONPATH="$old" \
  python "$repo/benchmarks/realistic_load.py" --passes 1 --skip-kernels --out "$out/side_by_side_old_$stamp.json" "$@")
(cd "$repo" && JAXLLM_COMPILE_CACHE=/tmp/jaxllm-cache-new PYTHONPATH="$repo" \
  python "$repo/benchmarks/realistic_load.py" --passes 2 --skip-kernels --out "$out/side_by_side_new_$stamp.json" "$@")
python - "$out/side_by_side_old_$stamp.json" "$out/side_by_side_new_$stamp.json" <<'EOF'
import json, sys

old, new = (json.load(open(p)) for p in sys.argv[1:3])


def row(name, f):
    values = []
    for r in (old, new):
        try:
            values.append(f(r))
        except (KeyError, TypeError):
            values.append("-")
    print(f"| {name} | " + " | ".join(values) + " |")


def first(r):
    return r["first_pass"]


print("| measure | old tree | this tree |\n|---|---|---|")
row("first pass, output tok/s", lambda r: f"{first(r)['summary']['total_output_throughput_tok_s']:,.0f}")
row("second pass, output tok/s", lambda r: f"{r['second_pass']['summary']['total_output_throughput_tok_s']:,.0f}")
row("first pass: host ms a step / share of wall", lambda r: f"{first(r)['breakdown']['mean_host_ms']:.1f} / {100 * first(r)['breakdown']['host_share']:.1f}%")
row("first pass: steps dispatched ahead", lambda r: f"{100 * first(r)['breakdown'].get('ahead_share', 0):.1f}%")
row("first pass: TTFT p50 / p99 ms", lambda r: f"{first(r)['summary']['ttft_ms']['p50']:.0f} / {first(r)['summary']['ttft_ms']['p99']:.0f}")
row("first pass: TPOT p50 / p99 ms", lambda r: f"{first(r)['summary']['tpot_ms']['p50']:.1f} / {first(r)['summary']['tpot_ms']['p99']:.1f}")
row("LLM() ready, s", lambda r: f"{r['llm_s']:.1f}")
EOF
