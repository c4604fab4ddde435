"""Token sampling on the device, inside the jitted step, with per-sequence parameters.

Each sequence has its own random stream: the key of its t-th sampled token is
fold_in(key(seed), t), so a seeded request samples the same tokens whatever it is batched with.
Logits are adjusted in this order: a guided row's grammar mask (its token bitmask, any flavor),
the row's bias (embedding bias, banned single tokens and
words), this step's bans (min_tokens' end tokens, multi-token bad words' last tokens), repetition /
presence / frequency penalties; then temperature, then top-k, top-p and min-p
truncation, then sampling (one uniform draw a row, inverted through the kept tokens' cumulative
distribution, `_invert`). Greedy rows (temperature 0) take the argmax of the adjusted logits.
Log-probabilities reported to the user are those of the raw model distribution.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp


# Banned tokens a row may have in one step beyond its bias row: the end tokens under min_tokens and
# the last tokens of multi-token bad words whose prefix was just generated (requests are checked
# against it when they are made: jaxllm/inputs.py). Single-token bans live in the row's bias.
BAN_WIDTH = 64


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["temperature", "seeds", "counters", "top_k", "top_p", "min_p", "bias_slots", "banned_tokens",
                 "repetition_penalty", "presence_penalty", "frequency_penalty", "block_tables", "seq_lens",
                 "prompt_lens", "first_positions", "token_bitmask"],
    meta_fields=["flavor", "num_logprobs"],
)  # fmt: skip
@dataclasses.dataclass(frozen=True)
class SamplingBatch:
    """The sampling inputs of B rows; which fields are set is the flavor (engine/buckets.py).

    Every field of a flavor is data: a row that does not use one carries its neutral value (top_k
    0, top_p 1, min_p 0, bias slot 0, bans -1, penalties 1 / 0 / 0).
    """

    temperature: jax.Array  # [B] float32; 0 = greedy
    seeds: jax.Array  # [B, 2] uint32: raw threefry key data of each sequence's stream
    counters: jax.Array  # [B] int32: tokens this sequence sampled before
    # "full" and "penalties":
    top_k: jax.Array | None = None  # [B] int32; 0 = off
    top_p: jax.Array | None = None  # [B] float32; 1 = off
    min_p: jax.Array | None = None  # [B] float32; 0 = off
    bias_slots: jax.Array | None = None  # [B] int32: the row of the bias table added to the logits (0: zeros)
    banned_tokens: jax.Array | None = None  # [B, BAN_WIDTH] int32 tokens to forbid this step, -1 padded
    # "penalties": the penalties, and where each row's tokens are (the token pages, see `seen_and_counts`)
    repetition_penalty: jax.Array | None = None  # [B] float32; 1 = off
    presence_penalty: jax.Array | None = None  # [B] float32
    frequency_penalty: jax.Array | None = None  # [B] float32
    block_tables: jax.Array | None = None  # [B, P] int32: the row's pages
    seq_lens: jax.Array | None = None  # [B] int32: its tokens in them (prompt and output so far)
    prompt_lens: jax.Array | None = None  # [B] int32: positions below this are the prompt's
    first_positions: jax.Array | None = None  # [B] int32: positions below this hold no token (virtual)
    # Guided decoding (jaxllm/guided.py), in any flavor: bit t % 32 of word t // 32 set where token t
    # may be sampled (padding rows and unguided rows: every bit set).
    token_bitmask: jax.Array | None = None  # [B, ceil(V / 32)] int32
    flavor: str = "plain"  # static: plain | full | penalties
    num_logprobs: int = 0  # static: top-k log-probabilities to return (0 = none)


def seen_and_counts(s: SamplingBatch, token_pages: jax.Array, vocab_size: int) -> tuple[jax.Array, jax.Array]:
    """Each row's token history read from the token pages ([num_pages, page_size] int32, written by
    every forward step beside the K/V): ([B, V] bool, any prompt or output occurrence; [B, V]
    float32, output occurrences)."""
    B, P = s.block_tables.shape
    page_size = token_pages.shape[1]
    tokens = token_pages[s.block_tables].reshape(B, P * page_size)  # [B, P * S], by position
    position = jnp.arange(P * page_size)[None, :]
    valid = (position >= s.first_positions[:, None]) & (position < s.seq_lens[:, None])
    valid &= (tokens >= 0) & (tokens < vocab_size)
    output = valid & (position >= s.prompt_lens[:, None])
    safe = jnp.where(valid, tokens, 0)
    rows = jnp.arange(B)[:, None]
    seen = jnp.zeros((B, vocab_size), jnp.bool_).at[rows, safe].max(valid)
    counts = jnp.zeros((B, vocab_size), jnp.float32).at[rows, safe].add(output.astype(jnp.float32))
    return seen, counts


def allowed_tokens(bitmask: jax.Array, vocab_size: int) -> jax.Array:
    """[B, V] bool of a [B, W] int32 token bitmask (bit t % 32 of word t // 32: token t)."""
    ids = jnp.arange(vocab_size)
    words = bitmask[:, ids // 32]  # [B, V]
    return ((words >> (ids % 32)) & 1).astype(jnp.bool_)


def apply_penalties(logits: jax.Array, s: SamplingBatch, token_pages: jax.Array) -> jax.Array:
    """Repetition (prompt and output tokens), presence and frequency (output tokens) penalties."""
    seen, out_counts = seen_and_counts(s, token_pages, logits.shape[-1])
    rep = s.repetition_penalty[:, None]
    penalized = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(seen, penalized, logits)
    logits = logits - s.frequency_penalty[:, None] * out_counts
    return logits - s.presence_penalty[:, None] * (out_counts > 0)


def adjust_logits(logits: jax.Array, s: SamplingBatch, bias_table: jax.Array | None = None,
                  token_pages: jax.Array | None = None) -> jax.Array:  # fmt: skip
    """The grammar's mask, bias rows, bans, then penalties, as the flavor has them. bias_table:
    [slots + 1, V] float32."""
    if s.token_bitmask is not None:
        logits = jnp.where(allowed_tokens(s.token_bitmask, logits.shape[-1]), logits, -jnp.inf)
    if s.flavor == "plain":
        return logits
    if bias_table is not None:
        logits = logits + bias_table[s.bias_slots]
    banned = s.banned_tokens
    B = logits.shape[0]
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], banned.shape)
    mask = jnp.zeros(logits.shape, jnp.bool_).at[rows, jnp.where(banned >= 0, banned, 0)].max(banned >= 0)
    logits = jnp.where(mask, -jnp.inf, logits)
    if s.flavor == "penalties":
        logits = apply_penalties(logits, s, token_pages)
    return logits


