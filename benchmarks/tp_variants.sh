#!/usr/bin/env bash
# Batch-1 decode at TP=2 and TP=1 under variants that each need their own process (XLA flags are read
# once per process), most informative first, then one table. Every variant writes its JSON under
# $OUT as it goes, so a call stopped at its time limit keeps what it measured.
#
#   PYTHONPATH=$PWD bash benchmarks/tp_variants.sh [rows|processes|graphs|streams|kernels|update|overlap|launch|final|next|gemms|overlaptest|nccl|merge|floor]   # on the GPU machine (2 GPUs), OUT set
#
# Since the runner compiles small multi-step decodes under TP as one CUDA graph by default
# (RunnerConfig.one_graph_decode), the sets before `final` measure TP=2 with it unless a variant passes
# --one-graph off; their recorded results (benchmarks/archive/RESULTS-2026-11.md) are from before it.
#
# Sets of variants (the name is the result file's tag):
#   rows (default)
#     rows1        one-row batch-1 decode steps (the engine before GPU_MIN_DECODE_ROWS)
#     rows2        decode steps padded to two rows (the engine's smallest decode bucket on GPUs): with one
#                  row XLA on the GPU turns a product with a weight under 10M elements into a multiply and
#                  a reduction, which is what each GPU's half of the 4096 x 4096 projections is at TP=2
#     rows2_ck     rows2 with XLA's own all-reduce kernels (--xla_gpu_experimental_use_collective_kernels)
#     ceiling_*    benchmarks/tp_ceiling.py, the plain-XLA layer stack with two rows
#   processes
#     one_process    TP=2 from one process driving both GPUs
#     two_processes  TP=2 from two processes, one GPU each (python -m jaxllm.launch --one-gpu-per-process)
#     ceiling_rows2_compute  the plain-XLA stack with two rows, with and without its all-reduces
#   graphs (TP=2 only): a TP=2 step runs as ~150 CUDA graphs, split at each all-reduce (XLA's one-shot
#   all-reduce kernels stay outside its command buffers), and the GPU idles ~17% of the step between them
#     graphs_default     XLA's defaults
#     graphs_ck_in       collectives allowed in command buffers, graphs of any size
#     graphs_nccl        NCCL all-reduces instead of XLA's collective kernels
#     graphs_nccl_in     NCCL all-reduces inside the command buffers: the whole step one graph
#   streams (TP=2 only): the all-reduces run on a stream of their own, with 3-4 us of idle before and after
#   each (two per layer); synchronous all-reduces run on the compute stream
#     streams_default    XLA's defaults
#     streams_sync       --xla_gpu_disable_async_collectives=ALLREDUCE
#     streams_sync_in    the same, collectives allowed in command buffers of any size
#     streams_nccl_sync  NCCL's all-reduce, synchronous
#     then a profile of streams_sync (trace_tp2_summary.txt under OUT)
#   kernels: the Pallas K/V write and the one-pass split merge (kernels_new, the engine's way) against
#     XLA's two scatters and the jnp merge (kernels_old); the kernel tests compiled on the GPU first;
#     then all-reduces synchronous, NCCL's, inside command buffers (onegraph, TP=2) and a profile of
#     kernels_new at TP=2 (trace_tp2_summary.txt under OUT)
#   update: XLA updates a command buffer's nodes whenever the addresses it was recorded with change (every
#     dispatch: the step's inputs are new buffers); the trace shows 2.4 ms (6 ms as one graph) from the
#     inputs' arrival to the first kernel of a TP=2 dispatch. Stable addresses through VMM remapping:
#     update_default, update_skip (--xla_gpu_command_buffer_update_mode=SKIP_PROFILED), and
#     update_skip_onegraph (TP=2, with the onegraph flags of the kernels set)
#   overlap: the overlap scheduler (the engine's default: the next 8-step decode dispatched before this
#     one is read) against none (--no-overlap); every variant also saves the wall-clock ms/token
#     (..._wall_ms_per_token_...), which counts the host gaps between dispatches the iteration
#     median does not; then overlap_onegraph (TP=2, the onegraph flags: the graph update of each
#     dispatch could hide behind the one running) and a profile of overlap_on at TP=2
#   launch: a TP=2 step is host-bound: per all-reduce the host spends ~65 us launching (the collective's
#     two thunks ~33 us, the next command buffer ~32 us), 4.2 ms a step against 3.1 ms of GPU work (the
#     overlap set's worse wall time was a first-use compile, since removed). Variants: command buffers off
#     (nocb, with and without the overlap scheduler), 32 decodes per dispatch (steps32, default flags)
#     and the whole dispatch one CUDA graph with 32 decodes per dispatch (onegraph_steps32), 128 tokens
#   final: the engine's defaults (overlap scheduler, one-graph small decodes under TP: final) against
#     neither (before), the overlap scheduler alone (overlap_only, TP=2) and the defaults with 32 decodes
#     per dispatch (final_steps32); greedy tokens of the timed prompt compared with before's (across
#     processes, so near-ties of random weights may part them: `gpu_tp.py --check-tokens` compares in one)
#   next: the overlap scheduler's engine test three times on the GPUs (2026-11-28: it failed 2 of 2 while it
#     compared log-probabilities rounded to 5 decimals, then passed 3 of 3 comparing them within 1e-4), then
#     TP=2 from two processes with NCCL's all-reduces (the hang of two processes was XLA's sharded autotuning,
#     since turned off by jaxllm.distributed: benchmarks/gpu_multiprocess.sh)
#   gemms: a TP=2 step's GEMMs stream their weights at 3.6 TB/s (TP=1's at 4.1): XLA's Triton GEMMs (its
#     defaults: gemms_default) against cuBLAS's (gemms_cublas); this XLA has no flag to keep split-K out
#     of its GEMM autotuning (a split-K GEMM adds a reduction kernel)
#   overlaptest: the overlap scheduler's engine test three times on the GPUs (as in `next`)
#   nccl: TP=2 with NCCL's protocol, algorithm or channel count set by its environment variables (TP=2
#     only, against nccl_default with both sizes; NCCL_NVLS_ENABLE=0 stays as the machine sets it)
#   merge: the decode attention's splits merged by the Pallas kernel (merge_kernel, the engine's way)
#   or by the plain-jnp merge, which XLA compiles to four small kernels (merge_jnp)
#   floor: what the 0.6x target asks of any engine on these GPUs: the engine (floor_engine) beside the
#     plain-XLA layer stack with the engine's kernels' layout (tp_ceiling.py --layout merged, two rows:
#     norms, the projections, the all-reduces, no attention, KV cache, sampling or host) under XLA's
#     defaults with one GEMM reading a token's weights at TP=1 and at TP=2 (floor_default, --stream), and
#     with the engine's one-graph options at TP=2 (floor_onegraph)
set -u
OUT=${OUT:-benchmarks/results}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
HERE=$(cd "$(dirname "$0")" && pwd)
CK="--xla_gpu_experimental_use_collective_kernels=ALL_REDUCE"
NO_CK="--xla_gpu_experimental_use_collective_kernels="
IN_GRAPHS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,COLLECTIVES,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"
SYNC="--xla_gpu_disable_async_collectives=ALLREDUCE"
ONEGRAPH="$SYNC $NO_CK $IN_GRAPHS"  # the whole step one CUDA graph
SKIP="--xla_gpu_command_buffer_update_mode=SKIP_PROFILED"

