"""The step functions: the pure functions an engine compiles, one per program kind (engine/buckets.py).

  forward_step  one ragged step over the paged cache: this step's K/V and token ids written into
                the pages, the last tokens' logits and every token's hidden state returned
  sample_step   one token per row from last-token logits, in the batch's sampling flavor
  decode_n      n decodes in one program (a lax.scan), each sampling the next one's input tokens
  head_step     every token's log-probability of the next prompt token (prompt_logprobs) and,
                asked, its logits (context logits), from forward_step's hidden states

Their static arguments travel together as one `StepConfig`. Device state threads through them:
`kv_cache` (per layer (k_pages, v_pages), each [K, num_pages, page_size, d]) and `token_pages`
([num_pages, page_size] int32: the token id at each KV slot, which the "penalties" sampling flavor
reads instead of a per-request list); both are donated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.layers import sampling as sampling_lib
from jaxllm.layers.adapters import AdapterInputs
from jaxllm.layers.batch import NULL_PAGE, BatchMetadata
from jaxllm.models.transformer import KVCache, forward_hidden, logits_of
from jaxllm.sharding import TP_AXIS

@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static arguments of every step function (hashable: jit keys on it)."""

    cfg: ModelConfig
    backend: str = "xla"  # paged attention: 'xla' | 'pallas' | 'pallas_interpret' (layers/attention.py)
    mesh: Any = None  # a tensor-parallel mesh (jaxllm/sharding.py), or None for one device
    # Under tensor parallelism, last-token logits stay split over the vocabulary and the "plain"
    # flavor samples them so (layers/sampling.py:sample_sharded).
    shard_logits: bool = False


# Key of a multi-step decode's output holding the next dispatch's input tokens (its last samples).
NEXT_TOKENS = "next_tokens"


