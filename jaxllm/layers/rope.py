"""Rotary position embeddings (the "rotate half" layout of Hugging Face checkpoints).

Inverse frequencies are computed once per (RopeConfig, head_dim) in numpy float32, exactly as the
reference does, including the `linear` and `llama3` scalings.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import RopeConfig


@functools.lru_cache(maxsize=None)
def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """[head_dim // 2] float32 inverse frequencies after scaling."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(rope.theta) ** exponents)).astype(np.float32)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / np.float32(rope.factor)
    elif rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_freq_wavelen = old_len / rope.low_freq_factor
        high_freq_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled).astype(np.float32)
    if rope.freq_factors is not None:
        inv_freq = (inv_freq / np.asarray(rope.freq_factors, np.float32)).astype(np.float32)
    return inv_freq


def rotary_cos_sin(positions: jax.Array, rope: RopeConfig, head_dim: int, dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables for `positions` (any shape [...]) -> two [..., head_dim] arrays of `dtype`."""
    inv_freq = jnp.asarray(inverse_frequencies(rope, head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., head_dim // 2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x: [..., heads, head_dim] by cos/sin: [..., head_dim] (broadcast over heads)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[..., None, :] + rotated * sin[..., None, :]
