"""Probe (one call): per-shape trace/lower/compile/serialize/deserialize times for the 8B shape,
parallel compile wall time, and the cost of the sampling pieces on the card."""
import json, os, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import jax, jax.numpy as jnp, numpy as np
from jax.experimental.serialize_executable import serialize, deserialize_and_load

OUT = Path(os.environ.get("OUT", "/tmp"))
res = {"device": str(jax.devices()[0].device_kind)}
CFG = Path(__file__).parent / "configs" / (sys.argv[1] if len(sys.argv) > 1 else "llama-3.1-8b")

def sampling_costs():
    from jaxllm.layers import sampling as S
    rows = []
    V = 128256
    for B in (2, 64, 512):
        logits = jax.random.normal(jax.random.key(0), (B, V), jnp.float32)
        def batch(trunc, k):
            return S.SamplingBatch(temperature=jnp.full((B,), 0.7), top_k=jnp.zeros((B,), jnp.int32), top_p=jnp.full((B,), 0.9),
                min_p=jnp.zeros((B,)), seeds=jnp.zeros((B, 2), jnp.uint32), counters=jnp.zeros((B,), jnp.int32),
                logit_bias=None, penalty_tokens=None, penalty_counts=None, repetition_penalty=None, presence_penalty=None,
                frequency_penalty=None, banned_tokens=None, num_logprobs=k, truncate=trunc, penalize=False)
        for name, trunc, k in (("plain", False, 0), ("logprobs20", False, 20), ("truncate", True, 0), ("full", True, 20)):
            s = batch(trunc, k)
            f = jax.jit(S.sample)
            jax.block_until_ready(f(logits, s))
            t = time.perf_counter()
            for _ in range(20):
                out = f(logits, s)
            jax.block_until_ready(out)
            rows.append({"B": B, "variant": name, "ms": (time.perf_counter() - t) / 20 * 1e3})
            print(rows[-1], flush=True)
    return rows

def main():
    res["sampling"] = sampling_costs()
    from jaxllm import LLM
    from jaxllm.engine.runner import StepShape
    t = time.perf_counter()
    llm = LLM(model=str(CFG), load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
              max_batch_size=512, max_num_tokens=8192, max_seq_len=8192)
    res["llm_s"] = time.perf_counter() - t
    r = llm._engine.runner
    P = r.page_buckets[0]
    shapes = [StepShape(2, 2, P, 1), StepShape(512, 512, P, 1), StepShape(2, 2, P, 1, decode_steps=8),
              StepShape(512, 512, P, 1, decode_steps=8), StepShape(8192, 512, P, 8192), StepShape(16, 16, P, 16)]
    per = []
    for shape in shapes:
        t0 = time.perf_counter()
        tr = r._step.trace(r.params, r.kv_cache, *r.abstract_inputs(shape), logits_mode=shape.logits_mode,
                           decode_steps=shape.decode_steps)
        t1 = time.perf_counter(); lo = tr.lower(); t2 = time.perf_counter(); exe = lo.compile(); t3 = time.perf_counter()
        payload, it, ot = serialize(exe); t4 = time.perf_counter()
        deserialize_and_load(payload, it, ot); t5 = time.perf_counter()
        per.append({"shape": [shape.num_tokens, shape.num_seqs, shape.max_query_len, shape.decode_steps],
                    "trace": t1 - t0, "lower": t2 - t1, "compile": t3 - t2, "serialize": t4 - t3,
                    "deserialize": t5 - t4, "bytes": len(payload)})
        print(per[-1], flush=True)
    res["per_shape"] = per
    for threads in (8, 16):
        todo = [StepShape(b, b, P, 1, decode_steps=k) for b in (4, 8, 16, 32, 64, 128, 256) for k in (1, 8)]
        todo = [s for s in todo if s not in r.executables]
        r.executables.clear()
        t = time.perf_counter()
        r._compile_many(todo, progress=False, threads=threads)
        res[f"parallel_{threads}"] = {"shapes": len(todo), "wall_s": time.perf_counter() - t}
        print(threads, res[f"parallel_{threads}"], flush=True)
    (OUT / "probe_compile.json").write_text(json.dumps(res, indent=2))
    llm.shutdown()

main()
