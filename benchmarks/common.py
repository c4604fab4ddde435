"""What the benchmark scripts share: the card's bandwidth, timing, result recording, synthetic
prompts, engine set-up, and the paged-KV inputs of the kernel benchmarks.

A script run as `python benchmarks/x.py` has benchmarks/ on sys.path, so `from common import ...`
needs nothing more; jaxllm and pallas_kernels come from the environment (`PYTHONPATH=$PWD` in a
checkout). Nothing here imports JAX at module level: scripts set XLA_FLAGS (e.g. virtual CPU devices
for --smoke) before JAX starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"  # config.json files of the model shapes, run with random weights

# ---- the card -------------------------------------------------------------------------------------

HBM_TBS = {"H100": 3.35, "H200": 4.8}  # datasheet HBM bandwidth per GPU, TB/s


def hbm_tbs(device_kind: str) -> float:
    """The datasheet bandwidth of the GPU named `device_kind` (H100 SXM's where it is not known)."""
    return next((tbs for name, tbs in HBM_TBS.items() if name in device_kind), HBM_TBS["H100"])


def device_name() -> str:
    """The first JAX device's kind and platform, e.g. 'NVIDIA H100 80GB HBM3 (gpu)'."""
    import jax

    d = jax.devices()[0]
    return f"{d.device_kind} ({d.platform})"


def software_versions() -> dict:
    """The versions of the installed packages whose names start with "jax" (jax, jaxlib, the CUDA
    plugin and PJRT, jaxllm) and of cuBLAS: what decides how XLA compiles, recorded beside each GPU
    figure."""
    from importlib import metadata

    return {d.metadata["Name"]: d.version for d in metadata.distributions()
            if d.metadata["Name"] and d.metadata["Name"].lower().startswith(("jax", "nvidia-cublas"))}  # fmt: skip


def cpu_machine() -> str:
    """This machine's processor and core count, as the CPU results name it."""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


# ---- timing ---------------------------------------------------------------------------------------


def median_ms(fn, *args, reps: int) -> float:
    """The median wall time of `fn(*args)` to its results' readiness over `reps` calls, after one
    warm-up call, in ms."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def time_calls(fn, arg_sets, repeats):
    """Median seconds per call of fn over arg_sets, all calls in one jitted program, and the
    first call's output. Arrays shared between calls (the KV pages) are passed to the program once.
    """
    import jax

    leaves, index, calls = [], {}, []
    for args in arg_sets:
        for a in args:
            if id(a) not in index:
                index[id(a)] = len(leaves)
                leaves.append(a)
        calls.append(tuple(index[id(a)] for a in args))

    @jax.jit
    def program(leaves):
        return [fn(*(leaves[i] for i in call)) for call in calls]

    first = jax.block_until_ready(program(leaves))[0]  # compile and warm up
    jax.block_until_ready(program(leaves))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(program(leaves))
        times.append((time.perf_counter() - start) / len(arg_sets))
    return statistics.median(times), first


def free_device() -> None:
    """Delete every live array: the next configuration starts with the device's memory free."""
    import jax

    for x in jax.live_arrays():
        x.delete()


def decode_ms_per_token(stats: list[dict]) -> float:
    """Median milliseconds per decoded token of the decode-only iterations of `LLM.get_stats()` (an
    iteration of a multi-step decode runs avgNumDecodedTokensPerIter steps)."""
    decode = [s["iterLatencyMS"] / max(1.0, s["inflightBatchingStats"].get("avgNumDecodedTokensPerIter", 1.0))
              for s in stats if s["inflightBatchingStats"]["numContextRequests"] == 0]  # fmt: skip
    return statistics.median(decode) if decode else float("nan")


# ---- result recording -----------------------------------------------------------------------------


def default_out() -> str:
    """Where results go: $OUT on the GPU machine, else benchmarks/results."""
    return os.environ.get("OUT", "benchmarks/results")


def write_json(path, result, indent: int = 2) -> Path:
    """Write `result` to `path` as JSON, its folder made first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=indent))
    return path


def recorder(file: Path, **header):
    """(result dict, save(key, value)): each figure is written to `file` and printed the moment it
    exists, so a run stopped at its time limit keeps what it measured."""
    result: dict = {"date": time.strftime("%Y-%m-%d"), **header}
    file.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def save(key, value):
        result[key] = value
        result["elapsed_s"] = time.perf_counter() - started
        file.write_text(json.dumps(result, indent=2))
        print(f"[{result['elapsed_s']:6.1f}s] {key} {json.dumps(value)}", flush=True)

    return result, save


def print_result(result: dict) -> None:
    """The one line a parent process (or a reader of the log) takes the result from."""
    print("RESULT " + json.dumps(result), flush=True)


def parse_result(stdout: str) -> dict | None:
    """The last `print_result` line of a child's output, or None."""
    line = next((line for line in reversed(stdout.splitlines()) if line.startswith("RESULT ")), None)
    return None if line is None else json.loads(line[len("RESULT ") :])


# ---- synthetic prompts ----------------------------------------------------------------------------


def synthetic(n: int, length: int, vocab: int, seed: int, margin: int = 10) -> list[list[int]]:
    """n prompts of `length` random token ids in [margin, vocab - margin), seeded
    (`jaxllm.bench.datasets.random_token_prompts`, which `jaxllm bench` uses too)."""
    from jaxllm.bench.datasets import random_token_prompts

    return random_token_prompts(n, length, vocab, seed, margin)


def sharegpt_like(n: int, prompt_mean: float, output_mean: float, sigma: float, max_prompt: int, max_output: int,
                  vocab: int, seed: int = 0):  # fmt: skip
    """n (prompt token ids, output length) pairs with lognormal lengths of the given means
    (`jaxllm.bench.datasets.sharegpt_like`, `jaxllm bench --dataset sharegpt-like`)."""
    from jaxllm.bench import datasets

    return datasets.sharegpt_like(n, prompt_mean, output_mean, sigma, max_prompt, max_output, vocab, seed)


# ---- engine set-up --------------------------------------------------------------------------------

# The engines of the start-up measurements: the model, LLM()'s arguments, and the workloads.
CARDS = {
    "h200": {
        "model": str(CONFIGS / "llama-3.1-8b"),
        # max_batch_size and max_num_tokens: the engine's GPU defaults, TensorRT-LLM's (2,048 and 8,192):
        # the mix ran at 9,824 output tok/s with 512 sequences, 10,798 with 2,048 (RESULTS.md, 2026-12-05)
        "llm": dict(load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True, max_seq_len=4096),
        "fixed": (1024, 128, 128),
        "mix": dict(n=1000, prompt_mean=280, output_mean=220, sigma=0.9, max_prompt=2048, max_output=1024),
    },
    # A 1-layer Llama of hidden size 32 at the H200 card's engine sizes and mix: its device work is
    # negligible, so its steps time the host's work (the scheduler, packing, postprocessing).
    "host": {
        "model": str(CONFIGS / "host-bound-llama"),
        "llm": dict(load_format="dummy", dtype="float32", skip_tokenizer_init=True, max_batch_size=512,
                    max_num_tokens=8192, max_seq_len=4096, kv_cache_config={"max_tokens": 600_000}),  # fmt: skip
        "fixed": (1024, 128, 128),
        "mix": dict(n=1000, prompt_mean=280, output_mean=220, sigma=0.9, max_prompt=2048, max_output=1024),
    },
    "cpu": {
        "model": "smollm2",
        "llm": dict(),
        "fixed": (64, 64, 32),
        "mix": dict(n=48, prompt_mean=60, output_mean=40, sigma=0.8, max_prompt=512, max_output=256),
    },
}


def engine(model: str, tp: int, backend: str | None, args, precompile=(), dtype: str = "bfloat16", devices=None):
    """An engine with random weights from CONFIGS/model, every program made before anything is timed
    (`precompile`, the shapes the callers' workloads visit, is kept for their signatures: LLM() makes
    them all). `args` gives max_batch, max_tokens, max_seq_len, and optionally no_overlap,
    decode_steps, one_graph ("on"/"off") and min_decode_rows."""
    from jaxllm import LLM

    llm = LLM(model=str(CONFIGS / model), load_format="dummy", dtype=dtype, skip_tokenizer_init=True,
              tensor_parallel_size=tp, backend=backend, max_batch_size=args.max_batch, max_num_tokens=args.max_tokens,
              max_seq_len=args.max_seq_len, devices=devices,
              disable_overlap_scheduler=getattr(args, "no_overlap", False),
              num_scheduler_steps=getattr(args, "decode_steps", None) or 8)  # fmt: skip
    runner = llm._engine.runner
    if getattr(args, "one_graph", None):  # the runner's choice, overridden (its programs made again)
        runner.config = dataclasses.replace(runner.config, one_graph_decode=args.one_graph == "on")
        runner.reset_programs()
    if getattr(args, "min_decode_rows", None):  # the engine's smallest decode bucket, overridden
        runner.buckets = dataclasses.replace(runner.buckets, min_decode_rows=args.min_decode_rows)
        runner.reset_programs()
    runner.precompile(progress=False)  # LLM() made every program; these only what an override changed
    return llm


def greedy(llm, prompts, n):
    """Greedy (tokens, logprobs with the top 2) of each prompt."""
    from jaxllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True, logprobs=2), use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def batch1_ms(llm, vocab, n, steps: int, wall: dict | None = None) -> float:
    """Batch-1 decode ms per token, `steps` decodes per dispatch (1: one host round trip a token):
    the median engine iteration per token it decodes. With `wall`, also wall["ms"]: the wall time
    of n tokens less that of one (the prefill), per token after the first, host gaps included."""
    from jaxllm import SamplingParams

    llm._engine.decode_steps = steps
    prompt = synthetic(1, 128, vocab, 1)
    # Warm-up long enough for the overlap scheduler's follow-on dispatches (a first one may compile).
    llm.generate(prompt, SamplingParams(max_tokens=3 * steps + 2, ignore_eos=True), use_tqdm=False)
    for _ in range(2):  # the first may compile the step of a cached prompt's last token
        t0 = time.perf_counter()
        llm.generate(prompt, SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
        first = time.perf_counter() - t0
    llm.get_stats()
    t0 = time.perf_counter()
    llm.generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True), use_tqdm=False)
    total = time.perf_counter() - t0
    ms = decode_ms_per_token(llm.get_stats())
    if wall is not None:
        wall["ms"] = (total - first) * 1e3 / (n - 1)
    llm._engine.decode_steps = llm._engine.runner.config.decode_steps
    return ms


