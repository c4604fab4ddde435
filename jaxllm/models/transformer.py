"""The decoder forward pass shared by all supported families (pure functions over the params pytree).

Llama, Mistral, Qwen2, Qwen3 and Gemma 3 differ only in switches of `ModelConfig` (biases, q/k
norms, sandwich norms, norm offset, activation, embedding scale, per-layer windows and RoPE), so
one decoder body serves them all; a family module only reads its config and names its tensors.

`forward` runs a ragged step over the paged KV cache (what the engine jits); `forward_dense` runs
ordinary [batch, length] causal attention with no cache (training, gradients, notebooks). Both
call the same `decoder_layer` with a different attention closure.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.config import ModelConfig
from jaxllm.layers.adapters import (AdapterInputs, embed_with_virtual_tokens, lora_delta, lora_delta_single,
                                    lora_onehot)
from jaxllm.layers.attention import MASK_VALUE, get_backend, get_kv_writer, get_rope_kv_writer
from jaxllm.layers.linear import WEIGHT_ONLY_MAX_ROWS, holds, project
from jaxllm.layers.mlp import gated_mlp
from jaxllm.layers.norms import rms_norm
from jaxllm.layers.rope import apply_rotary, rotary_cos_sin
from jaxllm.models.params import kv_cache_specs, split_fused, zeros_of
from jaxllm.layers.batch import BatchMetadata
from jaxllm.sharding import TP_AXIS

KVCache = list  # per layer: (k_pages, v_pages), each [num_kv_heads, num_pages, page_size, head_dim]


def embed(params: dict, token_ids: jax.Array, cfg: ModelConfig, dtype,
          prompt_table: jax.Array | None = None, mesh=None) -> jax.Array:  # fmt: skip
    """token_ids -> embeddings; ids >= vocab_size are virtual tokens read from prompt_table (adapters).
    With a tensor-parallel `mesh` the table is split over the vocabulary (jaxllm/sharding.py)."""
    return embed_with_virtual_tokens(params["embed"], token_ids, cfg.vocab_size, dtype, cfg.embed_scale, prompt_table,
                                     mesh, TP_AXIS)  # fmt: skip


def decoder_layer(
    lp: dict,
    x: jax.Array,
    positions: jax.Array,
    layer: int,
    cfg: ModelConfig,
    attend: Callable[..., jax.Array],
    lora: Callable[[str, jax.Array, jax.Array], jax.Array] | None = None,
    weight_only_rows: int = 0,
    rope_in_attend: bool = False,
) -> jax.Array:
    """One transformer block. x: [..., D]; positions: [...]; attend(q, k, v, layer) -> [..., H, d].
    `lp` is one layer's params in either layout (models/params.py: separate or fused projections).
    rope_in_attend: q and k go to attend unrotated, with the rotary tables' first halves:
    attend(q, k, v, layer, cos, sin, qkv=...), cos and sin [..., d/2] (a backend that rotates in its
    K/V write); qkv is the fused projection's output [..., K, G + 2, d] when q, k and v are exactly
    its split (None otherwise), for attend to read them from instead.

    lora(name, input, output) adds the LoRA delta of projection `name` to its output (see forward);
    weight_only_rows: FP8 projections of at most this many rows are weight-only (layers/linear.py).
    """
    eps, offset = cfg.rms_norm_eps, cfg.norm_offset
    adapt = lora or (lambda name, h, y: y)
    h = rms_norm(x, lp["attn_norm"], eps, offset)
    qkv = None
    if holds(lp, "wqkv"):  # the fused layout (models/params.py): [..., K, G + 2, d], each KV head's q, k, v
        qkv = project(lp, "wqkv", h, weight_only_rows)
        q, k, v = split_fused(cfg, "wqkv", qkv)
    else:
        q, k, v = (project(lp, name, h, weight_only_rows) for name in ("wq", "wk", "wv"))
    if lora is not None or cfg.attention_bias or cfg.qk_norm:  # q, k, v are no longer its plain split
        qkv = None
    q, k, v = adapt("wq", h, q), adapt("wk", h, k), adapt("wv", h, v)
    if cfg.attention_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], eps, offset)
        k = rms_norm(k, lp["k_norm"], eps, offset)
    cos, sin = rotary_cos_sin(positions, cfg.layer_rope(layer), cfg.head_dim, x.dtype)
    if rope_in_attend:
        half = cfg.head_dim // 2
        attn = attend(q, k, v, layer, cos[..., :half], sin[..., :half], qkv=qkv)
    else:
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attn = attend(q, k, v, layer)
    out = adapt("wo", attn, project(lp, "wo", attn, weight_only_rows))
    if cfg.attention_out_bias:
        out = out + lp["bo"]
    if cfg.sandwich_norm:
        out = rms_norm(out, lp["post_attn_norm"], eps, offset)
    x = x + out
    h = rms_norm(x, lp["mlp_norm"], eps, offset)
    out = gated_mlp(h, lp, cfg.hidden_act, adapt if lora else None, weight_only_rows)
    if cfg.sandwich_norm:
        out = rms_norm(out, lp["post_mlp_norm"], eps, offset)
    return x + out


def final_hidden_to_logits(params: dict, h: jax.Array, cfg: ModelConfig, keep_padding: bool = False) -> jax.Array:
    """h: [..., D] (final norm not yet applied) -> float32 logits [..., V] (with keep_padding, the
    padded vocabulary's [..., V'] as the LM head makes them)."""
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps, cfg.norm_offset)
    if cfg.tie_word_embeddings:
        logits = jnp.einsum("...d,vd->...v", h, params["embed"].astype(h.dtype))
    else:
        logits = jnp.dot(h, params["lm_head"])
    logits = logits.astype(jnp.float32)
    if cfg.padded_vocab_size and not keep_padding:
        logits = logits[..., : cfg.vocab_size]
    if cfg.final_logit_softcapping:
        cap = cfg.final_logit_softcapping
        logits = jnp.tanh(logits / cap) * cap
    return logits


@functools.partial(jax.jit, static_argnames=("cfg", "layer", "backend", "mesh"))
def paged_layer(lp: dict, x: jax.Array, k_pages: jax.Array, v_pages: jax.Array, batch: BatchMetadata,
                lora_layer: dict | None, onehot: jax.Array | None, *, cfg: ModelConfig, layer: int, backend: str,
                mesh=None) -> tuple[jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """One decoder layer of a paged step: x [T, D] -> x, with this step's K/V written into the
    layer's pages ([K, P, S, d] each) and attention read from them.

    Its own jit: `forward` calls it once per layer, so a model is traced once per kind of layer
    (`layer` is the first layer of its kind: ModelConfig.first_layer_like) rather than once per
    layer, and XLA inlines the calls, so the compiled step is the same as one traced unrolled.
    lora_layer: this layer's LoRA bank {name: {"a", "b"}} with onehot [T, S] (None: no adapters).
    """
    attention, write_kv, rope_write_kv = get_backend(backend), get_kv_writer(backend), get_rope_kv_writer(backend)

    def attend_local(q, k, v, qkv, k_pages, v_pages, batch, rope, *, window):
        # qkv: None, or the fused projection's output [T, K, G + 2, d] that the rotating write reads q,
        # k and v from (then None)
        if rope is None:
            k_pages, v_pages = write_kv(k_pages, v_pages, k, v, batch.slot_mapping)
        else:  # q and k rotated in the write (rope: the step's cos, sin [T, d/2])
            q, k_pages, v_pages = rope_write_kv(k_pages, v_pages, q, k, v, *rope, batch.slot_mapping, qkv=qkv)
        return attention(q, k_pages, v_pages, batch, scale=cfg.attn_scale, window=window), k_pages, v_pages

    pages = []

    # An fp8 cache with calibrated scales stores K / k_scale and V / v_scale; attention then reads
    # q * k_scale against the stored K and scales its output by v_scale (the same products).
    kv_scales = "k_scale" in lp and jnp.dtype(k_pages.dtype).itemsize == 1

    def attend(q, k, v, layer, *rope, qkv=None):
        if kv_scales:  # (a scale commutes with the rotation: it may come first)
            q, k, v, qkv = q * lp["k_scale"].astype(q.dtype), k / lp["k_scale"], v / lp["v_scale"], None
        elif qkv is not None:  # read where they lie in it: no copies of its slices for the Pallas call
            q = k = v = None
        fn = functools.partial(attend_local, window=cfg.layer_window(layer))
        if mesh is not None:
            heads, fused, kv_spec = P(None, TP_AXIS, None), P(None, TP_AXIS, None, None), P(TP_AXIS)
            fn = jax.shard_map(fn, mesh=mesh, in_specs=(heads, heads, heads, fused, kv_spec, kv_spec, P(), P()),
                               out_specs=(heads, kv_spec, kv_spec), check_vma=False)  # fmt: skip
        out, new_k, new_v = fn(q, k, v, qkv, k_pages, v_pages, batch, rope or None)
        pages.extend((new_k, new_v))
        return out * lp["v_scale"].astype(out.dtype) if kv_scales else out

    def add_lora(name, h, y):
        return y + lora_delta(h, lora_layer[name]["a"], lora_layer[name]["b"], onehot) if name in lora_layer else y

    # On GPUs FP8 projections of decode-sized steps read the fp8 weight widened in XLA's GEMM
    weight_only_rows = WEIGHT_ONLY_MAX_ROWS if jax.default_backend() == "gpu" else 0
    x = decoder_layer(lp, x, batch.positions, layer, cfg, attend, add_lora if lora_layer is not None else None,
                      weight_only_rows, rope_in_attend=rope_write_kv is not None)  # fmt: skip
    if mesh is not None:
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))
    return x, pages[0], pages[1]


def forward_hidden(
    params: dict,
    batch: BatchMetadata,
    kv_cache: KVCache,
    cfg: ModelConfig,
    *,
    backend: str = "xla",
    mesh=None,
    adapters: AdapterInputs | None = None,
) -> tuple[jax.Array, KVCache]:
    """One ragged step over the paged cache, up to the last layer's output.

    Args:
      params: the params pytree (models/params.py).
      batch: the step's tokens, positions, slots and block tables.
      kv_cache: per layer (k_pages, v_pages); donate it when jitting.
      cfg: static model config.
      backend: attention backend name ('xla', or 'pallas' once registered).
      mesh: a tensor-parallel mesh (jaxllm/sharding.py): attention and the KV writes then run per
        shard of KV heads (shard_map), and the hidden state stays replicated between layers.
      adapters: per-token LoRA slots and the LoRA bank, and the virtual-token table of prompt
        adapters (jaxllm/layers/adapters.py); None for a step without adapters.
    Returns:
      (hidden [T, D] before the final norm, the updated kv_cache).
    """
    dtype = params["embed"].dtype
    x = embed(params, batch.token_ids, cfg, dtype, adapters.prompt_table if adapters else None, mesh)  # [T, D]
    new_cache = []
    lora_bank = adapters.lora if adapters is not None else None
    onehot = None
    if lora_bank is not None:
        num_slots = next(iter(lora_bank[0].values()))["a"].shape[0]
        onehot = lora_onehot(adapters.lora_slots, num_slots, dtype)  # [T, S]
    for layer, lp in enumerate(params["layers"]):
        k_pages, v_pages = kv_cache[layer]
        x, k_pages, v_pages = paged_layer(lp, x, k_pages, v_pages, batch, lora_bank[layer] if lora_bank else None,
                                          onehot, cfg=cfg, layer=cfg.first_layer_like(layer), backend=backend,
                                          mesh=mesh)  # fmt: skip
        new_cache.append((k_pages, v_pages))
    return x, new_cache


def logits_of(params: dict, h: jax.Array, cfg: ModelConfig, mesh=None, shard_logits: bool = False) -> jax.Array:
    """float32 logits [..., V] of hidden states h [..., D] (the final norm and the LM head). With a
    tensor-parallel mesh and `shard_logits`, they stay split over the vocabulary as the LM head
    makes them ([..., V'] with the plan's padding; layers/sampling.py:sample_sharded reads them);
    otherwise they are gathered whole."""
    if shard_logits and mesh is not None:
        logits = final_hidden_to_logits(params, h, cfg, keep_padding=True)
        spec = P(*([None] * (logits.ndim - 1)), TP_AXIS)
        return jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, spec))
    logits = final_hidden_to_logits(params, h, cfg)
    if mesh is not None:
        logits = jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, P()))
    return logits


def forward(
    params: dict,
    batch: BatchMetadata,
    kv_cache: KVCache,
    cfg: ModelConfig,
    *,
    backend: str = "xla",
    all_logits: bool = False,
    mesh=None,
    adapters: AdapterInputs | None = None,
    shard_logits: bool = False,
) -> tuple[jax.Array, KVCache]:
    """One ragged step over the paged cache: `forward_hidden`, then the logits of each sequence's
    last token ([B, V]), or of every token with `all_logits` ([T, V]); see `logits_of` for
    `shard_logits`. Returns (float32 logits, the updated kv_cache)."""
    x, new_cache = forward_hidden(params, batch, kv_cache, cfg, backend=backend, mesh=mesh, adapters=adapters)
    if not all_logits:
        x = x[batch.logits_indices]
    return logits_of(params, x, cfg, mesh, shard_logits), new_cache


def dense_causal_attention(q, k, v, *, scale: float, window: int | None, valid: jax.Array | None = None):
    """q: [B, L, H, d]; k, v: [B, L, K, d]; valid: [B, L] key mask (False = padding)."""
    B, L, H, d = q.shape
    K = k.shape[2]
    qg = (q.astype(jnp.float32) * scale).reshape(B, L, K, H // K, d)
    s = jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(jnp.float32))
    qi = jnp.arange(L)[:, None]
    ki = jnp.arange(L)[None, :]
    mask = ki <= qi
    if window is not None:
        mask = mask & (ki > qi - window)
    mask = mask[None, None, None]
    if valid is not None:
        mask = mask & valid[:, None, None, None, :]
    s = jnp.where(mask, s, MASK_VALUE)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bkgqs,bskd->bqkgd", p, v.astype(jnp.float32))
    return out.reshape(B, L, H, d).astype(q.dtype)


def forward_dense(params: dict, tokens: jax.Array, cfg: ModelConfig, valid: jax.Array | None = None,
                  lora: list | None = None, weight_only_rows: int = 0) -> jax.Array:  # fmt: skip
    """Full-sequence causal forward without a KV cache, for training and analysis.

    tokens: [B, L] int; valid: optional [B, L] bool (right padding). Returns float32 logits [B, L, V].
    lora: one LoRA adapter, per layer {param name: (A [*in, r], B [r, *out])}, scaling folded into B
    (`LoraAdapter.layers`' layout; `save_lora_adapter` writes it as a PEFT directory); each adapted
    projection adds (h A) B, as the engine adds a served adapter's delta.
    weight_only_rows: FP8 projections of at most this many rows are weight-only (layers/linear.py:
    an engine's decode steps on GPUs; 0: none).
    Differentiable with respect to `params` and `lora`.
    """
    if lora is not None and len(lora) != cfg.num_layers:
        raise ValueError(f"forward_dense: lora has {len(lora)} layers; the model has {cfg.num_layers}")
    dtype = params["embed"].dtype
    x = embed(params, tokens, cfg, dtype)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)

    def attend(q, k, v, layer):
        return dense_causal_attention(q, k, v, scale=cfg.attn_scale, window=cfg.layer_window(layer), valid=valid)

    def adapter_of(pairs: dict):
        def adapt(name, h, y):
            return y + lora_delta_single(h, *pairs[name]) if name in pairs else y

        return adapt

    for layer, lp in enumerate(params["layers"]):
        adapt = adapter_of(lora[layer]) if lora is not None and lora[layer] else None
        x = decoder_layer(lp, x, positions, layer, cfg, attend, adapt, weight_only_rows)
    return final_hidden_to_logits(params, x, cfg)


def init_kv_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype) -> KVCache:
    """A zeroed KV cache (models/params.py:kv_cache_specs)."""
    return zeros_of(kv_cache_specs(cfg, num_pages, page_size)[0], dtype)