engine() {  # tag, extra args...; XLA_FLAGS from the environment
    local tag=$1; shift
    echo "== engine $tag (XLA_FLAGS='${XLA_FLAGS:-}')"
    timeout -k 10 200 python3 "$HERE/gpu_tp.py" --out "$OUT" --batch1-only "$tag" "$@" 2>&1 | grep -E "^\[|Error|error" | tail -8
}
ceiling() {  # tag, args...
    local tag=$1; shift
    echo "== ceiling $tag (XLA_FLAGS='${XLA_FLAGS:-}')"
    timeout -k 10 200 python3 "$HERE/tp_ceiling.py" --out "$OUT" --tag "$tag" --skip-two-processes "$@" 2>&1 | tail -14
}

case ${1:-rows} in
rows)
    XLA_FLAGS= engine rows2 --min-decode-rows 2
    XLA_FLAGS= engine rows1 --min-decode-rows 1
    XLA_FLAGS=$CK engine rows2_ck --min-decode-rows 2
    XLA_FLAGS= ceiling rows2 --rows 2 --skip-no-collective --layout all
    XLA_FLAGS=$CK ceiling rows2_ck --rows 2 --skip-no-collective --layout separate
    ;;
processes)
    XLA_FLAGS= engine one_process --tp-sizes 2
    echo "== engine two_processes"
    # Unfiltered tail: if it runs out of time, the last lines say where (build, compile, decode).
    XLA_FLAGS= timeout -k 10 300 python3 -m jaxllm.launch --nproc-per-node 2 --one-gpu-per-process "$HERE/gpu_tp.py" \
        --out "$OUT" --batch1-only two_processes --tp-sizes 2 2>&1 | tail -15
    XLA_FLAGS= ceiling rows2_compute --rows 2 --layout separate
    ;;
