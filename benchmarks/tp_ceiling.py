"""What plain XLA gives for a batch-1 decode token at TP=1 and TP=2, without the engine: the
Llama-3.1-8B layer stack (RMSNorm, Q/K/V, O, gate/up, down; no attention, no KV cache), layers
unrolled, 8 tokens per dispatch in a `lax.scan` (greedy: each token's embedding feeds the next).
It bounds what the engine can reach at TP=2 and separates the costs:

  tp1                one GPU
  tp2                weights split column/row-wise (jax.sharding), XLA inserts the all-reduces
  tp2_no_collective  the same local matmuls in shard_map with no all-reduce (wrong sums; the
                     compute and launch cost alone)
  tp2_two_processes  tp2 with one process per GPU (jax.distributed over localhost)
  *_merged           Q/K/V as one weight and gate/up as one (fewer, larger GEMMs)
  *_concat           separate weights (the engine's layout) concatenated into the merged ones inside
                     the jitted step: does XLA fuse the concatenation into the GEMM, or copy it?
  --one-graph        the TP=2 rows compiled with the engine's one-CUDA-graph options (ONE_GRAPH_OPTIONS
                     in jaxllm/engine/runner.py, which its small TP decodes use); TP=1 keeps XLA's defaults
                     as the engine's does
  --stream           also one GEMM each that reads a token's weight bytes (Llama-3.1-8B, bf16: every
                     layer's projections and the LM head) at TP=1 and on one GPU of TP=2, two rows:
                     XLA's GEMM at its best streaming rate, the floor of the weight-reading part of a token

    PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python benchmarks/tp_ceiling.py [--out DIR]    # GPUs: needs 2
    PYTHONPATH=$PWD python benchmarks/tp_ceiling.py --smoke           # CPU, 2 virtual devices, tiny
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import default_out, median_ms, parse_result, print_result, write_json

if "--smoke" in sys.argv and "JAXLLM_CEILING_RANK" not in os.environ:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

LLAMA_8B = dict(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336, vocab=128256)
TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=256)
TOKENS = 8  # decodes per dispatch, as num_scheduler_steps' default
LAYOUTS = ("separate", "merged", "concat")


def build(shape: dict, mesh, layout: str, seed: int = 0):
    """Random bf16 weights over `mesh` ("tp" axis; None: one device): Q/K/V and gate/up split by
    KV head and FFN column, O and down by row, the LM head by vocabulary, as the engine's plan."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    D, F, K, d = shape["hidden"], shape["ffn"], shape["kv_heads"], shape["head_dim"]
    G = shape["heads"] // K
    heads, row, rep = P(None, "tp"), P("tp", None), P()
    mats = {"wo": ((K * G * d, D), row), "w_down": ((F, D), row), "attn_norm": ((D,), rep), "mlp_norm": ((D,), rep)}
    if layout == "merged":  # per KV head: its G query heads, then K, then V; gate and up side by side per column
        mats |= {"w_qkv": ((D, K, G + 2, d), heads), "w_gate_up": ((D, F, 2), heads)}
    else:
        mats |= {"wq": ((D, K, G, d), heads), "wk": ((D, K, d), heads), "wv": ((D, K, d), heads),
                 "w_gate": ((D, F), heads), "w_up": ((D, F), heads)}  # fmt: skip

    makers = {}

    def make(key, shp, spec):  # one compiled maker per shape and sharding
        if (shp, spec) not in makers:
            fn = lambda k: (jax.random.normal(k, shp, jnp.float32) * 0.02).astype(jnp.bfloat16)  # noqa: E731
            makers[shp, spec] = jax.jit(fn, out_shardings=NamedSharding(mesh, spec) if mesh else None)
        return makers[shp, spec](key)

    key = jax.random.key(seed)
    layers = []
    for i in range(shape["layers"]):
        keys = jax.random.split(jax.random.fold_in(key, i), len(mats))
        layers.append({n: make(k, shp, spec) for k, (n, (shp, spec)) in zip(keys, mats.items())})
    embed = make(jax.random.fold_in(key, 10_000), (shape["vocab"], D), rep)
    head = make(jax.random.fold_in(key, 10_001), (D, shape["vocab"]), heads)
    return {"layers": layers, "embed": embed, "head": head}


