"""Top-k / top-p / min-p truncation masks without sorting every row, timed against the sort, on
this machine's first device: the library's (30 halvings over the probabilities' float32 bits, one
counting pass each), the halving stopped once no token lies between its bounds, a radix select (a
histogram of the next 8 bits a pass, scatter-added) and a 16-way search (15 probes a pass). Prints
ms a call (median of 10 after the first) and whether each variant's mask equals the sort's, for
flat rows (normal logits) and peaked ones (Zipf, exponent 1.5).

  PYTHONPATH=$PWD python benchmarks/truncation_cost.py [--rows 1,64,256,2048] [--vocab 128256]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.layers.sampling import SamplingBatch
from jaxllm.layers.sampling import truncation_mask as halving_mask


def sort_mask(scaled, s):  # the definition, sorting every row (the sampler's until 3068f46)
    V = scaled.shape[-1]
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    rank = jnp.arange(V)[None, :]
    keep = (s.top_k[:, None] <= 0) | (rank < s.top_k[:, None])
    keep &= jnp.cumsum(probs, axis=-1) - probs < s.top_p[:, None]
    keep &= probs >= s.min_p[:, None] * probs[:, :1]
    keep = keep.at[:, 0].set(True)
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return scaled >= threshold


def _key(x):  # float32 -> uint32 in the same order
    b = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(1 << 31))


def _unkey(k):
    return jax.lax.bitcast_convert_type(jnp.where(k >> 31 == 1, k & jnp.uint32(0x7FFFFFFF), ~k), jnp.float32)


def sixteen_way_mask(scaled, s):
    """The least t (uint32 order of the logits) whose value would be kept as the first of its ties,
    found by splitting (lo, hi] into 16 parts a pass (15 probes), 8 passes; keep = key >= t."""
    ways = 16
    m = jnp.max(scaled, axis=-1, keepdims=True)
    p = jnp.exp(scaled - m)
    total = jnp.sum(p, axis=-1, keepdims=True)
    keys = _key(scaled)
    k = jnp.where(s.top_k > 0, s.top_k, scaled.shape[-1] + 1)[:, None]

    def ok(t):  # [B, P] uint32 probes -> [B, P] whether a value at t, first of its ties, is kept
        above = keys[:, None, :] > t[:, :, None]
        count = jnp.sum(above, axis=-1)
        mass = jnp.sum(jnp.where(above, p[:, None, :], 0.0), axis=-1) / total
        return (count < k) & (mass < s.top_p[:, None]) & (jnp.exp(_unkey(t) - m) >= s.min_p[:, None])

    def body(_, lohi):
        lo, hi = lohi  # ok(hi) holds, ok(lo) does not
        width = hi - lo
        step = width // ways + (width % ways != 0)
        j = jnp.arange(1, ways, dtype=jnp.uint32)[None, :]
        probes = lo[:, None] + jnp.minimum(j * step[:, None], width[:, None])
        good = ok(probes)
        first = jnp.argmax(jnp.concatenate([good, jnp.ones_like(good[:, :1])], axis=-1), axis=-1)
        at = lambda i: jnp.take_along_axis(probes, i[:, None], -1)[:, 0]  # noqa: E731
        new_hi = jnp.where(first < ways - 1, at(jnp.minimum(first, ways - 2)), hi)
        new_lo = jnp.where(first > 0, at(jnp.maximum(first - 1, 0)), lo)
        return new_lo, new_hi

    hi = _key(m[:, 0])
    lo = jnp.zeros_like(hi)
    lo, hi = jax.lax.fori_loop(0, 8, body, (lo, hi))
    return keys >= hi[:, None]


def snapped_mask(scaled, s):
    """Halving over probability bits that stops when no token lies between the bounds: probes snap
    down to the largest token value at or below them; min-p applied directly."""
    top = jnp.max(scaled, axis=-1, keepdims=True)
    p = jnp.exp(scaled - top)
    total = jnp.sum(p, axis=-1)
    bits = jax.lax.bitcast_convert_type(p, jnp.int32)

    def body(state):
        lo, hi, _, n = state
        mid = lo + (hi - lo) // 2 + (hi - lo) % 2
        above = bits > mid[:, None]
        count = jnp.sum(above, axis=-1)
        mass = jnp.sum(jnp.where(above, p, 0.0), axis=-1)
        snap = jnp.max(jnp.where(above, -1, bits), axis=-1)
        below_hi = jnp.max(jnp.where(bits < hi[:, None], bits, -1), axis=-1)
        good = ((s.top_k <= 0) | (count < s.top_k)) & ((s.top_p >= 1) | (mass < s.top_p * total))
        done = below_hi <= lo
        lo = jnp.where(done | good, lo, mid)
        hi = jnp.where(~done & good, jnp.maximum(snap, lo + 1), hi)
        return lo, hi, jnp.all(done), n + 1

    one = jax.lax.bitcast_convert_type(jnp.float32(1), jnp.int32)
    lo = jnp.full(scaled.shape[:1], -1, jnp.int32)
    _, hi, _, n = jax.lax.while_loop(lambda st: ~st[2] & (st[3] < 32), body,
                                     (lo, jnp.full_like(lo, one), jnp.array(False), 0))
    return ((bits >= hi[:, None]) & (p >= s.min_p[:, None])) | ~jnp.isfinite(top)


def radix_mask(scaled, s, digit_bits=8):
    """Radix select over the probabilities' float32 bits: a digit a pass, most significant first, each
    pass a histogram (count and mass, scatter-added) of the candidates' next digit; min-p directly."""
    B, V = scaled.shape
    top = jnp.max(scaled, axis=-1, keepdims=True)
    p = jnp.exp(scaled - top)
    total = jnp.sum(p, axis=-1)
    bits = jax.lax.bitcast_convert_type(p, jnp.int32)
    bins = 1 << digit_bits
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, V))
    prefix = jnp.zeros(B, jnp.int32)  # the threshold's digits found so far
    count = jnp.zeros(B, jnp.int32)  # tokens above the candidates
    mass = jnp.zeros(B, jnp.float32)
    for shift in range(32 - digit_bits, -1, -digit_bits):
        match = (bits >> (shift + digit_bits)) == (prefix[:, None] >> (shift + digit_bits)) if shift + digit_bits < 32 \
            else jnp.ones((B, V), bool)
        digit = (bits >> shift) & (bins - 1)
        h_count = jnp.zeros((B, bins), jnp.int32).at[rows, digit].add(match.astype(jnp.int32))
        h_mass = jnp.zeros((B, bins), jnp.float32).at[rows, digit].add(jnp.where(match, p, 0.0))
        # tokens above the top of bucket b: those above the candidates and in buckets above b
        c_above = count[:, None] + jnp.cumsum(h_count[:, ::-1], axis=-1)[:, ::-1] - h_count
        m_above = mass[:, None] + jnp.cumsum(h_mass[:, ::-1], axis=-1)[:, ::-1] - h_mass
        good = ((s.top_k[:, None] <= 0) | (c_above < s.top_k[:, None])) & (
            (s.top_p[:, None] >= 1) | (m_above < (s.top_p * total)[:, None]))
        b = jnp.argmax(good, axis=-1)  # the least bucket whose top is kept
        count = jnp.take_along_axis(c_above, b[:, None], -1)[:, 0]
        mass = jnp.take_along_axis(m_above, b[:, None], -1)[:, 0]
        prefix = prefix | (b.astype(jnp.int32) << shift)
    return ((bits >= prefix[:, None]) & (p >= s.min_p[:, None])) | ~jnp.isfinite(top)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,64,256,2048")
    parser.add_argument("--vocab", type=int, default=128256)
    args = parser.parse_args()
    print(f"truncation masks, {args.vocab} tokens a row, {jax.devices()[0].device_kind}")
    names = ("sort", "halving", "snapped", "radix", "16-way")
    print(f"{'rows':>5} {'logits':>6} {'setting':>18} " + " ".join(f"{n + ' ms':>10}" for n in names) + "  same")
    for B in [int(b) for b in args.rows.split(",")]:
      for kind in ("flat", "zipf"):
        if kind == "flat":
            logits = 3 * jax.random.normal(jax.random.key(B), (B, args.vocab), jnp.float32)
        else:  # a Zipf distribution of exponent 1.5 in a random order a row: top_p 0.9 keeps ~60 tokens
            ranks = jax.vmap(lambda k: jax.random.permutation(k, args.vocab))(jax.random.split(jax.random.key(B), B))
            logits = -1.5 * jnp.log1p(ranks.astype(jnp.float32))
        for name, tk, tp, mp in [("top_p 0.9", 0, 0.9, 0.0), ("k40 p0.95 mp0.01", 40, 0.95, 0.01)]:
            s = SamplingBatch(temperature=jnp.full(B, 0.8), seeds=jnp.zeros((B, 2), jnp.uint32),
                              counters=jnp.zeros(B, jnp.int32), top_k=jnp.full(B, tk, jnp.int32),
                              top_p=jnp.full(B, tp), min_p=jnp.full(B, mp), flavor="full")
            row, masks = [], []
            for f in (sort_mask, halving_mask, snapped_mask, radix_mask, sixteen_way_mask):
                g = jax.jit(f)
                masks.append(np.asarray(g(logits, s)))
                times = []
                for _ in range(10):
                    t0 = time.perf_counter()
                    jax.block_until_ready(g(logits, s))
                    times.append(time.perf_counter() - t0)
                row.append(1e3 * float(np.median(times)))
            same = "/".join("yes" if (m == masks[0]).all() else f"no({int((m != masks[0]).sum())})" for m in masks[1:])
            times = " ".join(f"{t:10.2f}" for t in row)
            print(f"{B:>5} {kind:>6} {name:>18} {times}  {same}", flush=True)


if __name__ == "__main__":
    main()
