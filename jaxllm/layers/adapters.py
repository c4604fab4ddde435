"""Per-token adapters inside the forward pass: batched LoRA deltas and virtual-token embeddings.

One step mixes sequences with different adapters and with none. Each token carries the device
slot of its LoRA adapter (0: none), and the delta of every adapted projection is computed for all
tokens at once against the whole bank, masked by a one-hot of the slot:

    xa    = x @ A_bank         [T, S, R]   (S = max_loras slots, R = max_lora_rank)
    delta = (xa * onehot) @ B  [T, out]    (one contraction over (slot, rank))

Shapes are static (no gathers of per-token weights, no sorting), the masked contraction is two
dense GEMMs of width S * R, and the intermediates are [T, S, R]: at T = 8192, S = 4, R = 64 that
is 2M values per projection. The cost per token is (in + out) * S * R multiply-adds per adapted
projection, whatever the number of distinct adapters in the step: for a Llama-8B layer with all
seven projections adapted, S = 4 and R = 64, about 10% of the layer's base weights in FLOPs and
bytes. A grouped GEMM over tokens sorted by adapter would cost (in + out) * R, S times less, at
the price of a sort and a ragged kernel; steps without adapters skip all of this (the runner
compiles them without the bank).

Prompt adapters: token ids >= vocab_size are rows of a device table of virtual-token embeddings
(row = id - vocab_size), looked up instead of the vocabulary and not scaled by the embedding scale.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["lora", "lora_slots", "prompt_table"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class AdapterInputs:
    """What a step with adapters reads besides the params (jaxllm/adapters/bank.py builds it)."""

    lora: list | None  # per layer {param name: {"a": [S, *in, R], "b": [S, R, *out]}}, or None
    lora_slots: jax.Array | None  # [T] int32: the token's LoRA slot, 1..S, 0 = no adapter
    prompt_table: jax.Array | None  # [num_prompt_slots * max_prompt_adapter_token, D] virtual-token embeddings


def lora_onehot(lora_slots: jax.Array, num_slots: int, dtype) -> jax.Array:
    """[T] slots (0 = none) -> [T, S] one-hot of bank row slot - 1 (all zero for slot 0)."""
    return jax.nn.one_hot(lora_slots - 1, num_slots, dtype=dtype)


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, onehot: jax.Array) -> jax.Array:
    """The LoRA delta of one projection for every token, each through its own adapter.

    Args:
      x: [T, *in] the projection's input.
      a: [S, *in, R] the bank's A of this projection.
      b: [S, R, *out] the bank's B (scaling folded in).
      onehot: [T, S] from lora_onehot.
    Returns:
      [T, *out] in x's dtype.
    """
    n_in = x.ndim - 1
    xa = jnp.tensordot(x, a, axes=(list(range(1, 1 + n_in)), list(range(1, 1 + n_in))))  # [T, S, R]
    xa = xa * onehot[:, :, None]
    return jnp.tensordot(xa, b, axes=([1, 2], [0, 1])).astype(x.dtype)  # [T, *out]


def lora_delta_single(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """One adapter's delta for every token (no bank): x [..., *in], a [*in, R], b [R, *out] ->
    [..., *out] in x's dtype. What `lora_delta` computes for a token of that adapter's slot; the
    dense, differentiable forward (`forward_dense(..., lora=)`) uses it to train an adapter."""
    n_in = a.ndim - 1
    xa = jnp.tensordot(x, a.astype(x.dtype), axes=n_in)  # [..., R]
    return jnp.tensordot(xa, b.astype(x.dtype), axes=1)  # [..., *out]


def lora_delta_reference(x: jax.Array, a: jax.Array, b: jax.Array, lora_slots: jax.Array) -> jax.Array:
    """The same delta by gathering each token's own A and B (memory [T, *in, R]: tests only)."""
    rows = jnp.maximum(lora_slots - 1, 0)
    n_in = x.ndim - 1
    xa = jnp.einsum(x, [0, *range(1, 1 + n_in)], a[rows], [0, *range(1, 2 + n_in)], [0, 1 + n_in])  # [T, R]
    out = jnp.einsum(xa, [0, 1], b[rows], [0, 1, *range(2, b.ndim)], [0, *range(2, b.ndim)])  # [T, *out]
    return jnp.where((lora_slots > 0).reshape((-1,) + (1,) * (out.ndim - 1)), out, 0).astype(x.dtype)


def lookup_rows(table: jax.Array, ids: jax.Array, mesh=None, axis: str | None = None) -> jax.Array:
    """table[ids]. With `mesh`, `table` is split over its rows on `axis` (a vocabulary-parallel
    embedding): each device reads the ids in its slice, zero elsewhere, and one all-reduce sums
    them (exact: one device gives each row). Written out with shard_map because XLA may partition
    a single-id lookup (batch 1) as a dynamic slice and gather the whole table for it."""
    if mesh is None or mesh.shape[axis] == 1:
        return table[ids]
    from jax.sharding import PartitionSpec as P

    def local(t, ids):
        first = jax.lax.axis_index(axis) * t.shape[0]
        mine = (ids >= first) & (ids < first + t.shape[0])
        rows = t[jnp.where(mine, ids - first, 0)]
        return jax.lax.psum(jnp.where(mine[..., None], rows, jnp.zeros((), t.dtype)), axis)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P()), out_specs=P(), check_vma=False)(table, ids)


def embed_with_virtual_tokens(embed_table: jax.Array, token_ids: jax.Array, vocab_size: int, dtype,
                              embed_scale: float | None, prompt_table: jax.Array | None,
                              mesh=None, axis: str | None = None) -> jax.Array:  # fmt: skip
    """token_ids: [T] -> [T, D]. Ids below vocab_size read the (scaled) vocabulary embedding; ids
    vocab_size + j read row j of prompt_table, unscaled. With `mesh`, embed_table is split over
    the vocabulary on `axis` (see lookup_rows)."""
    if prompt_table is None:
        x = lookup_rows(embed_table, token_ids, mesh, axis).astype(dtype)
        return x * jnp.asarray(embed_scale, dtype) if embed_scale is not None else x
    virtual = token_ids >= vocab_size
    x = lookup_rows(embed_table, jnp.where(virtual, 0, token_ids), mesh, axis).astype(dtype)
    if embed_scale is not None:
        x = x * jnp.asarray(embed_scale, dtype)
    rows = jnp.clip(token_ids - vocab_size, 0, prompt_table.shape[0] - 1)
    return jnp.where(virtual[:, None], prompt_table[rows].astype(dtype), x)