def token_fn(layout: str):
    """params, tokens [1] -> logits [1, V]: one token through the layer stack. Attention is stood in
    for by q * (k + v) per head (local to a KV head's shard, as paged attention is)."""
    import jax
    import jax.numpy as jnp

    def rms(x, w):
        xf = x.astype(jnp.float32)
        return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + 1e-5)).astype(x.dtype) * w

    def layer(lp, x):
        h = rms(x, lp["attn_norm"])
        if layout == "concat":  # per KV head: its G query heads, then K, then V
            w_qkv = jnp.concatenate([lp["wq"], lp["wk"][:, :, None], lp["wv"][:, :, None]], axis=2)
            qkv = jnp.einsum("bd,dkgh->bkgh", h, w_qkv)
            q, k, v = qkv[:, :, :-2], qkv[:, :, -2], qkv[:, :, -1]
        elif layout == "merged":
            qkv = jnp.einsum("bd,dkgh->bkgh", h, lp["w_qkv"])
            q, k, v = qkv[:, :, :-2], qkv[:, :, -2], qkv[:, :, -1]
        else:
            q = jnp.einsum("bd,dkgh->bkgh", h, lp["wq"])
            k, v = jnp.einsum("bd,dkh->bkh", h, lp["wk"]), jnp.einsum("bd,dkh->bkh", h, lp["wv"])
        attn = (q * (k + v)[:, :, None, :]).reshape(x.shape[0], -1)
        x = x + jnp.dot(attn, lp["wo"])
        h = rms(x, lp["mlp_norm"])
        if layout != "separate":
            w = lp["w_gate_up"] if layout == "merged" else jnp.stack([lp["w_gate"], lp["w_up"]], axis=2)
            gu = jnp.einsum("bd,dfg->bfg", h, w)
            gate, up = gu[..., 0], gu[..., 1]
        else:
            gate, up = jnp.dot(h, lp["w_gate"]), jnp.dot(h, lp["w_up"])
        return x + jnp.dot(jax.nn.silu(gate) * up, lp["w_down"])

    def token(params, tok):
        x = params["embed"][tok]
        for lp in params["layers"]:
            x = layer(lp, x)
        return jnp.dot(x, params["head"]).astype(jnp.float32)

    return token


def decode_fn(layout: str, mesh, params=None, collective: bool = True):
    """jit(params, tok [1]) -> the next TOKENS greedy tokens, in one dispatch. Under a mesh with
    `collective`, XLA's partitioner adds the all-reduces of the row-parallel products; without,
    each shard runs its local products only (shard_map over `params`' shardings, no sums: the
    compute alone)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    token = token_fn(layout)
    if mesh is not None and not collective:
        local, specs = token, (jax.tree.map(lambda a: a.sharding.spec, params), P())

        def token(params, tok):
            return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(None, "tp"), check_vma=False)(params, tok)

    def run(params, tok):
        def one(t, _):
            nxt = jnp.argmax(token(params, t), axis=-1).astype(jnp.int32)
            return nxt, nxt

        return jax.lax.scan(one, tok, None, length=TOKENS)[1]

    return jax.jit(run)


def suffix(layout: str) -> str:
    """The result keys' suffix of a weight layout ("tp2" + suffix(...))."""
    return "" if layout == "separate" else "_" + layout


def with_options(fn, params, rows: int, options: dict | None):
    """`fn` compiled with XLA `options` for these params and `rows` tokens (None: `fn` as it is)."""
    import jax.numpy as jnp

    if not options:
        return fn
    return fn.lower(params, jnp.zeros((rows,), jnp.int32)).compile(compiler_options=options)


def time_ms_per_token(fn, params, reps: int, rows: int = 1) -> float:
    import jax.numpy as jnp

    return median_ms(fn, params, jnp.zeros((rows,), jnp.int32), reps=reps) / TOKENS


def single_process(shape: dict, reps: int, layouts: tuple[str, ...], rows: int = 1, no_collective: bool = True,
                   tp2_options: dict | None = None) -> dict:
    import jax
    from jax.sharding import Mesh

    devices = jax.devices()
    out = {}
    for layout in layouts:
        tag = suffix(layout)
        params = build(shape, None, layout)
        out["tp1" + tag] = time_ms_per_token(decode_fn(layout, None), params, reps, rows)
        del params
        if len(devices) >= 2:
            mesh = Mesh(devices[:2], ("tp",))
            params = build(shape, mesh, layout)
            fn = with_options(decode_fn(layout, mesh), params, rows, tp2_options)
            out["tp2" + tag] = time_ms_per_token(fn, params, reps, rows)
            if no_collective:
                fn = with_options(decode_fn(layout, mesh, params, collective=False), params, rows, tp2_options)
                out["tp2_no_collective" + tag] = time_ms_per_token(fn, params, reps, rows)
            del params
        print(json.dumps({k: round(v, 3) for k, v in out.items()}), flush=True)
    return out


def token_weight_columns(shape: dict) -> int:
    """Columns of a [hidden, n] bf16 matrix holding one token's weight reads at TP=1: every layer's
    Q/K/V, O, gate/up and down, and the LM head (the embedding row read is negligible)."""
    F, d = shape["ffn"], shape["head_dim"]
    per_layer = (shape["heads"] + 2 * shape["kv_heads"]) * d + shape["heads"] * d + 2 * F + F  # Q/K/V, O, gate/up, down
    return shape["layers"] * per_layer + shape["vocab"]