def truncation_mask(scaled: jax.Array, s: SamplingBatch) -> jax.Array:
    """`_kept` of scaled [B, V]'s probabilities; a row with no finite logit keeps them all, as the
    sorting definition's threshold is the row's maximum."""
    top = jnp.max(scaled, axis=-1, keepdims=True)
    return _kept(_probabilities(scaled, top), s) | ~jnp.isfinite(top)


def _probabilities(scaled: jax.Array, top: jax.Array) -> jax.Array:
    """exp(scaled - top) of scaled [B, V]; top [B, 1]: the rows' maxima (taken as 0 where a row has no
    finite entry: all its probabilities 0)."""
    return jnp.exp(scaled - jnp.where(jnp.isfinite(top), top, 0.0))


def _kept(p: jax.Array, s: SamplingBatch) -> jax.Array:
    """True where a token of p [B, V] (`_probabilities`: 1 at each row's maximum) survives top-k,
    top-p and min-p: in each row's descending order, the tokens with fewer than top_k before them,
    less than top_p of the probability before them and at least min_p times the most likely token's
    probability; ties of the last one kept (equal probabilities) are kept, and the most likely token
    always is.

    No row is sorted (on the CPU a sort of every row was most of a truncating batch's sampler; on a
    GPU the two are yet to be timed: benchmarks/truncation_cost.py). The kept tokens are those at or
    above a threshold probability: the least p whose first place among its ties would be kept.
    Whether p would be is monotone in p (fewer tokens and less probability lie above a larger one),
    and non-negative float32s are ordered as their bits are as integers, so the threshold is found by
    halving the range of those integers 30 times, each a pass over the row's probabilities counting
    those above a probe and summing them. tests/test_api.py checks it against the sorting definition."""
    total = jnp.sum(p, axis=-1)
    bits = jax.lax.bitcast_convert_type(p, jnp.int32)

    def keeps(t):  # [B] probes (float32 bits): would a token of that probability, first of its ties, be kept?
        above = bits > t[:, None]
        count = jnp.sum(above, axis=-1)
        mass = jnp.sum(jnp.where(above, p, 0.0), axis=-1)
        return ((s.top_k <= 0) | (count < s.top_k)) & ((s.top_p >= 1) | (mass < s.top_p * total)) & (
            jax.lax.bitcast_convert_type(t, jnp.float32) >= s.min_p)

    def halve(_, bounds):  # the threshold lies in (lo, hi]
        lo, hi = bounds
        mid = lo + (hi - lo) // 2 + (hi - lo) % 2
        good = keeps(mid)
        return jnp.where(good, lo, mid), jnp.where(good, mid, hi)

    one = jax.lax.bitcast_convert_type(jnp.float32(1), jnp.int32)
    lo = jnp.full(p.shape[:1], -1, jnp.int32)  # below every probability: a threshold of 0 keeps them all
    _, threshold = jax.lax.fori_loop(0, 30, halve, (lo, jnp.full_like(lo, one)))
    return bits >= threshold[:, None]


