"""What each program of an engine is: its jitted function over a packed host-input buffer, and the
arguments it is lowered with (the runner's device state as it is, the rest abstract).

  forward program  models/step.py:forward_step, or decode_n for a multi-step decode; KV cache and
                   token pages donated; the adapters twin also reads the adapter bank. Its input
                   tokens may name rows of the last dispatch's samples (`merge_tokens`)
  sampler program  models/step.py:sample_step on a forward program's last-token logits
  head program     models/step.py:head_step on a forward program's hidden states

Each program's host inputs arrive as one uint32 buffer (engine/step_inputs.py packs them), split
here with the static layout of the program's abstract inputs. engine/executables.py compiles,
caches and loads what `lower` and `trees` describe.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import sharding as sharding_lib
from jaxllm.engine.buckets import ForwardShape, HeadShape, SamplerShape
from jaxllm.engine.step_inputs import host_layout
from jaxllm.layers import sampling as sampling_lib
from jaxllm.layers.adapters import AdapterInputs
from jaxllm.layers.attention import get_rope_kv_writer
from jaxllm.models.step import NEXT_TOKENS, StepConfig, decode_n, forward_step, head_step, sample_step
from jaxllm.sampling_params import MAX_LOGPROBS


def unpack_host_inputs(flat: jax.Array, layout: tuple):
    """The tree `pack_host_inputs` packed, from its buffer (on the device, inside a jit)."""
    treedef, specs = layout
    leaves, offset = [], 0
    for shape, dtype in specs:
        size = int(np.prod(shape, dtype=np.int64))
        bits = jax.lax.slice(flat, (offset,), (offset + size,))
        leaves.append(jax.lax.bitcast_convert_type(bits, jnp.dtype(dtype)).reshape(shape))
        offset += size
    return jax.tree.unflatten(treedef, leaves)


def merge_tokens(token_ids: jax.Array, prev: jax.Array) -> jax.Array:
    """The step's input tokens: host ids, except -1 - i, which reads the last dispatch's sample of
    its row i (`prev`, NEXT_TOKENS): a step scheduled before that one's tokens were read (the
    overlap scheduler, engine.py)."""
    rows = jnp.clip(-token_ids - 1, 0, prev.shape[0] - 1)
    return jnp.where(token_ids < 0, prev[rows], token_ids)


def _forward_program(params, kv_cache, token_pages, flat, token_ids, prev, bank, *, layout, step, steps, lora,
                     prev_rows):  # fmt: skip
    host = unpack_host_inputs(flat, layout)  # (batch[, sampling][, lora_slots])
    batch = dataclasses.replace(host[0], token_ids=merge_tokens(token_ids, prev))  # token_ids: [T]
    adapters = None
    if bank is not None:
        lora_bank, prompt_table = bank
        adapters = AdapterInputs(lora=lora_bank, lora_slots=host[-1] if lora else None, prompt_table=prompt_table)
    if steps > 1:
        outs, kv_cache, token_pages = decode_n(params, kv_cache, token_pages, batch, host[1], adapters, step, steps)
        outs[NEXT_TOKENS] = pad_rows(outs[NEXT_TOKENS], prev_rows)
        return outs, kv_cache, token_pages
    return forward_step(params, kv_cache, token_pages, batch, adapters, step)


def pad_rows(tokens: jax.Array, rows: int) -> jax.Array:
    """Sampled tokens [B] as the fixed [rows] array the next step's `merge_tokens` reads."""
    return jnp.zeros((rows,), jnp.int32).at[: tokens.shape[0]].set(tokens.astype(jnp.int32))


def _sampler_program(logits, flat, bias_table, token_pages, *, layout, step, prev_rows):
    (sampling,) = unpack_host_inputs(flat, layout)
    out = dict(sample_step(logits, sampling, bias_table, token_pages, step))
    out[NEXT_TOKENS] = pad_rows(out["tokens"], prev_rows)
    return out


def _head_program(params, hidden, flat, *, layout, step, all_logits):
    (next_tokens,) = unpack_host_inputs(flat, layout)  # [T]
    return head_step(params, hidden, next_tokens, step, MAX_LOGPROBS, all_logits)