def offline(llm, isl, osl, n, vocab) -> dict:
    """Offline throughput: n requests of isl/osl tokens queued at once, after a warm-up of the same
    shapes; output tokens/s with any compile time that fell inside the run taken out."""
    from jaxllm import SamplingParams

    runner = llm._engine.runner
    prompts = synthetic(n, isl, vocab, isl + osl)
    llm.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)  # the same shapes, warm
    c0, t0 = runner.compile_seconds, time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=osl, ignore_eos=True), use_tqdm=False)
    wall, compiled = time.perf_counter() - t0, runner.compile_seconds - c0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"isl": isl, "osl": osl, "requests": n, "output_tok_s": tokens / (wall - compiled), "wall_s": wall,
            "compile_s_during": compiled}  # fmt: skip


# ---- paged-KV inputs of the kernel benchmarks -----------------------------------------------------

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3.1-8B's attention
SCALE = HEAD_DIM**-0.5


@dataclasses.dataclass(frozen=True)
class Heads:
    """The attention heads the kernel inputs are made for (Llama-3.1-8B's by default)."""

    num_heads: int = NUM_HEADS
    num_kv_heads: int = NUM_KV_HEADS
    head_dim: int = HEAD_DIM


def make_pages(rng, num_pages, page_size, setup, dtype):
    """Random K and V pages [K, P, S, d] (K, d from `setup`'s num_kv_heads and head_dim), generated
    in the target dtype one KV head at a time (a 34 GB cache must not pass through a float32 copy)."""
    import functools

    import jax
    import jax.numpy as jnp

    @functools.partial(jax.jit, static_argnums=0)
    def pages(shape, key):
        keys = jax.random.split(key, shape[0])
        return jnp.stack([jax.random.normal(keys[h], shape[1:], dtype) for h in range(shape[0])])

    shape = (setup.num_kv_heads, num_pages, page_size, setup.head_dim)
    return (pages(shape, jax.random.key(rng.integers(1 << 30))),
            pages(shape, jax.random.key(rng.integers(1 << 30))))


