"""Paged-attention kernels on one GPU: decode bandwidth and prefill FLOP/s against the alternatives.

Decode (Llama-3.1-8B heads: 32 query / 8 KV heads, d = 128, bfloat16), batch 1/8/64/256 x context
512/2k/8k/32k x page 16/64, compared in one run:
  pallas        pallas_kernels.paged_decode_attention (this repository)
  xla           jaxllm.layers.attention.paged_attention_xla (plain XLA, the engine's fallback)
  jax_paged     jax.experimental.pallas.ops.gpu.paged_attention (JAX's own Triton op, paged)
  jax_dense     jax.experimental.pallas.ops.gpu.decode_attention.gqa on a dense copy of the cache
                (not paged: an upper-bound reference for the same bytes)
Reported: median time per call and achieved TB/s of the K/V bytes the call must read
(seq_len x K x d x 2 bytes, twice for K and V).

Prefill (one causal sequence of 2048 / 8192 tokens, same heads): ragged_paged_attention against
jax.nn.dot_product_attention with implementation='cudnn' and 'xla', in TFLOP/s of 2 T^2 H d (causal).

Before anything is timed, every kernel is checked against its reference in float32 and bfloat16,
and every timed decode configuration checks its first output against paged_attention_xla.

Timing: each measurement jits N calls in one program over N distinct query sets (so XLA cannot
merge them) and over several copies of the KV pages when they are small (so L2 cannot hold them),
waits for the device, and takes the median over repeats of wall time / N.

  PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python benchmarks/kernel_bandwidth.py   # on the GPU; JSON to $OUT
      (about 8 minutes on an H100, most of it compiling; --batches/--contexts/--page-sizes/
      --prefill-lens/--skip-decode/--skip-prefill cut it down)
  PYTHONPATH=$PWD python benchmarks/kernel_bandwidth.py --smoke             # tiny, CPU, interpret mode
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from common import (
    HEAD_DIM,
    NUM_HEADS,
    NUM_KV_HEADS,
    SCALE,
    decode_case,
    free_device,
    make_pages,
    prefill_batch_metadata,
    time_calls,
)
from jaxllm.layers.attention import paged_attention_xla
from jaxllm.layers.batch import BatchMetadata
from pallas_kernels import (
    paged_decode_attention,
    paged_decode_attention_reference,
    ragged_paged_attention,
    ragged_paged_attention_reference,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas.ops.gpu import decode_attention as jax_decode_attention
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged_attention
warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")

L2_BYTES = 50 * 2**20  # H100 SXM
POOL_BUDGET_BYTES = 40 * 2**30  # K+V pages of one configuration, all rotated copies together
DENSE_BUDGET_BYTES = 12 * 2**30  # the dense copy that jax_dense needs
CALLS_PER_PROGRAM = 8
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}  # max |out - ref| / max |ref|


@dataclasses.dataclass(frozen=True)
class Setup:
    interpret: bool
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    page_sizes: tuple[int, ...]
    prefill_lens: tuple[int, ...]
    repeats: int
    num_heads: int = NUM_HEADS
    num_kv_heads: int = NUM_KV_HEADS
    head_dim: int = HEAD_DIM


FULL = Setup(False, (1, 8, 64, 256), (512, 2048, 8192, 32768), (16, 64), (2048, 8192), repeats=10)
SMOKE = Setup(True, (1, 2), (64, 160), (16,), (48,), repeats=2, num_heads=8, num_kv_heads=2, head_dim=64)


# ----------------------------------------------------------------------------- inputs


def decode_batch_metadata(tables, seq_lens) -> BatchMetadata:
    """Decode-step metadata for paged_attention_xla: token b is sequence b's last position."""
    num_seqs = seq_lens.shape[0]
    arange = jnp.arange(num_seqs, dtype=jnp.int32)
    return BatchMetadata(
        token_ids=jnp.zeros((num_seqs,), jnp.int32),
        positions=seq_lens - 1,
        slot_mapping=jnp.zeros((num_seqs,), jnp.int32),
        token_seq=arange,
        query_start=jnp.arange(num_seqs + 1, dtype=jnp.int32),
        seq_lens=seq_lens,
        block_tables=tables,
        logits_indices=arange,
        max_query_len=1,
    )


