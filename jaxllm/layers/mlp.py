"""The gated feed-forward block every supported family uses: down(act(gate(x)) * up(x))."""

from typing import Callable

import jax
import jax.numpy as jnp

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def gated_mlp(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, act: str,
              adapt: Callable[[str, jax.Array, jax.Array], jax.Array] | None = None) -> jax.Array:  # fmt: skip
    """x: [T, D]; w_gate, w_up: [D, F]; w_down: [F, D] -> [T, D].

    adapt(name, input, output) -> output adds a LoRA delta to the w_gate / w_up / w_down outputs.
    """
    adapt = adapt or (lambda name, h, y: y)
    gate = adapt("w_gate", x, jnp.dot(x, w_gate))
    up = adapt("w_up", x, jnp.dot(x, w_up))
    hidden = ACTIVATIONS[act](gate) * up
    return adapt("w_down", hidden, jnp.dot(hidden, w_down))
