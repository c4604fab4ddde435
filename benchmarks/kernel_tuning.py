"""Sweep the Pallas kernels' tiling on one GPU, to choose and re-check their defaults.

Decode: keys per step (pages_per_block * page_size) x programs aimed for (which sets num_splits),
then num_warps x num_stages for the best of those. Prefill: query-tile rows x keys per step x
num_warps x num_stages. Each line: the setting, median time per call, and TB/s or TFLOP/s; the
best per configuration is marked, and the defaults' time is printed beside it.

  PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python benchmarks/kernel_tuning.py [--decode-only | --prefill-only]
      [--decode-configs mix]      # the ShareGPT-like mix's decodes instead (MIX_DECODE_CONFIGS)
      [--decode-configs 1024:512:32,32:1536:32]      # batch:context:page_size, any
      [--prefill-configs 2048:32]  # tokens:page_size of one causal prompt, any
      [--split-targets 264,1056]  # only the automatic split count under each TARGET_PROGRAMS
      [--kv-dtype fp8]            # decode over a float8 cache (its bytes, as the engine stores it)
      [--settings 1:2:2,2:2:3]    # decode: only these pages_per_block:num_warps:num_stages, one split
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from common import SCALE, Heads, decode_case, free_device, make_pages, prefill_batch_metadata, time_calls
from jaxllm.layers.attention import FP8_KV, as_kv_values, kv_storage_dtype, to_kv_dtype
from pallas_kernels import paged_decode_attention, paged_decode_attention_reference, ragged_paged_attention
from pallas_kernels.paged_decode_attention import default_launch, default_num_splits

DECODE_CONFIGS = [  # (batch, context, page_size)
    (1, 32768, 16), (1, 8192, 64), (8, 8192, 16), (64, 2048, 16), (64, 32768, 64), (256, 2048, 64),
]
# The 1,000-request ShareGPT-like mix's decodes at the engine's default 2,048 sequences (page 32 on
# the H200): wide batches of short contexts early, a narrow tail of long ones (RESULTS.md, 2026-12-05).
MIX_DECODE_CONFIGS = [(1024, 512, 32), (512, 768, 32), (128, 1024, 32), (32, 1536, 32)]
PREFILL_CONFIGS = [(2048, 64), (8192, 64), (2048, 16)]  # (tokens, page_size)
CALLS, REPEATS = 4, 5


def decode_cases(configs, kv_dtype="bfloat16"):
    """For each (batch, context, page_size): (it, the heads, CALLS argument sets of
    paged_decode_attention over one cache of `kv_dtype` (bfloat16, or fp8 held as its bytes, as
    the engine holds it: layers/attention.py kv_storage_dtype), the K/V bytes a call reads); the
    device is freed after each."""
    setup = Heads()
    rng = np.random.default_rng(0)
    for batch, context, page_size in configs:
        k_pages, v_pages, tables, seq_lens = decode_case(rng, setup, batch, context, page_size, jnp.bfloat16, copies=2)
        if kv_dtype == "fp8":
            storage = kv_storage_dtype(FP8_KV)
            k_pages, v_pages = to_kv_dtype(k_pages, storage), to_kv_dtype(v_pages, storage)
        itemsize = k_pages.dtype.itemsize
        qs = jax.random.normal(jax.random.key(0), (CALLS, batch, setup.num_heads, setup.head_dim), jnp.bfloat16)
        arg_sets = [(qs[i], k_pages, v_pages, tables[i % 2], seq_lens) for i in range(CALLS)]
        kv_bytes = 2 * batch * context * setup.num_kv_heads * setup.head_dim * itemsize
        yield (batch, context, page_size), setup, arg_sets, kv_bytes
        free_device()  # every array of this configuration, the callers' closures' included


def tune_decode(log, configs=DECODE_CONFIGS, kv_dtype="bfloat16", settings=None):
    """The sweep below for each configuration; with `settings` ([(pages_per_block, num_warps,
    num_stages)], one split) only those beside the default."""
    for (batch, context, page_size), setup, arg_sets, kv_bytes in decode_cases(configs, kv_dtype):
        pages_per_seq = context // page_size

        def measure(**kw):
            fn = lambda q, kp, vp, t, lens: paged_decode_attention(q, kp, vp, t, lens, scale=SCALE, **kw)  # noqa: E731
            try:
                return time_calls(fn, arg_sets, REPEATS)[0]
            except Exception as e:
                log(f"    {kw} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                return float("inf")

        log(f"decode batch {batch} context {context} page {page_size} cache {kv_dtype}")
        default = measure()
        log(f"    default {default * 1e6:9.1f} us {kv_bytes / default / 1e12:5.2f} TB/s")
        for ppb, warps, stages in settings or ():
            t = measure(pages_per_block=ppb, num_splits=1, num_warps=warps, num_stages=stages)
            log(f"    pages/block {ppb:3} splits    1 warps {warps} stages {stages}  {t * 1e6:9.1f} us "
                f"{kv_bytes / t / 1e12:5.2f} TB/s{'  <- faster than the default' if t < default else ''}")
        if settings:
            continue
        results = {}
        for keys, programs in itertools.product((32, 64, 128, 256), (264, 528, 1056, 2112)):
            ppb = max(1, keys // page_size)
            splits = default_num_splits(batch, setup.num_kv_heads, pages_per_seq, ppb, target_programs=programs)
            key = (ppb, splits)
            if key not in results:
                results[key] = measure(pages_per_block=ppb, num_splits=splits)
                log(f"    pages/block {ppb:3} splits {splits:4}  {results[key] * 1e6:9.1f} us "
                    f"{kv_bytes / results[key] / 1e12:5.2f} TB/s")
        (ppb, splits), best = min(results.items(), key=lambda kv: kv[1])
        for warps, stages in itertools.product((2, 4, 8), (1, 2, 3)):
            t = measure(pages_per_block=ppb, num_splits=splits, num_warps=warps, num_stages=stages)
            log(f"    pages/block {ppb:3} splits {splits:4} warps {warps} stages {stages}  {t * 1e6:9.1f} us "
                f"{kv_bytes / t / 1e12:5.2f} TB/s{'  <- best' if t < best else ''}")
            best = min(best, t)


def compare_split_targets(log, configs, targets, kv_dtype="bfloat16"):
    """The automatic split count (`default_num_splits`) under each TARGET_PROGRAMS of `targets`, at
    the default tiling: the choice that sets how many splits a narrow batch of long contexts gets."""
    for (batch, context, page_size), setup, arg_sets, kv_bytes in decode_cases(configs, kv_dtype):
        q, k_pages = arg_sets[0][:2]
        ppb = default_launch(batch, setup.num_kv_heads, page_size, setup.head_dim, k_pages.dtype, q.dtype)[0]
        line = f"decode batch {batch:5} context {context:6} page {page_size:3}:"
        for target in targets:
            splits = default_num_splits(batch, setup.num_kv_heads, context // page_size, ppb, target_programs=target)
            fn = functools.partial(paged_decode_attention, scale=SCALE, num_splits=splits)
            t, out = time_calls(fn, arg_sets, REPEATS)
            line += f"  target {target}: {splits:3} splits {t * 1e6:8.1f} us {kv_bytes / t / 1e12:5.2f} TB/s"
        # The first call's output against the float32 reference (a float8 cache read as its values).
        _, _, v_pages, tables, seq_lens = arg_sets[0]
        ref = paged_decode_attention_reference(q, as_kv_values(k_pages), as_kv_values(v_pages), tables, seq_lens,
                                               scale=SCALE)  # fmt: skip
        line += f"  max |error| {float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)))):.2e}"
        log(line)


def tune_prefill(log, configs=PREFILL_CONFIGS):
    setup = Heads()
    rng = np.random.default_rng(1)
    group = setup.num_heads // setup.num_kv_heads
    for num_tokens, page_size in configs:
        pages_per_seq = num_tokens // page_size
        k_pages, v_pages = make_pages(rng, 1 + pages_per_seq, page_size, setup, jnp.bfloat16)
        tables = jnp.asarray(rng.permutation(np.arange(1, 1 + pages_per_seq)).astype(np.int32))[None, :]
        batch = prefill_batch_metadata(num_tokens, tables)
        q = jax.random.normal(jax.random.key(1), (num_tokens, setup.num_heads, setup.head_dim), jnp.bfloat16)
        arg_sets = [(q * (1 + 0.01 * i),) for i in range(CALLS)]
        flops = 2 * num_tokens**2 * setup.num_heads * setup.head_dim

        def measure(**kw):
            def fn(q):
                return ragged_paged_attention(q, k_pages, v_pages, batch.query_start, batch.seq_lens,
                                              batch.block_tables, max_query_len=num_tokens, scale=SCALE, **kw)
            try:
                return time_calls(fn, arg_sets, REPEATS)[0]
            except Exception as e:
                log(f"    {kw} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                return float("inf")

        log(f"prefill tokens {num_tokens} page {page_size}")
        default = measure()
        log(f"    default {default * 1e6:9.1f} us {flops / default / 1e12:6.1f} TFLOP/s")
        best = float("inf")
        for rows, keys, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8), (1, 2, 3)):
            ppb = max(1, keys // page_size)
            t = measure(block_q=rows // group, pages_per_block=ppb, num_warps=warps, num_stages=stages)
            log(f"    rows {rows:3} keys {ppb * page_size:3} warps {warps} stages {stages}  {t * 1e6:9.1f} us "
                f"{flops / t / 1e12:6.1f} TFLOP/s{'  <- best' if t < best else ''}")
            best = min(best, t)
        free_device()  # every array of this configuration, the closures' included


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode-only", action="store_true")
    parser.add_argument("--prefill-only", action="store_true")
    parser.add_argument("--decode-configs", default=None, metavar="mix | B:CTX:PAGE,...",
                        help="the decode shapes to sweep (default: DECODE_CONFIGS)")
    parser.add_argument("--prefill-configs", default=None, metavar="TOKENS:PAGE,...",
                        help="the prefill shapes to sweep (default: PREFILL_CONFIGS)")
    parser.add_argument("--split-targets", default=None, metavar="264,1056",
                        help="only compare the automatic split count under these TARGET_PROGRAMS")
    parser.add_argument("--kv-dtype", choices=("bfloat16", "fp8"), default="bfloat16",
                        help="the decode sweeps' cache (fp8: float8 E4M3 held as its bytes, as in the engine)")
    parser.add_argument("--settings", default=None, metavar="PPB:WARPS:STAGES,...",
                        help="decode: only these tilings (one split) beside the default, not the sweep")
    args = parser.parse_args(argv)
    decode_configs = DECODE_CONFIGS
    if args.decode_configs == "mix":
        decode_configs = MIX_DECODE_CONFIGS
    elif args.decode_configs:
        decode_configs = [tuple(int(v) for v in c.split(":")) for c in args.decode_configs.split(",")]

    def log(line):
        print(line, flush=True)

    log(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    if args.split_targets:
        compare_split_targets(log, decode_configs, [int(t) for t in args.split_targets.split(",")], args.kv_dtype)
        return 0
    if not args.prefill_only:
        settings = [tuple(int(v) for v in c.split(":")) for c in args.settings.split(",")] if args.settings else None
        tune_decode(log, decode_configs, args.kv_dtype, settings)
    if not args.decode_only:
        prefill_configs = PREFILL_CONFIGS
        if args.prefill_configs:
            prefill_configs = [tuple(int(v) for v in c.split(":")) for c in args.prefill_configs.split(",")]
        tune_prefill(log, prefill_configs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
