"""The one description of a model's parameters and of its KV cache, and what is derived from them.

Every parameter is described once (shape, logical axes, initializer) by `param_specs`; the abstract
pytree (`abstract_params`), random weights (`init_params`, for `load_format="dummy"` and tests) and
the shardings (jaxllm/sharding.py) all come from that description, and the checkpoint loaders check
every tensor they produce against it. The KV cache is described the same way (`kv_cache_specs`):
its abstract value (`abstract_of`), zeros (`zeros_of`) and shardings derive from it.

Pytree layout (all families):
  embed       [vocab, embed]
  final_norm  [embed]
  lm_head     [embed, vocab]                      (absent when embeddings are tied)
  layers      list, one dict per layer:
    attn_norm [embed]
    wq [embed, q_heads, head_dim]   wk, wv [embed, kv_heads, head_dim]   wo [q_heads, head_dim, embed]
    bq [q_heads, head_dim]  bk, bv [kv_heads, head_dim]                  (attention_bias)
    bo [embed]                                                           (attention_out_bias)
    q_norm, k_norm [head_dim]                                            (qk_norm)
    post_attn_norm, post_mlp_norm [embed]                                (sandwich_norm)
    mlp_norm [embed]
    w_gate, w_up [embed, ffw]   w_down [ffw, embed]
    <projection>_scale [its output axes] float32                        (quant_algo set)
      (W4A16: [its input axes, the last in groups, its output axes])
    <projection>_zero [as its scale] float32                             (W4A16 with has_zero_point)
    <projection>_input_scale [] float32                                  (quant_algo "FP8")
    k_scale, v_scale [] float32                                          (kv_cache_scales: ModelOpt)
With a quant_algo the seven projections are float8 E4M3 (int8 / int4 under "W8A16" / "W4A16"), each with a scale per
output channel, and with "FP8" a calibrated static scale of its input (jaxllm/quantization.py); the
rest keeps the model's dtype, as do the projections cfg.quant_exclude names ("layers.3.wv").
The engine on one device serves the fused layout (`fuse_params`): per layer
    wqkv [embed, kv_heads, q_per_kv + 2, head_dim]   (each KV head's query heads, then its k and v)
    w_gate_up [embed, 2, ffw]                        (gate, then up)
in place of wq, wk, wv and w_gate, w_up (with their scales, offsets and input scales alike; a group
stored two ways in one layer by quant_exclude stays apart), so a layer runs two products where it
ran five (benchmarks/RESULTS.md "Fused projections"). On one device and under a mesh (where the
projections stay apart) each float8 weight, and on GPUs each of W8A16's int8 and W4A16's int4 ones,
is stored with its input axes last, `<projection>_t` [*out, *in] (wo_t [embed, q_heads, head_dim];
the layout the GPU's GEMMs read fastest: layers/linear.py TRANSPOSED_SUFFIX, stores_input_last;
`transpose_params`; their scales keep the checkpoint's layout). The model code takes either layout
(models/transformer.py) and `unfuse_params` gives the checkpoint's back.
Layers are a list, not a stacked array: the jitted step unrolls them, which lets XLA update each
layer's KV pages in place (a scan over stacked layers copies them; see ../shared/GPU.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.layers.linear import (INPUT_AXES, TRANSPOSED_SUFFIX, stores_input_last, transpose_input_first,
                                  transpose_input_last)  # fmt: skip
from jaxllm.quantization import (INPUT_SCALE_SUFFIX, QUANTIZED_PARAMS, SCALE_SUFFIX, base_config,
                                 quantize_flat, quantized_paths, quantizes, ZERO_SUFFIX, scale_shape,
                                 weight_dtype)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis names, mapped onto the mesh by jaxllm/sharding.py
    init: str = "normal"  # normal | ones | zeros
    dtype: Any = None  # None: the dtype the caller gives (the weights', the KV cache's)


def _norm_spec(cfg: ModelConfig, size: int, axis: str = "norm") -> ParamSpec:
    return ParamSpec((size,), (axis,), "zeros" if cfg.norm_offset else "ones")


def layer_specs(cfg: ModelConfig, index: int | None = None) -> dict:
    """The parameters of decoder layer `index` (every layer has the same, but for projections that
    cfg.quant_exclude leaves unquantized; None: a layer with none left out)."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    H, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    layer = {
        "attn_norm": _norm_spec(cfg, D),
        "wq": ParamSpec((D, H, hd), ("embed", "q_heads", "head_dim")),
        "wk": ParamSpec((D, K, hd), ("embed", "kv_heads", "head_dim")),
        "wv": ParamSpec((D, K, hd), ("embed", "kv_heads", "head_dim")),
        "wo": ParamSpec((H, hd, D), ("q_heads", "head_dim", "embed")),
        "mlp_norm": _norm_spec(cfg, D),
        "w_gate": ParamSpec((D, F), ("embed", "ffw")),
        "w_up": ParamSpec((D, F), ("embed", "ffw")),
        "w_down": ParamSpec((F, D), ("ffw", "embed")),
    }
    if cfg.attention_bias:
        layer["bq"] = ParamSpec((H, hd), ("q_heads", "head_dim"), "zeros")
        layer["bk"] = ParamSpec((K, hd), ("kv_heads", "head_dim"), "zeros")
        layer["bv"] = ParamSpec((K, hd), ("kv_heads", "head_dim"), "zeros")
    if cfg.attention_out_bias:
        layer["bo"] = ParamSpec((D,), ("norm",), "zeros")
    if cfg.qk_norm:
        layer["q_norm"] = _norm_spec(cfg, hd, "head_dim")
        layer["k_norm"] = _norm_spec(cfg, hd, "head_dim")
    if cfg.sandwich_norm:
        layer["post_attn_norm"] = _norm_spec(cfg, D)
        layer["post_mlp_norm"] = _norm_spec(cfg, D)
    if cfg.quant_algo is not None:
        for name, n_in in QUANTIZED_PARAMS.items():
            if index is not None and f"layers.{index}.{name}" in cfg.quant_exclude:
                continue
            spec = layer[name]
            layer[name] = dataclasses.replace(spec, dtype=weight_dtype(cfg.quant_algo))
            # per output channel: the output axes; per group (W4A16): the weight's axes, the last
            # input axis counting groups
            axes = spec.axes[n_in:] if not cfg.quant_group_size else spec.axes
            shape = scale_shape(spec.shape, n_in, cfg.quant_group_size)
            layer[name + SCALE_SUFFIX] = ParamSpec(shape, axes, "ones", jnp.float32)
            if cfg.quant_zero_point:
                layer[name + ZERO_SUFFIX] = ParamSpec(shape, axes, "zeros", jnp.float32)
            if cfg.quant_algo == "FP8":
                layer[name + INPUT_SCALE_SUFFIX] = ParamSpec((), (), "ones", jnp.float32)
    if cfg.kv_cache_scales:
        layer["k_scale"] = ParamSpec((), (), "ones", jnp.float32)
        layer["v_scale"] = ParamSpec((), (), "ones", jnp.float32)
    return layer