def _temperature(s: SamplingBatch) -> jax.Array:
    """[B, 1] divisors of the logits (greedy rows divide by 1 and take the argmax anyway)."""
    return jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]


# Sampling inverts each row's cumulative distribution at one uniform draw, a chunk of this many
# tokens at a time: the chunks' sums, their running sum (a few hundred a row), then the running sum of
# the one chunk the draw falls in. It replaced Gumbel-max sampling, whose [B, V] random draws were
# most of the sampler: 230 of 300 ms for 256 rows of a 49,152-token vocabulary on 2 CPU cores.
SAMPLE_CHUNK = 256


def _uniform(s: SamplingBatch) -> jax.Array:
    """[B] uniform draws in [0, 1) of each row's stream at its counter."""
    keys = jax.vmap(lambda seed, c: jax.random.fold_in(jax.random.wrap_key_data(seed), c))(s.seeds, s.counters)
    return jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)


def _first_positive_from(x: jax.Array, start: jax.Array) -> jax.Array:
    """[B] index of each row's first positive entry of x [B, n] at or after start [B] (else its last
    positive one; 0 in a row with none)."""
    index = jnp.arange(x.shape[-1])[None, :]
    after = (index >= start[:, None]) & (x > 0)
    last = x.shape[-1] - 1 - jnp.argmax((x > 0)[:, ::-1], axis=-1)
    return jnp.where(after.any(-1), jnp.argmax(after, axis=-1), jnp.where((x > 0).any(-1), last, 0))


