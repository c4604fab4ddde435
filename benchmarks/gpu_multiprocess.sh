#!/usr/bin/env bash
# One process per GPU on two GPUs: tests/multiprocess_script.py (generate, streaming, generate_async,
# get_stats over a tiny float32 checkpoint) with its engine spread over two processes, one GPU each,
# against the same script in one process on one GPU. Each process is started by hand (the launcher's
# environment) under `timeout -s ABRT`, so a process that hangs prints its Python stacks
# (PYTHONFAULTHANDLER) before it stops; then the same through `python -m jaxllm.launch`.
#
#   PYTHONPATH=$PWD bash benchmarks/gpu_multiprocess.sh [XLA_FLAGS of a further by-hand variant ...]
#
# (`jaxllm.distributed` adds --xla_gpu_shard_autotuning=false unless XLA_FLAGS set that flag: a variant
# `--xla_gpu_shard_autotuning=true` shows the hang it prevents.)
#
# Results: $OUT/mp_TAG.json (the script's output), and a line per variant.
set -u
OUT=${OUT:-/tmp/mp_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_MEM_FRACTION=0.4
LIMIT=${LIMIT:-150}
MODEL=/tmp/mp_tiny
python3 -c "from pathlib import Path; from tests.tiny import save_tiny; save_tiny('llama-odd', Path('$MODEL'))" || exit 1
SCRIPT=tests/multiprocess_script.py

echo "== one process, one GPU"
CUDA_VISIBLE_DEVICES=0 timeout -k 5 "$LIMIT" python3 $SCRIPT "$OUT/mp_single.json" $MODEL > /tmp/mp_single.log 2>&1
echo "   exit $?"; tail -3 /tmp/mp_single.log

by_hand() {  # tag, XLA_FLAGS
    local tag=$1 flags=$2 port=$((20000 + RANDOM % 20000))
    echo "== two processes by hand: $tag (XLA_FLAGS='$flags')"
    local pids=()
    for rank in 0 1; do
        if [ $rank = 0 ]; then cmd=(python3 $SCRIPT "$OUT/mp_$tag.json" $MODEL)
        else cmd=(python3 -c "from jaxllm.distributed import follower_main; follower_main()"); fi
        XLA_FLAGS=$flags CUDA_VISIBLE_DEVICES=$rank JAXLLM_COORDINATOR=127.0.0.1:$port JAXLLM_NUM_PROCESSES=2 \
            JAXLLM_PROCESS_ID=$rank timeout -s ABRT -k 5 "$LIMIT" "${cmd[@]}" > "/tmp/mp_${tag}_$rank.log" 2>&1 &
        pids+=($!)
    done
    for rank in 0 1; do
        wait "${pids[$rank]}"; local code=$?
        echo "   process $rank exit $code"
        if [ $code != 0 ]; then  # the stacks of a hung process, innermost first, and the log under OUT
            grep -E "^(Thread|Current thread)|^  File" "/tmp/mp_${tag}_$rank.log" | grep -v "threading.py" | head -40
            grep -vE "^(Thread|Current thread)|^  File|^Extension modules" "/tmp/mp_${tag}_$rank.log" | tail -4
            cp "/tmp/mp_${tag}_$rank.log" "$OUT/"
        fi
    done
}

for flags in "" "$@"; do
    by_hand "by_hand$(echo "$flags" | tr -c 'a-z0-9\n' '_' | sed 's/^_*//')" "$flags"
done

echo "== two processes through the launcher (XLA_FLAGS='${LAUNCH_FLAGS:-}')"
XLA_FLAGS=${LAUNCH_FLAGS:-} timeout -k 10 "$LIMIT" python3 -m jaxllm.launch --nproc-per-node 2 --one-gpu-per-process \
    $SCRIPT "$OUT/mp_launcher.json" $MODEL > /tmp/mp_launcher.log 2>&1
echo "   exit $?"; tail -4 /tmp/mp_launcher.log

python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
ref = json.loads((out / "mp_single.json").read_text()) if (out / "mp_single.json").exists() else None
for f in sorted(out.glob("mp_*.json")):
    r = json.loads(f.read_text())
    same = ref is not None and all(r[k] == ref[k] for k in ("tokens", "streamed", "async"))
    print(f"{f.stem}: {r['processes']} process(es), {r['devices']} device(s), stats {r['stats']}, "
          f"tokens, streamed and async {'equal to' if same else 'DIFFERENT from'} one GPU's")
EOF
