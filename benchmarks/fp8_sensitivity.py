"""Which FP8 projections cost real SmolLM2 / Gemma 3 their agreement with bf16 (CPU): one projection
kind, or a few layers, kept in bf16 (quant_exclude) at a time. An experiment, kept in git history:
nothing it tried came near 0.99 (benchmarks/RESULTS.md, 2026-12-07).

    PYTHONPATH=$PWD:$PWD/tests python benchmarks/fp8_sensitivity.py smollm2|gemma3-270m
"""
import dataclasses
import sys

import jax
import jax.numpy as jnp
from test_real_models import _bf16_reference, _FORWARD
from jaxllm.models.params import flatten_paths, unflatten_paths
from jaxllm.quantization import quantize_flat, QUANTIZED_PARAMS
name = sys.argv[1]
resolved, cfg, tokens, valid, params, ref = _bf16_reference(name)
top = jnp.argmax(ref, -1)
flat = flatten_paths(params)
def run(label, exclude=(), algo="FP8_PER_CHANNEL_PER_TOKEN"):
    c = dataclasses.replace(cfg, quant_algo=algo, quant_exclude=tuple(exclude))
    p = unflatten_paths(quantize_flat(flat, c), c)
    got = jax.nn.log_softmax(_FORWARD(p, jnp.asarray(tokens), c, jnp.asarray(valid)), -1)
    agree = float((top == jnp.argmax(got, -1))[valid].mean())
    delta = float(jnp.abs(jnp.take_along_axis(ref - got, top[..., None], -1))[..., 0][valid].mean())
    print(f"{label:40s} agree {agree:.3f} delta {delta:.3f}", flush=True)
L = cfg.num_layers
run("all fp8")
for proj in QUANTIZED_PARAMS:
    run(f"{proj} kept", [f"layers.{i}.{proj}" for i in range(L)])
for layers in ([0], [L-1], [0, L-1], [0,1,L-2,L-1]):
    run(f"layers {layers} kept", [f"layers.{i}.{p}" for i in layers for p in QUANTIZED_PARAMS])