def decode_case(rng, setup, batch, context, page_size, dtype, copies):
    """KV pages for `copies` independent batches of `batch` sequences of `context` tokens.

    Returns pages, per-copy block tables [copies, B, pages_per_seq] (shuffled, disjoint), seq_lens.
    """
    import jax.numpy as jnp
    import numpy as np

    pages_per_seq = context // page_size
    num_pages = 1 + copies * batch * pages_per_seq
    k_pages, v_pages = make_pages(rng, num_pages, page_size, setup, dtype)
    ids = rng.permutation(np.arange(1, num_pages)).astype(np.int32)
    tables = jnp.asarray(ids.reshape(copies, batch, pages_per_seq))
    seq_lens = jnp.full((batch,), context, jnp.int32)
    return k_pages, v_pages, tables, seq_lens


def prefill_batch_metadata(num_tokens, tables):
    """One sequence computing positions 0..T-1 (prefill from an empty cache), as a BatchMetadata."""
    import jax.numpy as jnp

    from jaxllm.layers.batch import BatchMetadata

    return BatchMetadata(
        token_ids=jnp.zeros((num_tokens,), jnp.int32),
        positions=jnp.arange(num_tokens, dtype=jnp.int32),
        slot_mapping=jnp.zeros((num_tokens,), jnp.int32),
        token_seq=jnp.zeros((num_tokens,), jnp.int32),
        query_start=jnp.array([0, num_tokens], jnp.int32),
        seq_lens=jnp.array([num_tokens], jnp.int32),
        block_tables=tables,
        logits_indices=jnp.array([num_tokens - 1], jnp.int32),
        max_query_len=num_tokens,
    )