def write_tokens(token_pages: jax.Array, token_ids: jax.Array, slot_mapping: jax.Array) -> jax.Array:
    """token_pages [num_pages, page_size] with token_ids [T] written at their KV slots [T]."""
    page_size = token_pages.shape[1]
    return token_pages.at[slot_mapping // page_size, slot_mapping % page_size].set(token_ids)


def forward_step(params: dict, kv_cache: KVCache, token_pages: jax.Array, batch: BatchMetadata,
                 adapters: AdapterInputs | None, step: StepConfig) -> tuple[dict, KVCache, jax.Array]:
    """The model over one ragged step (T tokens of B sequences).

    Returns ({"logits": [B, V] float32 of each sequence's last token (vocabulary-split [B, V'] under
    tensor parallelism with `shard_logits`), "hidden": [T, D] every token's last-layer output}, the
    updated kv_cache, the updated token_pages).
    """
    hidden, kv_cache = forward_hidden(params, batch, kv_cache, step.cfg, backend=step.backend, mesh=step.mesh,
                                      adapters=adapters)  # fmt: skip
    # hidden: [T, D]; logits: [B, V] (or [B, V'])
    logits = logits_of(params, hidden[batch.logits_indices], step.cfg, step.mesh, step.shard_logits)
    token_pages = write_tokens(token_pages, batch.token_ids, batch.slot_mapping)
    return {"logits": logits, "hidden": hidden}, kv_cache, token_pages


def sample_step(logits: jax.Array, sampling: sampling_lib.SamplingBatch, bias_table: jax.Array | None,
                token_pages: jax.Array | None, step: StepConfig) -> dict:  # fmt: skip
    """A token per row: `layers/sampling.py:sample`, or over the vocabulary shards where the logits
    are split (`step.shard_logits`: `sample_sharded` serves the "plain" flavor under tensor parallelism).

    logits: [B, V] float32 (or [B, V'] split over the vocabulary); bias_table: [slots + 1, V];
    token_pages: [num_pages, page_size] int32 ("penalties" only).
    """
    vocab_size, mesh = step.cfg.vocab_size, step.mesh
    if step.shard_logits and mesh is not None and sampling_lib.can_sample_sharded(sampling):
        return sampling_lib.sample_sharded(logits, sampling, mesh, TP_AXIS, vocab_size)
    return sampling_lib.sample(logits[:, :vocab_size], sampling, bias_table, token_pages)


def decode_n(params: dict, kv_cache: KVCache, token_pages: jax.Array, batch: BatchMetadata,
             sampling: sampling_lib.SamplingBatch, adapters: AdapterInputs | None, step: StepConfig,
             steps: int) -> tuple[dict, KVCache, jax.Array]:  # fmt: skip
    """`steps` decode steps in one program (a loop on the device): step k computes the tokens step
    k - 1 sampled, one position further on, with sampling counter + k, exactly what `steps` separate
    decode steps would compute; the host reads every step's samples at the end and keeps each
    sequence's tokens up to its stop. A position past a sequence's pages writes its K/V into the null
    page, as padding does (the host only keeps tokens it gave pages to).

    Returns ({key: [steps, B, ...]} of the samples, and NEXT_TOKENS [B], the last samples, which a
    following dispatch reads as its input tokens), the kv_cache, the token_pages.
    """
    T = batch.num_tokens  # == B: a decode step packs sequence i's token at row i
    page_size = kv_cache[0][0].shape[2]
    live = jnp.arange(T) < batch.query_start[-1]  # [T]: real rows; padding rows stay as they are
    live_seq = batch.seq_lens > 0  # [B]
    pages_per_seq = batch.block_tables.shape[1]

    def one(carry, k):
        tokens, kv, token_pages = carry  # tokens: [T], step k - 1's samples
        positions = jnp.where(live, batch.positions + k, batch.positions)
        index = positions // page_size
        page = jnp.take_along_axis(batch.block_tables[batch.token_seq], jnp.minimum(index, pages_per_seq - 1)[:, None],
                                   axis=1)[:, 0]  # fmt: skip
        page = jnp.where(index < pages_per_seq, page, NULL_PAGE)
        batch_k = dataclasses.replace(
            batch, token_ids=tokens, positions=positions,
            slot_mapping=jnp.where(live, page * page_size + positions % page_size, batch.slot_mapping),
            seq_lens=jnp.where(live_seq, batch.seq_lens + k, 0),
        )  # fmt: skip
        out, kv, token_pages = forward_step(params, kv, token_pages, batch_k, adapters, step)
        samples = sample_step(out["logits"], dataclasses.replace(sampling, counters=sampling.counters + k), None,
                              None, step)  # fmt: skip
        return (samples["tokens"], kv, token_pages), samples

    carry = (batch.token_ids, kv_cache, token_pages)
    # outs: {key: [steps, B, ...]}
    (_, kv_cache, token_pages), outs = jax.lax.scan(one, carry, jnp.arange(steps, dtype=jnp.int32))
    # The input tokens of a dispatch scheduled before this one is read (the overlap scheduler): the
    # last samples, padding rows 0. Part of this program, so reading them compiles nothing.
    outs[NEXT_TOKENS] = jnp.where(live, outs["tokens"][-1], 0).astype(jnp.int32)
    return outs, kv_cache, token_pages


def head_step(params: dict, hidden: jax.Array, next_tokens: jax.Array, step: StepConfig, num_logprobs: int,
              all_logits: bool) -> dict:  # fmt: skip
    """Prompt log-probabilities of every token: hidden [T, D] from forward_step, next_tokens [T] the
    token that follows each position. Returns prompt_logprob / prompt_rank [T] and prompt_top_ids /
    prompt_top_logprobs [T, num_logprobs], and with `all_logits` all_logits [T, V] float32."""
    logits = logits_of(params, hidden, step.cfg, step.mesh)  # [T, V]
    out = {f"prompt_{k}": v for k, v in sampling_lib.prompt_logprobs(logits, next_tokens, num_logprobs).items()}
    if all_logits:
        out["all_logits"] = logits
    return out