def _global_specs(cfg: ModelConfig) -> dict:
    """The parameters outside the layers: embeddings, final norm, LM head."""
    D, V = cfg.hidden_size, cfg.param_vocab_size
    specs = {"embed": ParamSpec((V, D), ("vocab", "embed")), "final_norm": _norm_spec(cfg, D)}
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((D, V), ("embed", "vocab"))
    return specs


def param_specs(cfg: ModelConfig) -> dict:
    return {**_global_specs(cfg), "layers": [layer_specs(cfg, i) for i in range(cfg.num_layers)]}


def kv_cache_specs(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple[list, ParamSpec]:
    """The KV cache: per layer (k_pages, v_pages), each [kv_heads, num_pages, page_size, head_dim] (a
    (head, page) tile contiguous: models/transformer.py), and token_pages [num_pages, page_size]
    int32, the token id at each KV slot; all zeros. Page 0 is the null page padding writes to."""
    pages = ParamSpec((cfg.num_kv_heads, num_pages, page_size, cfg.head_dim),
                      ("kv_heads", "pages", "page_offset", "head_dim"), "zeros")  # fmt: skip
    token_pages = ParamSpec((num_pages, page_size), ("pages", "page_offset"), "zeros", jnp.int32)
    return [(pages, pages) for _ in range(cfg.num_layers)], token_pages


def abstract_of(specs, dtype, shardings=None):
    """`specs` as jax.ShapeDtypeStruct leaves (in `dtype` unless a spec names its own), with
    `shardings` (a pytree like `specs`) when given."""
    if shardings is None:
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype or dtype), specs, is_leaf=is_spec)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype or dtype, sharding=sh), specs,
                        shardings, is_leaf=is_spec)  # fmt: skip


