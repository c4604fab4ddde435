"""The gated feed-forward block every supported family uses: down(act(gate(x)) * up(x))."""

from typing import Callable

import jax

from jaxllm.layers.linear import project

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def gated_mlp(x: jax.Array, lp: dict, act: str,
              adapt: Callable[[str, jax.Array, jax.Array], jax.Array] | None = None,
              weight_only_rows: int = 0) -> jax.Array:  # fmt: skip
    """x: [T, D] -> [T, D] through the layer params' w_gate, w_up [D, F] and w_down [F, D] (each a
    float or an FP8 projection: layers/linear.py).

    adapt(name, input, output) -> output adds a LoRA delta to the w_gate / w_up / w_down outputs;
    weight_only_rows: as layers/linear.py:project's.
    """
    adapt = adapt or (lambda name, h, y: y)
    gate = adapt("w_gate", x, project(lp, "w_gate", x, weight_only_rows))
    up = adapt("w_up", x, project(lp, "w_up", x, weight_only_rows))
    hidden = ACTIVATIONS[act](gate) * up
    return adapt("w_down", hidden, project(lp, "w_down", hidden, weight_only_rows))