def stream(shape: dict, reps: int) -> dict:
    """ms and TB/s of one GEMM, two rows times [hidden, n], reading a token's weights at TP=1 (n =
    token_weight_columns) and one GPU's half at TP=2: XLA's GEMM at its best streaming rate, one
    kernel instead of a token's ~200."""
    import jax
    import jax.numpy as jnp

    out = {}
    n_tp1 = token_weight_columns(shape)
    x = jnp.ones((2, shape["hidden"]), jnp.bfloat16)
    matmul = jax.jit(jnp.dot)
    for name, n in (("stream_tp1", n_tp1), ("stream_tp2_per_gpu", n_tp1 // 2)):
        w = jax.jit(lambda k, n=n: jax.random.normal(k, (shape["hidden"], n), jnp.bfloat16))(jax.random.key(1))
        ms = median_ms(matmul, x, w, reps=reps)
        out[name] = ms
        out[name + "_tb_per_s"] = w.size * 2 / (ms * 1e-3) / 1e12
        del w
    return out


def worker(shape: dict, reps: int, layouts: tuple[str, ...]) -> None:
    """One of two processes (JAXLLM_CEILING_RANK), one GPU each: tp2 over jax.distributed."""
    import jax
    from jax.sharding import Mesh

    rank = int(os.environ["JAXLLM_CEILING_RANK"])
    if os.environ.get("JAXLLM_CEILING_CPU"):
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(os.environ["JAXLLM_CEILING_COORD"], num_processes=2, process_id=rank)
    mesh = Mesh(jax.devices()[:2], ("tp",))
    out = {}
    for layout in layouts:
        params = build(shape, mesh, layout)
        out["tp2_two_processes" + suffix(layout)] = time_ms_per_token(decode_fn(layout, mesh), params, reps)
        del params
    if rank == 0:
        print_result(out)
    jax.distributed.shutdown()


def two_processes(smoke: bool) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, JAXLLM_CEILING_RANK=str(rank), JAXLLM_CEILING_COORD=f"127.0.0.1:{port}")
        if smoke:
            env["JAXLLM_CEILING_CPU"] = "1"
            env["XLA_FLAGS"] = ""
        else:
            env["CUDA_VISIBLE_DEVICES"] = str(rank)
        procs.append(subprocess.Popen([sys.executable, __file__, *sys.argv[1:]], env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    result = parse_result(outs[0])
    if result is None or any(p.returncode for p in procs):
        raise RuntimeError(f"two-process run failed: {outs}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=default_out())
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--skip-two-processes", action="store_true")
    parser.add_argument("--skip-no-collective", action="store_true")
    parser.add_argument("--rows", type=int, default=1, help="tokens decoded side by side (the batch; default 1). "
                        "At 1, XLA on the GPU may turn a small weight's product into a multiply and a reduction")
    parser.add_argument("--one-graph", action="store_true", help="compile the TP=2 rows with the engine's "
                        "one-CUDA-graph options (ONE_GRAPH_OPTIONS)")
    parser.add_argument("--stream", action="store_true", help="also time one GEMM reading a token's weights "
                        "(TP=1, and one GPU's half at TP=2)")
    parser.add_argument("--tag", default="", help="suffix of the result file's name (tp_ceiling_TAG.json)")
    parser.add_argument("--layout", choices=("all", *LAYOUTS), default="all",
                        help="the weight layouts to time (default: all three)")
    args = parser.parse_args()
    shape = TINY if args.smoke else LLAMA_8B
    layouts = LAYOUTS if args.layout == "all" else (args.layout,)
    if "JAXLLM_CEILING_RANK" in os.environ:
        return worker(shape, args.reps, layouts)
    import jax

    from jaxllm.engine.buckets import ONE_GRAPH_OPTIONS

    tp2_options = ONE_GRAPH_OPTIONS if args.one_graph else None
    result = {"date": time.strftime("%Y-%m-%d"), "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
              "tokens_per_dispatch": TOKENS, "rows": args.rows, "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "tp2_compiler_options": tp2_options or {},
              "ms_per_token": single_process(shape, args.reps, layouts, args.rows, not args.skip_no_collective,
                                             tp2_options)}  # fmt: skip
    if args.stream:
        result["stream"] = stream(shape, args.reps)
    if not args.skip_two_processes:
        result["ms_per_token"] |= two_processes(args.smoke)
    out = Path(args.out) / (f"tp_ceiling_{args.tag}.json" if args.tag else "tp_ceiling.json")
    write_json(out, result)
    ms = result["ms_per_token"]
    print(f"\n== plain-XLA layer stack of {'a tiny model' if args.smoke else 'Llama-3.1-8B'}, batch {args.rows}, bf16, "
          f"{TOKENS} tokens per dispatch, {result['devices']} x {result['device']} ==")
    for name, v in ms.items():
        base = ms.get("tp1" + next((suffix(x) for x in LAYOUTS[1:] if name.endswith(suffix(x))), ""))
        print(f"{name:30s} {v:7.3f} ms/token" + (f"   ({v / base:.2f}x tp1)" if base and not name.startswith("tp1") else ""))
    for name, v in result.get("stream", {}).items():
        print(f"{name:30s} {v:7.3f} {'TB/s' if name.endswith('_tb_per_s') else 'ms'}")


if __name__ == "__main__":
    main()
