"""The gated feed-forward block every supported family uses: down(act(gate(x)) * up(x))."""

import jax
import jax.numpy as jnp

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def gated_mlp(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, act: str) -> jax.Array:
    """x: [T, D]; w_gate, w_up: [D, F]; w_down: [F, D] -> [T, D]."""
    gate = jnp.dot(x, w_gate)
    up = jnp.dot(x, w_up)
    return jnp.dot(ACTIVATIONS[act](gate) * up, w_down)