graphs)
    XLA_FLAGS= engine graphs_default --tp-sizes 2
    XLA_FLAGS=$IN_GRAPHS engine graphs_ck_in --tp-sizes 2
    XLA_FLAGS=$NO_CK engine graphs_nccl --tp-sizes 2
    XLA_FLAGS="$NO_CK $IN_GRAPHS" engine graphs_nccl_in --tp-sizes 2
    ;;
streams)
    XLA_FLAGS= engine streams_default --tp-sizes 2
    XLA_FLAGS=$SYNC engine streams_sync --tp-sizes 2
    XLA_FLAGS="$SYNC $IN_GRAPHS" engine streams_sync_in --tp-sizes 2
    XLA_FLAGS="$SYNC $NO_CK" engine streams_nccl_sync --tp-sizes 2
    echo "== profile streams_sync"
    XLA_FLAGS=$SYNC timeout -k 10 200 python3 "$HERE/gpu_tp.py" --out "$OUT" --profile --tp-sizes 2 2>&1 | tail -45
    ;;
kernels)
    echo "== kernel tests on the GPU"
    timeout -k 10 240 python3 -m pytest -q -p no:cacheprovider tests/test_pallas_kv_write.py tests/test_pallas_decode.py 2>&1 | tail -4
    XLA_FLAGS= engine kernels_new
    XLA_FLAGS= engine kernels_old --xla-kv-write --jnp-split-merge
    XLA_FLAGS=$ONEGRAPH engine onegraph --tp-sizes 2
    echo "== profile kernels_new"
    XLA_FLAGS= timeout -k 10 200 python3 "$HERE/gpu_tp.py" --out "$OUT" --profile --tp-sizes 2 2>&1 | head -32
    ;;
update)
    XLA_FLAGS=$SKIP engine update_skip
    XLA_FLAGS= engine update_default
    XLA_FLAGS="$SKIP $ONEGRAPH" engine update_skip_onegraph --tp-sizes 2
    ;;
overlap)
    XLA_FLAGS= engine overlap_on
    XLA_FLAGS= engine overlap_off --no-overlap
    XLA_FLAGS=$ONEGRAPH engine overlap_onegraph --tp-sizes 2
    echo "== profile overlap_on (a prefill and three 8-step decodes, two of them follow-ons)"
    XLA_FLAGS= timeout -k 10 200 python3 "$HERE/gpu_tp.py" --out "$OUT" --profile --tp-sizes 2 --profile-tokens 25 2>&1 | head -40
    ;;
launch)
    NOCB="--xla_gpu_enable_command_buffer="
    XLA_FLAGS=$NOCB engine nocb_overlap
    XLA_FLAGS=$NOCB engine nocb --no-overlap
    XLA_FLAGS= engine steps32 --no-overlap --decode-steps 32 --decode-tokens 128
    XLA_FLAGS=$ONEGRAPH engine onegraph_steps32 --no-overlap --decode-steps 32 --decode-tokens 128
    ;;
final)
    XLA_FLAGS= engine final
    XLA_FLAGS= engine before --no-overlap --one-graph off
    XLA_FLAGS= engine overlap_only --one-graph off --tp-sizes 2
    XLA_FLAGS= engine final_steps32 --decode-steps 32 --decode-tokens 128
    python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
