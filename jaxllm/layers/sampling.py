"""Token sampling on the device, inside the jitted step, with per-sequence parameters.

Each sequence has its own random stream: the key of its t-th sampled token is
fold_in(key(seed), t), so a seeded request samples the same tokens whatever it is batched with.
Logits are adjusted in this order: embedding bias, bad-token ban, min_tokens (end tokens banned),
repetition / presence / frequency penalties; then temperature, then top-k, top-p and min-p
truncation, then sampling (Gumbel-max over the kept tokens). Greedy rows (temperature 0) take the
argmax of the adjusted logits. Log-probabilities reported to the user are those of the raw model
distribution.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["temperature", "top_k", "top_p", "min_p", "seeds", "counters", "logit_bias",
                 "penalty_tokens", "penalty_counts", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "banned_tokens"],
    meta_fields=["num_logprobs", "truncate", "penalize"],
)  # fmt: skip
@dataclasses.dataclass(frozen=True)
class SamplingBatch:
    temperature: jax.Array  # [B] float32; 0 = greedy
    top_k: jax.Array  # [B] int32; 0 = off
    top_p: jax.Array  # [B] float32; 1 = off
    min_p: jax.Array  # [B] float32; 0 = off
    seeds: jax.Array  # [B, 2] uint32: raw threefry key data of each sequence's stream
    counters: jax.Array  # [B] int32: tokens this sequence sampled before
    logit_bias: jax.Array | None  # [B, V] float32 added to the logits (embedding_bias), or None
    penalty_tokens: jax.Array | None  # [B, L] int32 token ids seen (prompt + output), -1 padded
    penalty_counts: jax.Array | None  # [B, L] int32: 1 for output tokens, 0 for prompt-only ids
    repetition_penalty: jax.Array | None  # [B] float32; 1 = off
    presence_penalty: jax.Array | None  # [B] float32
    frequency_penalty: jax.Array | None  # [B] float32
    banned_tokens: jax.Array | None  # [B, N] int32 tokens to forbid this step, -1 padded
    num_logprobs: int = 0  # static: top-k log-probabilities to return (0 = none)
    truncate: bool = False  # static: some row uses top_k / top_p / min_p
    penalize: bool = False  # static: some row uses a penalty


def apply_penalties(logits: jax.Array, s: SamplingBatch) -> jax.Array:
    """Repetition (prompt and output tokens), presence and frequency (output tokens) penalties."""
    B, V = logits.shape
    tokens = s.penalty_tokens
    valid = tokens >= 0
    safe = jnp.where(valid, tokens, 0)
    rows = jnp.arange(B)[:, None]
    seen = jnp.zeros((B, V), jnp.bool_).at[rows, safe].max(valid)
    out_counts = jnp.zeros((B, V), jnp.float32).at[rows, safe].add(jnp.where(valid, s.penalty_counts, 0))
    rep = s.repetition_penalty[:, None]
    penalized = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(seen, penalized, logits)
    logits = logits - s.frequency_penalty[:, None] * out_counts
    return logits - s.presence_penalty[:, None] * (out_counts > 0)


def adjust_logits(logits: jax.Array, s: SamplingBatch) -> jax.Array:
    if s.logit_bias is not None:
        logits = logits + s.logit_bias
    if s.banned_tokens is not None:
        B = logits.shape[0]
        banned = s.banned_tokens
        rows = jnp.broadcast_to(jnp.arange(B)[:, None], banned.shape)
        mask = jnp.zeros(logits.shape, jnp.bool_).at[rows, jnp.where(banned >= 0, banned, 0)].max(banned >= 0)
        logits = jnp.where(mask, -jnp.inf, logits)
    if s.penalize:
        logits = apply_penalties(logits, s)
    return logits


def truncation_mask(scaled: jax.Array, s: SamplingBatch) -> jax.Array:
    """True where a token survives top-k, top-p and min-p (the most likely token always does)."""
    V = scaled.shape[-1]
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]  # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    rank = jnp.arange(V)[None, :]
    keep = jnp.ones_like(sorted_logits, jnp.bool_)
    keep &= (s.top_k[:, None] <= 0) | (rank < s.top_k[:, None])
    exclusive_cumsum = jnp.cumsum(probs, axis=-1) - probs
    keep &= exclusive_cumsum < s.top_p[:, None]
    keep &= probs >= s.min_p[:, None] * probs[:, :1]
    keep = keep.at[:, 0].set(True)
    # The smallest kept logit per row is the threshold; ties at the threshold are kept.
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return scaled >= threshold


def _temperature(s: SamplingBatch) -> jax.Array:
    """[B, 1] divisors of the logits (greedy rows divide by 1 and take the argmax anyway)."""
    return jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]


def _gumbel(s: SamplingBatch, vocab_size: int) -> jax.Array:
    """[B, vocab_size] Gumbel noise of each row's stream at its counter (Gumbel-max sampling)."""
    keys = jax.vmap(lambda seed, c: jax.random.fold_in(jax.random.wrap_key_data(seed), c))(s.seeds, s.counters)
    return jax.vmap(lambda k: jax.random.gumbel(k, (vocab_size,), jnp.float32))(keys)


def sample(logits: jax.Array, s: SamplingBatch) -> dict:
    """Pick one token per row. logits: [B, V] float32 raw model logits.

    Returns a dict of device arrays: tokens [B]; logprob [B] and rank [B] of the chosen token under
    the raw distribution; and when s.num_logprobs > 0, top_ids / top_logprobs [B, num_logprobs].
    """
    adjusted = adjust_logits(logits, s)
    greedy = jnp.argmax(adjusted, axis=-1)
    scaled = adjusted / _temperature(s)
    if s.truncate:
        scaled = jnp.where(truncation_mask(scaled, s), scaled, -jnp.inf)
    sampled = jnp.argmax(scaled + _gumbel(s, scaled.shape[-1]), axis=-1)
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
    """Whether `sample_sharded` serves this batch: no truncation (it sorts the whole vocabulary),
    penalties, bias or bans (they index it by token id)."""
    return not (s.truncate or s.penalize or s.logit_bias is not None or s.banned_tokens is not None)


def sample_sharded(logits: jax.Array, s: SamplingBatch, mesh, axis: str, vocab_size: int) -> dict:
    """`sample` over logits split over the vocabulary on `mesh`'s `axis` ([B, V'], V' >= vocab_size
    padded so the devices divide it): each device works on its slice and the devices combine per
    row maxima, sums and top-k candidates by all-reduces of [B] and [B, n, k] values, so the [B, V]
    logits are never gathered. The same tokens as `sample` (first index among equal maxima; the
    Gumbel noise of the whole row is drawn on every device and each takes its slice); log-probs
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
        gumbel = jnp.pad(_gumbel(s, vocab_size), ((0, 0), (0, Vp - vocab_size)))
        sampled, _ = argmax(x / _temperature(s) + jax.lax.dynamic_slice_in_dim(gumbel, first, Vl, axis=1))
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
