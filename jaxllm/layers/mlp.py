"""The gated feed-forward block every supported family uses: down(act(gate(x)) * up(x))."""

from typing import Callable

import jax

from jaxllm.layers.linear import holds, project

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def gated_mlp(x: jax.Array, lp: dict, act: str,
              adapt: Callable[[str, jax.Array, jax.Array], jax.Array] | None = None,
              weight_only_rows: int = 0) -> jax.Array:  # fmt: skip
    """x: [T, D] -> [T, D] through the layer params' w_gate, w_up [D, F] (or both as one product:
    w_gate_up [D, 2, F], models/params.py) and w_down [F, D] (each a float or a quantized
    projection: layers/linear.py).

    adapt(name, input, output) -> output adds a LoRA delta to the w_gate / w_up / w_down outputs;
    weight_only_rows: as layers/linear.py:project's.
    """
    adapt = adapt or (lambda name, h, y: y)
    if holds(lp, "w_gate_up"):
        gate_up = project(lp, "w_gate_up", x, weight_only_rows)  # [T, 2, F]
        gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
    else:
        gate, up = project(lp, "w_gate", x, weight_only_rows), project(lp, "w_up", x, weight_only_rows)
    gate, up = adapt("w_gate", x, gate), adapt("w_up", x, up)
    hidden = ACTIVATIONS[act](gate) * up
    return adapt("w_down", hidden, project(lp, "w_down", hidden, weight_only_rows))