runs = {f.stem[7:]: json.loads(f.read_text()) for f in Path(sys.argv[1]).glob("gpu_tp_*.json")}
for tp in (1, 2):
    key = f"llama8b_tp{tp}_batch1_greedy_tokens"
    ref = runs.get("before", {}).get(key)
    for name, r in sorted(runs.items()):
        if key in r and ref:
            same = next((i for i, (a, b) in enumerate(zip(ref, r[key])) if a != b), len(ref))
            print(f"TP={tp} {name}: greedy tokens identical to 'before' for the first {same} of {len(ref)}")
EOF
    ;;
next|overlaptest)
    T=tests/test_multistep.py::test_overlap_scheduler_gives_the_same_outputs_and_runs_ahead
    for i in 1 2 3; do  # one process each (pytest runs a repeated test id once)
        echo "== $T, run $i"
        JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout -k 10 160 \
            python3 -m pytest -q -p no:cacheprovider -W ignore $T 2>&1 | tail -1
    done
    if [ "$1" = next ]; then
        echo "== engine two_processes_nccl"
        XLA_FLAGS=$NO_CK timeout -k 10 300 python3 -m jaxllm.launch --nproc-per-node 2 --one-gpu-per-process \
            "$HERE/gpu_tp.py" --out "$OUT" --batch1-only two_processes_nccl --tp-sizes 2 2>&1 | tail -15
    fi
    ;;
gemms)
    XLA_FLAGS= engine gemms_default
    XLA_FLAGS=--xla_gpu_enable_triton_gemm=false engine gemms_cublas
    ;;
nccl)
    XLA_FLAGS= engine nccl_default
    for v in "protoll NCCL_PROTO=LL" "protosimple NCCL_PROTO=Simple" "algotree NCCL_ALGO=Tree" \
             "min_nchannels1_max_nchannels1 NCCL_MIN_NCHANNELS=1 NCCL_MAX_NCHANNELS=1"; do
        read -r tag vars <<< "$v"
        (export $vars; echo "   with $vars"; XLA_FLAGS= engine "nccl_$tag" --tp-sizes 2)
    done
    ;;
merge)
    XLA_FLAGS= engine merge_kernel
    XLA_FLAGS= engine merge_jnp --jnp-split-merge
    ;;
floor)
    XLA_FLAGS= engine floor_engine
    XLA_FLAGS= ceiling floor_default --rows 2 --layout merged --stream
    XLA_FLAGS= ceiling floor_onegraph --rows 2 --layout merged --one-graph
    ;;
*) echo "unknown set $1 (allowed: rows, processes, graphs, streams, kernels, update, overlap, launch, final, next, gemms, overlaptest, nccl, merge, floor)"; exit 2 ;;
esac

python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print("\n== batch-1 decode, Llama-3.1-8B shape, bf16, ms/token ==")
print(f"{'variant':14s} {'steps':>5s} {'TP=1':>8s} {'TP=2':>8s} {'TP2/TP1':>8s}")
for f in sorted(out.glob("gpu_tp_*.json")):
    r = json.loads(f.read_text())
    for kind, steps in ((kind, steps) for kind in ("", "wall_") for steps in (1, 8, 16, 32)):
        k = f"batch1decode_{kind}ms_per_token_steps{steps}"
        t1, t2 = r.get(f"llama8b_tp1_{k}"), r.get(f"llama8b_tp2_{k}")
        if t1 or t2:
            cell = lambda v: f"{v:8.3f}" if v else f"{'':8s}"  # noqa: E731
            ratio = f"{t2 / t1:8.2f}" if t1 and t2 else ""
            print(f"{f.stem[7:] + (' wall' if kind else ''):14s} {steps:5d} {cell(t1)} {cell(t2)} {ratio}")
for f in sorted(out.glob("tp_ceiling_*.json")):
    r = json.loads(f.read_text())
    print(f"{f.stem}: {r['devices']} x {r['device']}, rows {r['rows']}, flags '{r['xla_flags']}':",
          {k: round(v, 3) for k, v in r["ms_per_token"].items()})
EOF
