"""RMSNorm, computed in float32 the way each family's reference computes it."""

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    """Root-mean-square norm over the last axis.

    Llama-style (offset 0): `weight * normalize(x).astype(x.dtype)`.
    Gemma-style (offset 1): `(normalize(x) * (1 + weight)).astype(x.dtype)`, all in float32.
    The two orders of rounding are those of the Hugging Face implementations, so bfloat16 results
    agree with them bit for bit in the common cases.
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if offset:
        return (normed * (offset + weight.astype(jnp.float32))).astype(x.dtype)
    return weight * normed.astype(x.dtype)