def _invert(sums: jax.Array, chunk_of: Callable[[jax.Array], jax.Array], u: jax.Array) -> jax.Array:
    """Draw from each row's distribution, given as unnormalised probabilities in chunks: sums [B, n]
    of the chunks, chunk_of(c) [B, SAMPLE_CHUNK] the probabilities of each row's chunk c [B], u [B]
    uniform in [0, 1). Returns [B] int32 flat indices c * SAMPLE_CHUNK + j: the first whose running
    sum exceeds u times the row's total, never one of probability 0."""
    ends = jnp.cumsum(sums, axis=-1)
    target = u * ends[:, -1]
    c = _first_positive_from(sums, jnp.sum(ends <= target[:, None], axis=-1))
    before = jnp.where(c > 0, jnp.take_along_axis(ends, jnp.maximum(c - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
    chunk = chunk_of(c)
    j = _first_positive_from(chunk, jnp.sum(jnp.cumsum(chunk, axis=-1) <= (target - before)[:, None], axis=-1))
    return (c * SAMPLE_CHUNK + j).astype(jnp.int32)


def _chunked(p: jax.Array) -> jax.Array:
    """p [B, V] as [B, ceil(V / SAMPLE_CHUNK), SAMPLE_CHUNK], zero padded."""
    B, V = p.shape
    return jnp.pad(p, ((0, 0), (0, -V % SAMPLE_CHUNK))).reshape(B, -1, SAMPLE_CHUNK)


def _draw(p: jax.Array, s: SamplingBatch) -> jax.Array:
    """[B] tokens drawn in proportion to p [B, V] (unnormalised probabilities, 0 where a token may not
    be drawn)."""
    chunks = _chunked(p)
    chunk_of = lambda c: jnp.take_along_axis(chunks, c[:, None, None], axis=1)[:, 0]  # noqa: E731
    return _invert(chunks.sum(axis=-1), chunk_of, _uniform(s))


def sample(logits: jax.Array, s: SamplingBatch, bias_table: jax.Array | None = None,
           token_pages: jax.Array | None = None) -> dict:  # fmt: skip
    """Pick one token per row. logits: [B, V] float32 raw model logits.

    bias_table ([slots + 1, V]) serves the "full" and "penalties" flavors, token_pages
    ([num_pages, page_size] int32) the "penalties" one.
    Returns a dict of device arrays: tokens [B]; logprob [B] and rank [B] of the chosen token under
    the raw distribution; and when s.num_logprobs > 0, top_ids / top_logprobs [B, num_logprobs].
    """
    adjusted = adjust_logits(logits, s, bias_table, token_pages)
    greedy = jnp.argmax(adjusted, axis=-1)
    scaled = adjusted / _temperature(s)
    p = _probabilities(scaled, jnp.max(scaled, axis=-1, keepdims=True))
    if s.flavor != "plain":
        p = jnp.where(_kept(p, s), p, 0.0)
    sampled = _draw(p, s)
    tokens = jnp.where(s.temperature > 0, sampled, greedy).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    out = {
        "tokens": tokens,
        "logprob": chosen,
        "rank": (jnp.sum(logp > chosen[:, None], axis=-1) + 1).astype(jnp.int32),
    }
    if s.num_logprobs:
        top_logprobs, top_ids = jax.lax.top_k(logp, s.num_logprobs)
        out["top_ids"], out["top_logprobs"] = top_ids.astype(jnp.int32), top_logprobs
    return out


def can_sample_sharded(s: SamplingBatch) -> bool:
    """Whether `sample_sharded` serves this batch: the "plain" flavor (truncation counts over the
    whole vocabulary; penalties, bias and bans index it by token id)."""
    return s.flavor == "plain" and s.token_bitmask is None


def sample_sharded(logits: jax.Array, s: SamplingBatch, mesh, axis: str, vocab_size: int) -> dict:
    """`sample` over logits split over the vocabulary on `mesh`'s `axis` ([B, V'], V' >= vocab_size
    padded so the devices divide it): each device works on its slice and the devices combine per
    row maxima, sums and top-k candidates by all-reduces of [B] and [B, n, k] values, so the [B, V]
    logits are never gathered. The same tokens as `sample` (first index among equal maxima; a
    sampled row's chunk sums are gathered, [B, V' / SAMPLE_CHUNK], and the device holding the chosen
    chunk finds the token in it: the draw agrees with `sample`'s to the order of the sums); log-probs
    agree to the order of the log-sum-exp's sums. Only for `can_sample_sharded(s)` batches."""
    from jax.sharding import PartitionSpec as P

    n = mesh.shape[axis]
    B, Vp = logits.shape
    Vl = Vp // n
    k = s.num_logprobs

    def local(x, s):
        i = jax.lax.axis_index(axis)
        first = i * Vl
        x = jnp.where(first + jnp.arange(Vl) < vocab_size, x, -jnp.inf)  # padded ids never win

        def argmax(v):  # (the global first index of the row maximum, as jnp.argmax gives it; that maximum)
            top = jnp.max(v, axis=-1)
            here = jnp.argmax(v, axis=-1).astype(jnp.int32) + first
            best = jax.lax.pmax(top, axis)
            return jax.lax.pmin(jnp.where(top == best, here, jnp.iinfo(jnp.int32).max), axis), best

        greedy, peak = argmax(x)
        scaled = x / _temperature(s)
        # [B, nl, C]: this device's chunks; the row maximum of x / T is the peak's (division by T > 0 is monotone)
        chunks = _chunked(_probabilities(scaled, peak[:, None] / _temperature(s)))
        nl = chunks.shape[1]
        sums = jax.lax.all_gather(chunks.sum(axis=-1), axis, axis=1, tiled=True)  # [B, n * nl]

        def chunk_of(c):  # the chosen chunk, from the device that holds it
            here = jnp.take_along_axis(chunks, (c % nl)[:, None, None], axis=1)[:, 0]
            return jax.lax.psum(jnp.where((c // nl == i)[:, None], here, 0.0), axis)

        drawn = _invert(sums, chunk_of, _uniform(s))  # an index into the devices' chunks laid end to end
        c = drawn // SAMPLE_CHUNK
        sampled = (c // nl) * Vl + (c % nl) * SAMPLE_CHUNK + drawn % SAMPLE_CHUNK
        tokens = jnp.where(s.temperature > 0, sampled, greedy)
        lse = peak + jnp.log(jax.lax.psum(jnp.sum(jnp.exp(x - peak[:, None]), axis=-1), axis))
        logp = x - lse[:, None]
        mine = (tokens >= first) & (tokens < first + Vl)
        at = jnp.take_along_axis(logp, jnp.clip(tokens - first, 0, Vl - 1)[:, None], axis=-1)[:, 0]
        chosen = jax.lax.psum(jnp.where(mine, at, 0.0), axis)
        out = {"tokens": tokens, "logprob": chosen,
               "rank": (jax.lax.psum(jnp.sum(logp > chosen[:, None], axis=-1), axis) + 1).astype(jnp.int32)}
        if k:
            values, ids = jax.lax.top_k(logp, k)
            slot = jax.nn.one_hot(i, n, dtype=jnp.float32)[None, :, None]  # this device's row of [B, n, k]
            values = jax.lax.psum(jnp.where(slot > 0, values[:, None, :], 0.0), axis).reshape(B, n * k)
            ids = jax.lax.psum(jnp.where(slot > 0, (ids + first)[:, None, :], 0), axis).reshape(B, n * k)
            out["top_logprobs"], best = jax.lax.top_k(values, k)
            out["top_ids"] = jnp.take_along_axis(ids, best, axis=-1).astype(jnp.int32)
        return out

    return jax.shard_map(local, mesh=mesh, in_specs=(P(None, axis), P()), out_specs=P(), check_vma=False)(logits, s)


def prompt_logprobs(logits: jax.Array, next_tokens: jax.Array, k: int) -> dict:
    """Log-probabilities of each prompt token given what precedes it.

    logits: [T, V] for every packed position; next_tokens: [T] the token that follows each position.
    """
    logp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logp, next_tokens[:, None], axis=-1)[:, 0]
    out = {"logprob": chosen, "rank": (jnp.sum(logp > chosen[:, None], axis=-1) + 1).astype(jnp.int32)}
    if k:
        top_logprobs, top_ids = jax.lax.top_k(logp, k)
        out["top_ids"], out["top_logprobs"] = top_ids.astype(jnp.int32), top_logprobs
    return out