def zeros_of(specs, dtype):
    """Zeros shaped like `specs` (in `dtype` unless a spec names its own)."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype or dtype), specs, is_leaf=is_spec)


def param_bytes(cfg: ModelConfig, dtype) -> int:
    """The bytes of every parameter in `dtype`, from the config alone: O(1) in the number of layers
    but for the layers cfg.quant_exclude names (LLM() checks it against the device's memory before
    building anything per layer)."""

    def total(specs: dict) -> int:
        return sum(math.prod(s.shape) * jnp.dtype(s.dtype or dtype).itemsize for s in specs.values())

    apart = sorted({int(path.split(".")[1]) for path in cfg.quant_exclude})
    return (total(_global_specs(cfg)) + (cfg.num_layers - len(apart)) * total(layer_specs(cfg))
            + sum(total(layer_specs(cfg, i)) for i in apart))  # fmt: skip


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def abstract_params(cfg: ModelConfig, dtype) -> dict:
    """The params pytree as jax.ShapeDtypeStruct leaves."""
    return abstract_of(param_specs(cfg), dtype)


def init_param(spec: ParamSpec, key: jax.Array, dtype, std: float = 0.02) -> jax.Array:
    if spec.init == "ones":
        return jnp.ones(spec.shape, dtype)
    if spec.init == "zeros":
        return jnp.zeros(spec.shape, dtype)
    return (std * jax.random.normal(key, spec.shape, jnp.float32)).astype(dtype)


def checkpoint_only_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """The parameters a quantized checkpoint has beyond its float weights and what quantizing them
    makes (a ModelOpt FP8 checkpoint's per-layer K/V cache scales): path -> spec, each of fixed
    value (ones). Random weights (`init_params`, load_format='dummy') take them as their specs say."""
    made = set(flatten_paths(param_specs(base_config(cfg))))
    made |= {q for path in made if quantizes(path, cfg) for q in quantized_paths(path, cfg)}
    return {path: spec for path, spec in flatten_paths(param_specs(cfg)).items() if path not in made}


def param_keys(cfg: ModelConfig, key: jax.Array) -> dict[str, jax.Array]:
    """One random key per parameter path (what init_params draws each parameter from)."""
    paths = list(flatten_paths(param_specs(cfg)))
    return dict(zip(paths, jax.random.split(key, len(paths))))


def init_params(cfg: ModelConfig, dtype, key: jax.Array, std: float = 0.02) -> dict:
    """Random weights with the right shapes (dummy loading for benchmarks; tests). A quantized
    config's are the float model's weights (the same key gives the same values), quantized."""
    base = base_config(cfg)
    keys = param_keys(base, key)
    flat = {path: init_param(spec, keys[path], dtype, std) for path, spec in flatten_paths(param_specs(base)).items()}
    flat = quantize_flat(flat, cfg)
    flat.update({path: init_param(spec, None, spec.dtype or dtype)
                 for path, spec in checkpoint_only_specs(cfg).items()})  # fmt: skip
    return unflatten_paths(flat, cfg)


# The fused projections (the engine's layout on one device) -> the projections each one holds.
FUSED_PROJECTIONS = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}
_FUSED_SUFFIXES = ("", SCALE_SUFFIX, ZERO_SUFFIX)  # a weight and what lies along its output axes


def _fused_sizes(cfg: ModelConfig, fused: str) -> tuple[int, ...]:
    """How many places of the fused axis each of its projections takes (q, k, v: G, 1, 1 per KV head)."""
    return (cfg.q_per_kv, 1, 1) if fused == "wqkv" else (1, 1)


def _fuse_tensors(cfg: ModelConfig, fused: str, parts: list):
    """Tensors of the projections in FUSED_PROJECTIONS[fused] (weights, or their scales or offsets:
    the projection's output axes last) -> one, with the fused axis second to last."""
    if fused == "wqkv":  # [..., X, d] -> [..., K, X / K, d]
        K = cfg.num_kv_heads
        parts = [p.reshape(p.shape[:-2] + (K, size) + p.shape[-1:]) for p, size in zip(parts, _fused_sizes(cfg, fused))]
    else:  # [..., F] -> [..., 1, F]
        parts = [p.reshape(p.shape[:-1] + (1,) + p.shape[-1:]) for p in parts]
    return jnp.concatenate(parts, axis=-2)


def split_fused(cfg: ModelConfig, fused: str, x) -> list:
    """Inverse of _fuse_tensors: a fused weight's tensors, or a fused product's output ([..., K,
    G + 2, d] -> q [..., H, d], k, v [..., K, d]), split into its projections'."""
    sizes = _fused_sizes(cfg, fused)
    parts = jnp.split(x, [sum(sizes[:i]) for i in range(1, len(sizes))], axis=-2)
    if fused == "wqkv":
        return [p.reshape(p.shape[:-3] + (p.shape[-3] * p.shape[-2], p.shape[-1])) for p in parts]
    return [p.reshape(p.shape[:-2] + p.shape[-1:]) for p in parts]


def _format(lp: dict, name: str) -> tuple:
    """How a layer's projection is stored: its weight's dtype and which scale tensors it has."""
    return (lp[name].dtype,) + tuple(name + suffix in lp for suffix in (SCALE_SUFFIX, ZERO_SUFFIX, INPUT_SCALE_SUFFIX))


def fuse_layer(lp: dict, cfg: ModelConfig) -> dict:
    """One layer's params in the fused layout (see the module docstring). FP8's calibrated input
    scales of the fused projections become their largest (the product's input is one tensor).
    Projections stored differently (one of them left unquantized by cfg.quant_exclude) stay apart.
    fp8 weights (on GPUs weight-only ones too) are then stored input axes last (transpose_layer)."""
    out = dict(lp)
    for fused, names in FUSED_PROJECTIONS.items():
        if len({_format(lp, name) for name in names}) > 1:  # stored differently (quant_exclude): kept apart
            continue
        for suffix in _FUSED_SUFFIXES:
            if names[0] + suffix in lp:
                out[fused + suffix] = _fuse_tensors(cfg, fused, [out.pop(name + suffix) for name in names])
        if names[0] + INPUT_SCALE_SUFFIX in lp:
            out[fused + INPUT_SCALE_SUFFIX] = functools.reduce(
                jnp.maximum, [out.pop(name + INPUT_SCALE_SUFFIX) for name in names])  # fmt: skip
    return transpose_layer(out)


def transposed(lp: dict) -> dict[str, int]:
    """The projections a layer's params store input axes last in the engine's layout (its float8
    weights, and on GPUs its int8 (a scale per channel) and int4 ones: layers/linear.py
    stores_input_last, TRANSPOSED_SUFFIX) -> their input axes."""
    return {name: n for name, n in INPUT_AXES.items()
            if name in lp and stores_input_last(lp[name], lp.get(name + SCALE_SUFFIX), n)}  # fmt: skip


def transpose_layer(lp: dict, names: dict[str, int] | None = None, transpose=transpose_input_last) -> dict:
    """One layer's params with the weights `transposed(lp)` names stored input axes last (`<name>_t`).
    `names` and `transpose` (default: `transposed(lp)`, the weights') let a layer's shardings follow
    its weights."""
    out = dict(lp)
    for name, num_input_axes in (transposed(lp) if names is None else names).items():
        out[name + TRANSPOSED_SUFFIX] = transpose(out.pop(name), num_input_axes)
    return out


def transpose_params(params: dict, shardings=None) -> dict:
    """The params pytree with every layer's `transposed` weights stored input axes last (transpose_layer):
    the engine's layout under a mesh, where the projections are not fused. `shardings` (the
    transposed layout's, jaxllm/sharding.py engine_param_shardings) place each layer's; its old
    arrays are let go layer by layer."""
    layers = list(params["layers"])
    for i, lp in enumerate(layers):
        if transposed(lp):
            out = None if shardings is None else shardings["layers"][i]
            layers[i] = transpose_layer(lp) if out is None else jax.jit(transpose_layer, out_shardings=out)(lp)
    return {**params, "layers": layers}


def unfuse_layer(lp: dict, cfg: ModelConfig) -> dict:
    """One layer's params in the checkpoint's layout (inverse of fuse_layer and transpose_layer; a
    fused input scale is given to each of its projections)."""
    lp = dict(lp)
    for name, num_input_axes in INPUT_AXES.items():
        if name + TRANSPOSED_SUFFIX in lp:
            lp[name] = transpose_input_first(lp.pop(name + TRANSPOSED_SUFFIX), num_input_axes)
    out = dict(lp)
    for fused, names in FUSED_PROJECTIONS.items():
        for suffix in _FUSED_SUFFIXES:
            if fused + suffix in lp:
                out.update(zip([name + suffix for name in names], split_fused(cfg, fused, out.pop(fused + suffix))))
        if fused + INPUT_SCALE_SUFFIX in lp:
            scale = out.pop(fused + INPUT_SCALE_SUFFIX)
            out.update({name + INPUT_SCALE_SUFFIX: scale for name in names})
    return out


def fuse_params(params: dict, cfg: ModelConfig, consume: bool = False) -> dict:
    """The params pytree with every layer fused (fuse_layer); the rest as it is. With `consume`,
    `params["layers"]` is emptied as its layers are fused, so that the model is in memory once plus
    one layer (the engine's load)."""
    layers = params["layers"]
    if not consume:
        return {**params, "layers": [fuse_layer(lp, cfg) for lp in layers]}
    fused = []
    for i in range(len(layers)):
        fused.append(fuse_layer(layers[i], cfg))
        layers[i] = None
    layers.clear()
    return {**params, "layers": fused}


def unfuse_params(params: dict, cfg: ModelConfig) -> dict:
    """The params pytree in the checkpoint's layout (each layer: unfuse_layer)."""
    return {**params, "layers": [unfuse_layer(lp, cfg) for lp in params["layers"]]}


def is_fused(params: dict) -> bool:
    """Whether a params pytree is in the fused layout (some layer holds a fused projection, or a
    weight stored input axes last)."""
    return any(name in lp for lp in params["layers"]
               for name in [*FUSED_PROJECTIONS, *(p + TRANSPOSED_SUFFIX for p in INPUT_AXES)])  # fmt: skip


def engine_abstract_params(cfg: ModelConfig, dtype, mesh=None) -> dict:
    """The params pytree the engine serves, as jax.ShapeDtypeStruct leaves (no shardings): fused on
    one device (checkpoints/loader.py:load_engine_params), the checkpoint's layout under a mesh; in
    both, the `transposed` weights stored input axes last."""
    abstract = abstract_params(cfg, dtype)
    if mesh is not None:
        return jax.eval_shape(transpose_params, abstract)
    return jax.eval_shape(functools.partial(fuse_params, cfg=cfg), abstract)


def flatten_paths(tree) -> dict[str, object]:
    """{"layers.3.wq": leaf, "embed": leaf, ...} for a params or specs pytree."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_spec)[0]:
        flat[".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)] = leaf
    return flat


def unflatten_paths(flat: dict[str, object], cfg: ModelConfig) -> dict:
    """Inverse of flatten_paths, shaped by `param_specs(cfg)`."""
    specs = param_specs(cfg)
    leaves_with_path = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)
    paths = [".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path) for path, _ in leaves_with_path[0]]
    return jax.tree.unflatten(leaves_with_path[1], [flat[p] for p in paths])