# ----------------------------------------------------------------------------- implementations


def jax_paged_split(pages_per_seq: int, page_size: int) -> tuple[int, int]:
    """k_splits (its default 16 where it divides the table) and pages_per_compute_block (its
    default 8, capped at 128 keys so a float32 block fits shared memory) for JAX's paged_attention."""
    k_splits = math.gcd(pages_per_seq, 16)
    per_split = pages_per_seq // k_splits
    return k_splits, math.gcd(per_split, max(1, min(8, 128 // page_size)))


def decode_impls(setup, page_size, pages_per_seq):
    interpret = setup.interpret
    k_splits, per_block = jax_paged_split(pages_per_seq, page_size)

    def pallas(q, k_pages, v_pages, tables, seq_lens):
        return paged_decode_attention(q, k_pages, v_pages, tables, seq_lens, scale=SCALE, interpret=interpret)

    def xla(q, k_pages, v_pages, tables, seq_lens):
        return paged_attention_xla(q, k_pages, v_pages, decode_batch_metadata(tables, seq_lens), scale=SCALE)

    def jax_paged(q, k_pages, v_pages, tables, seq_lens):
        # JAX's op has no softmax scale: fold it into q. In float32 its default two pipeline
        # stages ask for more shared memory than an H100 has (seen: 264 KiB requested).
        return jax_paged_attention.paged_attention(
            (q.astype(jnp.float32) * SCALE).astype(q.dtype), k_pages, v_pages, tables, seq_lens,
            k_splits=k_splits, pages_per_compute_block=per_block, interpret=interpret,
            num_stages=1 if q.dtype == jnp.float32 else 2,
        )

    return {"xla": xla, "pallas": pallas, "jax_paged": jax_paged}  # xla first: the others check against it


def jax_dense(q, k_dense, v_dense, seq_lens, *, interpret):
    """JAX's decode_attention.gqa on dense [B, ctx, K, d] K/V (k_splits must divide ctx / 16)."""
    context = k_dense.shape[1]
    k_splits = math.gcd(16, context // 16)
    return jax_decode_attention.gqa(
        q, k_dense, v_dense, kv_seq_len=seq_lens, sm_scale=SCALE, k_splits=k_splits, interpret=interpret
    )


def densify(k_pages, v_pages, tables):
    """[K, P, S, d] pages + [B, n] table -> dense [B, n * S, K, d] K and V."""
    def one(pages):
        x = pages[:, tables]  # [K, B, n, S, d]
        num_kv_heads, batch, n, page_size, head_dim = x.shape
        return x.reshape(num_kv_heads, batch, n * page_size, head_dim).transpose(1, 2, 0, 3)
    return one(k_pages), one(v_pages)


# ----------------------------------------------------------------------------- timing


def timed_row(row: dict, fn, arg_sets, repeats: int, rate_key: str, amount: float, reference_name: str, reference,
              is_reference: bool = False):  # fmt: skip
    """Time `fn` over `arg_sets` into `row`: seconds, `rate_key` (amount / s / 1e12) and the relative
    error against `reference` (this output itself when `is_reference`); an implementation that fails
    records its error instead (one must not end the run). Returns its output, None when it failed."""
    try:
        seconds, out = time_calls(fn, arg_sets, repeats)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return None
    row.update(seconds=seconds, **{rate_key: amount / seconds / 1e12})
    reference = out if is_reference else reference
    if reference is not None:
        row[f"rel_error_vs_{reference_name}"] = rel_error(out, reference)
    return out


def rel_error(out, ref) -> float:
    out = np.asarray(jnp.asarray(out, jnp.float32))
    ref = np.asarray(jnp.asarray(ref, jnp.float32))
    if not np.isfinite(out).all():
        return float("inf")
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))


# ----------------------------------------------------------------------------- correctness


def checked(results, fn, reference, **labels):
    """Record fn()'s error against reference; an exception is recorded as a failed check."""
    try:
        results.append(dict(**labels, rel_error=rel_error(fn(), reference)))
    except Exception as e:
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        results.append(dict(**labels, rel_error=float("inf"), error=error))


def check_kernels(setup, rng, log) -> list[dict]:
    """Every kernel against its reference in float32 and bfloat16, before anything is timed."""
    results = []
    for dtype in (jnp.float32, jnp.bfloat16):
        name = jnp.dtype(dtype).name
        tol = TOLERANCE[name]
        with jax.default_matmul_precision("highest"):
            for page_size in setup.page_sizes:
                batch, context = 4, max(setup.contexts[:2])
                k_pages, v_pages, tables, _ = decode_case(rng, setup, batch, context, page_size, dtype, copies=1)
                tables = tables[0]
                # Ragged lengths, one sliding-window run, and a padding slot.
                seq_lens = jnp.asarray([context, context // 2 + 1, 1, 0], jnp.int32)
                q = jax.random.normal(jax.random.key(1), (batch, setup.num_heads, setup.head_dim), dtype)
                labels = dict(dtype=name, page_size=page_size)
                for window in (None, 100):
                    ref = paged_decode_attention_reference(
                        q, k_pages, v_pages, tables, seq_lens, scale=SCALE, window=window)
                    checked(results, lambda: paged_decode_attention(
                        q, k_pages, v_pages, tables, seq_lens, scale=SCALE, window=window, interpret=setup.interpret),
                        ref, kernel="paged_decode_attention", window=window, **labels)
                impls = decode_impls(setup, page_size, tables.shape[1])
                full = jnp.full((batch,), context, jnp.int32)
                ref = paged_decode_attention_reference(q, k_pages, v_pages, tables, full, scale=SCALE)
                for impl in ("xla", "jax_paged"):
                    checked(results, lambda: impls[impl](q, k_pages, v_pages, tables, full), ref,
                            kernel=impl, window=None, **labels)
                k_dense, v_dense = densify(k_pages, v_pages, tables)
                checked(results, lambda: jax_dense(q, k_dense, v_dense, full, interpret=setup.interpret), ref,
                        kernel="jax_dense", window=None, **labels)

                # Ragged: a mixed step of a prefill chunk on top of context, a fresh prefill, a
                # decode row, a padding slot, and padding tokens.
                starts, q_lens = [context // 2 - 40, 0, context // 3], [40, 33, 1]
                query_start = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens), [sum(q_lens)]]), jnp.int32)
                lens = jnp.asarray([s + n for s, n in zip(starts, q_lens)] + [0], jnp.int32)
                num_tokens = sum(q_lens) + 3
                q = jax.random.normal(jax.random.key(2), (num_tokens, setup.num_heads, setup.head_dim),
                                      jnp.float32).astype(dtype)
                for window in (None, 100):
                    kwargs = dict(max_query_len=64, scale=SCALE, window=window)
                    ref = ragged_paged_attention_reference(q, k_pages, v_pages, query_start, lens, tables, **kwargs)
                    checked(results, lambda: ragged_paged_attention(
                        q, k_pages, v_pages, query_start, lens, tables, interpret=setup.interpret, **kwargs),
                        ref, kernel="ragged_paged_attention", window=window, **labels)
                free_device()
        for r in results:
            if r["dtype"] == name:
                r["ok"] = r["rel_error"] <= tol
    for r in results:
        log(f"  check {r['kernel']:<24} {r['dtype']:<8} page {r['page_size']:<3} window {str(r['window']):<4} "
            f"rel err {r['rel_error']:.2e}  {'ok' if r['ok'] else 'FAILED'} {r.get('error', '')}")
    return results


# ----------------------------------------------------------------------------- benchmarks


def bench_decode(setup, rng, log) -> list[dict]:
    rows = []
    dtype = jnp.bfloat16
    itemsize = jnp.dtype(dtype).itemsize
    log(f"\n{'page':>4} {'batch':>5} {'context':>7}  {'impl':<10} {'time us':>9} {'TB/s':>6}  check")
    for page_size in setup.page_sizes:
        for batch in setup.batches:
            for context in setup.contexts:
                kv_bytes = 2 * batch * context * setup.num_kv_heads * setup.head_dim * itemsize
                if kv_bytes > POOL_BUDGET_BYTES:
                    log(f"{page_size:>4} {batch:>5} {context:>7}  skipped: K/V {kv_bytes / 2**30:.0f} GiB over budget")
                    continue
                copies = int(min(CALLS_PER_PROGRAM, max(1, math.ceil(4 * L2_BYTES / kv_bytes)),
                                 POOL_BUDGET_BYTES // kv_bytes))
                k_pages, v_pages, tables, seq_lens = decode_case(rng, setup, batch, context, page_size, dtype, copies)
                # Calls of a millisecond or more need no batching against launch overhead.
                calls = CALLS_PER_PROGRAM if kv_bytes < 2**30 else 3
                qs = jax.random.normal(jax.random.key(3), (calls, batch, setup.num_heads, setup.head_dim),
                                       jnp.float32).astype(dtype)
                arg_sets = [(qs[i], k_pages, v_pages, tables[i % copies], seq_lens) for i in range(calls)]
                runs = {name: (fn, arg_sets) for name, fn in decode_impls(setup, page_size, tables.shape[2]).items()}
                if copies * kv_bytes <= DENSE_BUDGET_BYTES:
                    dense = [densify(k_pages, v_pages, tables[c]) for c in range(copies)]
                    dense_sets = [(qs[i], *dense[i % copies], seq_lens) for i in range(calls)]
                    runs["jax_dense"] = (functools.partial(jax_dense, interpret=setup.interpret), dense_sets)
                baseline = None
                for name, (fn, sets) in runs.items():
                    row = dict(kind="decode", impl=name, page_size=page_size, batch=batch, context=context,
                               dtype="bfloat16", kv_bytes=kv_bytes, copies=copies)
                    out = timed_row(row, fn, sets, setup.repeats, "tb_per_s", kv_bytes, "xla", baseline,
                                    is_reference=name == "xla")  # fmt: skip
                    baseline = out if name == "xla" else baseline
                    rows.append(row)
                    log(format_decode_row(row))
                del arg_sets, runs, k_pages, v_pages, tables, qs
                free_device()
    return rows


def format_decode_row(row) -> str:
    head = f"{row['page_size']:>4} {row['batch']:>5} {row['context']:>7}  {row['impl']:<10}"
    if "error" in row:
        return f"{head} failed: {row['error']}"
    check = f"{row['rel_error_vs_xla']:.1e}" if "rel_error_vs_xla" in row else ""
    return f"{head} {row['seconds'] * 1e6:>9.1f} {row['tb_per_s']:>6.2f}  {check}"


def bench_prefill(setup, rng, log) -> list[dict]:
    rows = []
    dtype = jnp.bfloat16
    page_size = setup.page_sizes[-1]
    log(f"\n{'tokens':>6}  {'impl':<8} {'time us':>10} {'TFLOP/s':>8}  check")
    for num_tokens in setup.prefill_lens:
        pages_per_seq = num_tokens // page_size
        k_pages, v_pages = make_pages(rng, 1 + pages_per_seq, page_size, setup, dtype)
        tables = jnp.asarray(rng.permutation(np.arange(1, 1 + pages_per_seq)).astype(np.int32))[None, :]
        batch = prefill_batch_metadata(num_tokens, tables)
        q = jax.random.normal(jax.random.key(4), (num_tokens, setup.num_heads, setup.head_dim), dtype)
        # The same keys/values in the dense [1, T, K, d] layout that dot_product_attention takes.
        k_dense, v_dense = densify(k_pages, v_pages, tables)
        flops = 2 * num_tokens**2 * setup.num_heads * setup.head_dim  # causal: half of 4 T^2 H d

        def pallas(q, k_pages=k_pages, v_pages=v_pages, batch=batch):
            return ragged_paged_attention(q, k_pages, v_pages, batch.query_start, batch.seq_lens, batch.block_tables,
                                          max_query_len=num_tokens, scale=SCALE, interpret=setup.interpret)

        def sdpa(implementation):
            def run(q, k_dense=k_dense, v_dense=v_dense):
                out = jax.nn.dot_product_attention(q[None], k_dense, v_dense, scale=SCALE, is_causal=True,
                                                   implementation=implementation)
                return out[0]
            return run

        def xla_paged(q, k_pages=k_pages, v_pages=v_pages, batch=batch):
            return paged_attention_xla(q, k_pages, v_pages, batch, scale=SCALE)

        reference = None
        # xla_sdpa first: the others check against it.
        impls = {"xla_sdpa": sdpa("xla"), "pallas": pallas, "cudnn": sdpa("cudnn"), "xla_paged": xla_paged}
        if setup.interpret:
            del impls["cudnn"]
        arg_sets = [(q * (1 + 0.01 * i),) for i in range(4)]
        for name, fn in impls.items():
            row = dict(kind="prefill", impl=name, tokens=num_tokens, page_size=page_size, dtype="bfloat16", flops=flops)
            out = timed_row(row, fn, arg_sets, setup.repeats, "tflop_per_s", flops, "xla_sdpa", reference,
                            is_reference=name == "xla_sdpa")  # fmt: skip
            reference = out if name == "xla_sdpa" else reference
            rows.append(row)
            if "error" in row:
                log(f"{num_tokens:>6}  {name:<8} failed: {row['error']}")
            else:
                check = f"{row['rel_error_vs_xla_sdpa']:.1e}" if "rel_error_vs_xla_sdpa" in row else ""
                log(f"{num_tokens:>6}  {name:<8} {row['seconds'] * 1e6:>10.1f} {row['tflop_per_s']:>8.1f}  {check}")
        free_device()  # every array of this length, the closures' included
    return rows


def summary_table(rows) -> list[str]:
    """Decode TB/s with one column per implementation, the shortest view of the run."""
    impls = ["pallas", "xla", "jax_paged", "jax_dense"]
    lines = [f"{'page':>4} {'batch':>5} {'context':>7}  " + " ".join(f"{i:>9}" for i in impls) + "   (TB/s)"]
    keys = sorted({(r["page_size"], r["batch"], r["context"]) for r in rows if r["kind"] == "decode"})
    for key in keys:
        cells = []
        for impl in impls:
            row = next((r for r in rows if r["kind"] == "decode" and r["impl"] == impl
                        and (r["page_size"], r["batch"], r["context"]) == key), None)
            cells.append(f"{row['tb_per_s']:>9.2f}" if row and "tb_per_s" in row else f"{'-':>9}")
        lines.append(f"{key[0]:>4} {key[1]:>5} {key[2]:>7}  " + " ".join(cells))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes in interpret mode (CPU check)")
    parser.add_argument("--out", help="JSON path (default: $OUT/kernel_bandwidth.json, else ./kernel_bandwidth.json)")
    parser.add_argument("--batches", type=int, nargs="+", help="decode batch sizes (default 1 8 64 256)")
    parser.add_argument("--contexts", type=int, nargs="+", help="decode contexts (default 512 2048 8192 32768)")
    parser.add_argument("--page-sizes", type=int, nargs="+", help="page sizes (default 16 64)")
    parser.add_argument("--prefill-lens", type=int, nargs="+", help="prefill lengths (default 2048 8192)")
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args(argv)
    setup = SMOKE if args.smoke else FULL
    overrides = dict(batches=args.batches, contexts=args.contexts, page_sizes=args.page_sizes,
                     prefill_lens=args.prefill_lens)
    setup = dataclasses.replace(setup, **{k: tuple(v) for k, v in overrides.items() if v})
    out_path = Path(args.out or Path(os.environ.get("OUT", ".")) / "kernel_bandwidth.json")

    def log(line):
        print(line, flush=True)

    device = jax.devices()[0]
    log(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, interpret={setup.interpret}")
    rng = np.random.default_rng(0)
    result = dict(device=device.device_kind, jax=jax.__version__, setup=dataclasses.asdict(setup))
    start = time.perf_counter()
    result["checks"] = check_kernels(setup, rng, log)
    rows = []
    if not args.skip_decode:
        rows += bench_decode(setup, rng, log)
    if not args.skip_prefill:
        rows += bench_prefill(setup, rng, log)
    result["rows"] = rows
    result["seconds"] = time.perf_counter() - start
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    log("")
    for line in summary_table(rows):
        log(line)
    failed = [r for r in result["checks"] if not r["ok"]]
    log(f"\n{len(result['checks']) - len(failed)}/{len(result['checks'])} correctness checks passed; "
        f"{result['seconds']:.0f} s; JSON: {out_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