def jitted(runner, shape):
    """The jitted function of `shape` (static: its host-input layout and switches)."""
    layout = host_layout(runner.host_inputs(shape))
    step = StepConfig(runner.cfg, runner.config.backend, runner.mesh, runner.shard_logits)
    if isinstance(shape, HeadShape):
        return jax.jit(functools.partial(_head_program, layout=layout, step=step, all_logits=shape.all_logits))
    if isinstance(shape, SamplerShape):
        return jax.jit(functools.partial(_sampler_program, layout=layout, step=step,
                                         prev_rows=runner.buckets.max_rows))  # fmt: skip
    return jax.jit(functools.partial(_forward_program, layout=layout, step=step, steps=shape.decode_steps,
                                     lora=shape.adapters and runner.uses_lora, prev_rows=runner.buckets.max_rows),
                   donate_argnums=(1, 2))  # fmt: skip


def abstract_args(runner, shape) -> tuple:
    """The arguments `shape`'s program is lowered with (device state as it is, the rest abstract)."""
    sharding = runner.input_sharding()
    _, size = host_layout(runner.host_inputs(shape), with_size=True)
    flat = jax.ShapeDtypeStruct((size,), jnp.uint32, sharding=sharding)
    if isinstance(shape, HeadShape):
        hidden = jax.ShapeDtypeStruct((shape.num_tokens, runner.cfg.hidden_size), runner.dtype, sharding=sharding)
        return (runner.params, hidden, flat)
    if isinstance(shape, SamplerShape):
        return (logits_spec(runner, shape.num_seqs), flat, runner.bias_table,
                runner.token_pages if shape.flavor == "penalties" else None)  # fmt: skip
    tokens = jax.ShapeDtypeStruct((shape.num_tokens,), jnp.int32, sharding=sharding)
    prev = jax.ShapeDtypeStruct((runner.buckets.max_rows,), jnp.int32, sharding=sharding)
    bank = runner.adapters.bank_arrays() if shape.adapters else None
    return (runner.params, runner.kv_cache, runner.token_pages, flat, tokens, prev, bank)


def logits_spec(runner, rows: int) -> jax.ShapeDtypeStruct:
    """A forward program's last-token logits: [B, V'] split over the vocabulary under TP, else [B, V]."""
    if runner.shard_logits:
        spec = jax.sharding.NamedSharding(runner.mesh, jax.sharding.PartitionSpec(None, sharding_lib.TP_AXIS))
        return jax.ShapeDtypeStruct((rows, runner.cfg.param_vocab_size), jnp.float32, sharding=spec)
    return jax.ShapeDtypeStruct((rows, runner.cfg.vocab_size), jnp.float32, sharding=runner.input_sharding())


def engine_description(runner) -> dict:
    """What a runner's programs depend on (engine/executables.py adds environment_description)."""

    def describe(tree):
        return jax.tree.map(lambda a: [list(a.shape), jnp.dtype(a.dtype).name, str(a.sharding)], tree)

    bank = runner.adapters.arrays() if runner.adapters is not None else None
    mesh = runner.mesh
    return {"devices": [[d.platform, d.device_kind, d.id] for d in runner._devices()],
            "model": dataclasses.asdict(runner.cfg), "config": dataclasses.asdict(runner.config),
            "buckets": dataclasses.asdict(runner.buckets), "kv_dtype": jnp.dtype(runner.kv_dtype).name,
            "params": describe(runner.params), "kv_cache": describe(runner.kv_cache[0]),
            "token_pages": describe(runner.token_pages), "bias_table": describe(runner.bias_table),
            "adapters": describe(bank), "mesh": None if mesh is None else dict(mesh.shape),
            "one_graph": runner.one_graph_decode(), "max_logprobs": MAX_LOGPROBS,
            "ban_width": sampling_lib.BAN_WIDTH, "prev_rows": runner.buckets.max_rows,
            # whether the backend rotates q and k in its K/V write (attention.ROPE_IN_KV_WRITE, a switch)
            "rope_in_kv_write": get_rope_kv_writer(runner.config.backend) is not None}  # fmt: skip


def lower(runner, shape):
    return jitted(runner, shape).lower(*abstract_args(runner, shape))


def trees(runner, shape, out_keys: list[str]):
    """(in_tree, out_tree) of `shape`'s program, for deserializing it (nothing is traced)."""
    args = abstract_args(runner, shape)
    in_tree = jax.tree.structure((args, {}))
    outs = {k: 0 for k in out_keys}
    if isinstance(shape, ForwardShape):
        out_tree = jax.tree.structure((outs, runner.kv_cache, runner.token_pages))
    else:
        out_tree = jax.tree.structure(outs)
    return in_tree, out_tree
