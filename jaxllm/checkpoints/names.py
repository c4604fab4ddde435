"""Tensor names and layout changes between checkpoint files and the params pytree.

Every layout change lives here: Hugging Face linear weights are [out, in] and get transposed, head
dimensions are split out, llama.cpp's q/k row interleave is undone, Gemma's GGUF norms (stored as
1 + w) are shifted back. `TensorMapper` checks that each file tensor maps to exactly one parameter
of the right shape, and that nothing is missing, unmapped or duplicated. LoRA adapters of the layer
projections (PEFT's lora_A / lora_B) are laid out like the weights they adapt (`lora_to_params`, and
`lora_from_params` back).
"""

from __future__ import annotations

import math
import re
from typing import Callable

import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.models.family import Family
from jaxllm.models.params import flatten_paths, layer_specs, param_specs

Transform = Callable[[np.ndarray, ModelConfig], np.ndarray]


def _identity(w, cfg):
    return w


def _linear(w, cfg):  # [out, in] -> [in, out]
    return w.T


def _q_in(w, cfg):  # [H*hd, D] -> [D, H, hd]
    return w.T.reshape(w.shape[1], cfg.num_heads, cfg.head_dim)


def _kv_in(w, cfg):  # [K*hd, D] -> [D, K, hd]
    return w.T.reshape(w.shape[1], cfg.num_kv_heads, cfg.head_dim)


def _o_out(w, cfg):  # [D, H*hd] -> [H, hd, D] (a group scale [D, H*hd/g] -> [H, hd/g, D])
    return w.T.reshape(cfg.num_heads, -1, w.shape[0])


def _q_bias(b, cfg):
    return b.reshape(cfg.num_heads, cfg.head_dim)


def _kv_bias(b, cfg):
    return b.reshape(cfg.num_kv_heads, cfg.head_dim)


TRANSFORMS: dict[str, Transform] = {
    "identity": _identity,
    "linear": _linear,
    "q_in": _q_in,
    "kv_in": _kv_in,
    "o_out": _o_out,
    "q_bias": _q_bias,
    "kv_bias": _kv_bias,
}

# Our per-layer param -> (HF module path inside a layer, GGUF tensor stem, transform).
_LAYER_TENSORS = (
    ("wq", "self_attn.q_proj.weight", "attn_q.weight", "q_in"),
    ("wk", "self_attn.k_proj.weight", "attn_k.weight", "kv_in"),
    ("wv", "self_attn.v_proj.weight", "attn_v.weight", "kv_in"),
    ("wo", "self_attn.o_proj.weight", "attn_output.weight", "o_out"),
    ("bq", "self_attn.q_proj.bias", "attn_q.bias", "q_bias"),
    ("bk", "self_attn.k_proj.bias", "attn_k.bias", "kv_bias"),
    ("bv", "self_attn.v_proj.bias", "attn_v.bias", "kv_bias"),
    ("bo", "self_attn.o_proj.bias", "attn_output.bias", "identity"),
    ("q_norm", "self_attn.q_norm.weight", "attn_q_norm.weight", "identity"),
    ("k_norm", "self_attn.k_norm.weight", "attn_k_norm.weight", "identity"),
    ("w_gate", "mlp.gate_proj.weight", "ffn_gate.weight", "linear"),
    ("w_up", "mlp.up_proj.weight", "ffn_up.weight", "linear"),
    ("w_down", "mlp.down_proj.weight", "ffn_down.weight", "linear"),
)

# The input axes each matrix transform leaves in params layout (the rest are its output axes): the
# file's [out, in] weight is [product of the output axes, product of the input axes].
INPUT_AXES = {"linear": 1, "q_in": 1, "kv_in": 1, "o_out": 2}
# The decoder layer's projections (its matrices), in layer order, and their transforms.
_PROJECTION_TRANSFORMS = {param: transform for param, _, _, transform in _LAYER_TENSORS if transform in INPUT_AXES}
PROJECTIONS = tuple(_PROJECTION_TRANSFORMS)

# File tensors that carry nothing the model needs (buffers some exporters saved).
HF_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def _file_names(cfg: ModelConfig, top: dict, layer_prefix: str, column: int, norms) -> dict[str, tuple[str, str]]:
    """{file tensor name: (param path, transform)}: `top` for the tensors outside the layers, then
    each layer's from column `column` of _LAYER_TENSORS (1: HF, 2: GGUF) and its `norms`."""
    wanted = flatten_paths(param_specs(cfg))
    names = dict(top)
    for i in range(cfg.num_layers):
        prefix = layer_prefix.format(i)
        for row in _LAYER_TENSORS:
            names[prefix + row[column]] = (f"layers.{i}.{row[0]}", row[3])
        for param, module in norms:
            names[prefix + module + ".weight"] = (f"layers.{i}.{param}", "identity")
    return {k: v for k, v in names.items() if v[0] in wanted}


def hf_names(cfg: ModelConfig, family: Family) -> dict[str, tuple[str, str]]:
    """{HF tensor name: (param path, transform)} for every parameter of `cfg`; with cfg.quant_algo,
    a ModelOpt checkpoint's (`quantized_hf_names`)."""
    top = {"model.embed_tokens.weight": ("embed", "identity"), "model.norm.weight": ("final_norm", "identity"),
           "lm_head.weight": ("lm_head", "linear")}  # fmt: skip
    return {**_file_names(cfg, top, "model.layers.{}.", 1, family.hf_layer_norms), **quantized_hf_names(cfg)}


# A ModelOpt FP8 checkpoint's scale tensors beside each projection's float8 `weight`: `weight_scale`
# (per tensor [], or per output channel [out] / [out, 1]) and, for FP8, the calibrated static
# `input_scale` []; a checkpoint calibrated for an FP8 KV cache, each layer's `k_scale` / `v_scale`
# [] (beside k_proj / v_proj, or on self_attn), which the fp8 cache divides K and V by
# (models/transformer.py); without that calibration they are read past (scale 1).
MODELOPT_KV_SCALES = re.compile(r".*\.(k_proj\.k_scale|v_proj\.v_scale|k_scale|v_scale)$")


def quantized_hf_names(cfg: ModelConfig) -> dict[str, tuple[str, str]]:
    """{HF tensor name: (param path, transform)} of a ModelOpt checkpoint's scales (none without
    cfg.quant_algo)."""
    if cfg.quant_algo is None:
        return {}
    names = {}
    for i in range(cfg.num_layers):
        for param, hf_name, _, transform in _LAYER_TENSORS:
            if transform not in INPUT_AXES or f"layers.{i}.{param}" in cfg.quant_exclude:  # (excluded: float)
                continue
            module = f"model.layers.{i}." + hf_name.removesuffix(".weight")
            names[module + ".weight_scale"] = (f"layers.{i}.{param}_scale", "weight_scale")
            if cfg.quant_algo == "FP8":
                names[module + ".input_scale"] = (f"layers.{i}.{param}_input_scale", "input_scale")
        if cfg.kv_cache_scales:  # either name a ModelOpt export uses
            for kv in "kv":
                for name in (f"self_attn.{kv}_proj.{kv}_scale", f"self_attn.{kv}_scale"):
                    names[f"model.layers.{i}.{name}"] = (f"layers.{i}.{kv}_scale", "input_scale")
    return names


def gguf_names(cfg: ModelConfig, family: Family) -> dict[str, tuple[str, str]]:
    """{GGUF tensor name: (param path, transform)}; GGUF tensors are first read in HF layout."""
    top = {"token_embd.weight": ("embed", "identity"), "output_norm.weight": ("final_norm", "identity"),
           "output.weight": ("lm_head", "linear")}  # fmt: skip
    return _file_names(cfg, top, "blk.{}.", 2, family.gguf_layer_norms)


def hf_module(param: str) -> tuple[str, str]:
    """(parent, module) of a layer projection in a Hugging Face decoder layer: ('self_attn', 'q_proj') for wq."""
    hf_name = next(hf for name, hf, _, _ in _LAYER_TENSORS if name == param and param in _PROJECTION_TRANSFORMS)
    parent, module, _ = hf_name.split(".")
    return parent, module


def hf_module_name(param_path: str) -> str:
    """A layer projection's Hugging Face module name: "layers.3.wv" -> "model.layers.3.self_attn.v_proj"."""
    _, layer, param = param_path.split(".")
    return f"model.layers.{layer}.{'.'.join(hf_module(param))}"


def excluded_projections(cfg: ModelConfig, patterns) -> tuple[str, ...]:
    """QuantConfig.exclude_modules -> ModelConfig.quant_exclude: the param paths ("layers.3.wv") of
    the layer projections whose Hugging Face module name ("model.layers.3.self_attn.v_proj") one of
    the fnmatch `patterns` matches.

    Raises:
      ValueError: a pattern that matches no layer projection (nor the LM head, never quantized).
    """
    import fnmatch

    paths = (f"layers.{i}.{param}" for i in range(cfg.num_layers) for param in PROJECTIONS)
    modules = {hf_module_name(path): path for path in paths}
    excluded = set()
    for pattern in patterns or ():
        matched = fnmatch.filter(modules, pattern)
        if not matched and not fnmatch.fnmatch("lm_head", pattern):
            raise ValueError(f"QuantConfig.exclude_modules pattern {pattern!r} matches no layer projection of this "
                             f"model; allowed: patterns over names like 'model.layers.0.self_attn.q_proj', "
                             f"'model.layers.0.mlp.down_proj' (0..{cfg.num_layers - 1}), or 'lm_head'")  # fmt: skip
        excluded.update(modules[m] for m in matched)
    return tuple(sorted(excluded, key=lambda p: (int(p.split(".")[1]), PROJECTIONS.index(p.split(".")[2]))))


def num_input_axes(param: str) -> int:
    """How many of a layer projection's axes in params layout are input axes (wo [H, hd, D]: two)."""
    return INPUT_AXES[_PROJECTION_TRANSFORMS[param]]


def _projection_axes(cfg: ModelConfig, param: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    shape = layer_specs(cfg)[param].shape
    n = num_input_axes(param)
    return shape[:n], shape[n:]


def lora_file_shapes(cfg: ModelConfig, param: str, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The shapes of a rank-`rank` LoRA pair of a layer projection as PEFT saves it: lora_A [r, in],
    lora_B [out, r], in and out the sides of the projection's file weight [out, in]."""
    in_axes, out_axes = _projection_axes(cfg, param)
    return (rank, math.prod(in_axes)), (math.prod(out_axes), rank)


def lora_to_params(cfg: ModelConfig, param: str, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A LoRA pair of a layer projection, lora_A [r, in] and lora_B [out, r], in params layout:
    A [*input axes, r] and B [r, *output axes], the projection's own axes (wq: A [D, r], B [r, H, hd];
    wo: A [H, hd, r], B [r, D]), so the tensor-parallel plan lays each out as it lays out the weight."""
    in_axes, out_axes = _projection_axes(cfg, param)
    rank = a.shape[0]
    return np.ascontiguousarray(a.T.reshape(*in_axes, rank)), np.ascontiguousarray(b.T.reshape(rank, *out_axes))


def lora_from_params(cfg: ModelConfig, param: str, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `lora_to_params`: A [*input axes, r] and B [r, *output axes] of a layer
    projection -> PEFT's lora_A [r, in] and lora_B [out, r]."""
    in_axes, out_axes = _projection_axes(cfg, param)
    n_in = len(in_axes)
    if tuple(a.shape[:n_in]) != tuple(in_axes) or a.ndim != n_in + 1:
        raise ValueError(f"LoRA A of {param} has shape {tuple(a.shape)}; this model needs {(*in_axes, 'r')}")
    rank = a.shape[-1]
    if tuple(b.shape) != (rank, *out_axes):
        raise ValueError(f"LoRA B of {param} has shape {tuple(b.shape)}; with A of rank {rank} this model needs "
                         f"{(rank, *out_axes)}")  # fmt: skip
    return (np.ascontiguousarray(a.reshape(math.prod(in_axes), rank).T),
            np.ascontiguousarray(b.reshape(rank, math.prod(out_axes)).T))  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint that does not match its config: missing, unmapped, duplicate or misshapen tensors."""


class TensorMapper:
    """Maps file tensors onto param paths once each, checking names and shapes.

    Args:
      cfg: the model config; expected shapes come from `param_specs(cfg)`.
      names: {file tensor name: (param path, transform)}.
      source: what is being read, for error messages.
      ignore: file tensor names that may be present and are skipped (for instance a tied lm_head).
      only: a predicate on param paths: a partial read of those alone (`selects`), whose `finish`
        checks nothing missing.
    """

    def __init__(self, cfg: ModelConfig, names: dict[str, tuple[str, str]], source: str, ignore=(), only=None):
        self.cfg = cfg
        self.names = names
        self.source = source
        self.ignore = set(ignore)
        self.only = only
        self.shapes = {p: s.shape for p, s in flatten_paths(param_specs(cfg)).items()}
        self.done: dict[str, str] = {}

    def selects(self, file_name: str) -> bool:
        """Whether a file tensor is read at all: every one, or under `only` those of the params it names."""
        return self.only is None or (file_name in self.names and self.only(self.names[file_name][0]))

    def wants(self, file_name: str) -> bool:
        """True if the tensor maps to a parameter; False if it may be skipped; raises if unmapped."""
        if file_name in self.names:
            return True
        if file_name in self.ignore or HF_IGNORED.match(file_name) or (
                self.cfg.quant_algo is not None and not self.cfg.kv_cache_scales and MODELOPT_KV_SCALES.match(file_name)):  # fmt: skip
            return False
        raise CheckpointError(f"{self.source}: tensor {file_name!r} does not map to any parameter of this model")

    def convert(self, file_name: str, array: np.ndarray) -> tuple[str, np.ndarray]:
        """(param path, array in params layout) for a file tensor; checks duplicates and shape."""
        path, transform = self.names[file_name]
        if path in self.done:
            raise CheckpointError(
                f"{self.source}: parameter {path} is given twice ({self.done[path]!r} and {file_name!r})"
            )
        if transform in ("weight_scale", "input_scale"):
            self.done[path] = file_name
            return path, self._scale(file_name, path, transform, array)
        expected_in = self._expected_file_shape(path, transform)
        if tuple(array.shape) != expected_in:
            raise CheckpointError(
                f"{self.source}: tensor {file_name!r} has shape {tuple(array.shape)}, "
                f"but the config needs {expected_in}"
            )
        self.done[path] = file_name
        return path, TRANSFORMS[transform](array, self.cfg)

    def transform(self, file_name: str, array: np.ndarray) -> np.ndarray:
        """A file tensor that lies along a mapped one's rows (a block-quantized weight's group scales,
        [out, in / group]) in params layout, as that tensor's transform lays it out."""
        return TRANSFORMS[self.names[file_name][1]](array, self.cfg)

    def _scale(self, file_name: str, path: str, transform: str, array: np.ndarray) -> np.ndarray:
        """A scale tensor in params layout (float32): a weight scale per tensor broadcast to the
        projection's output axes, or one per output channel reshaped to them; an input (or KV
        cache) scale []."""
        shape = self.shapes[path]
        sizes = (1,) if transform == "input_scale" else (1, math.prod(shape))
        if array.size not in sizes:
            raise CheckpointError(f"{self.source}: tensor {file_name!r} has shape {tuple(array.shape)}; a "
                                  f"{transform} of this projection holds {' or '.join(map(str, sizes))} values")  # fmt: skip
        array = np.asarray(array, np.float32)
        return np.broadcast_to(array.reshape(()) if array.size == 1 else array.reshape(shape), shape).copy()

    def finish(self) -> None:
        if self.only is not None:  # a partial read
            return
        missing = sorted(set(self.shapes) - set(self.done))
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise CheckpointError(f"{self.source}: missing tensors for {shown}")

    def _expected_file_shape(self, path: str, transform: str) -> tuple[int, ...]:
        shape = self.shapes[path]
        if transform == "linear":
            return (shape[1], shape[0])
        if transform in ("q_in", "kv_in"):
            return (shape[1] * shape[2], shape[0])
        if transform == "o_out":
            return (shape[2], shape[0] * shape[1])
        if transform in ("q_bias", "kv_bias"):
            return (shape[0] * shape[1],)
        return shape
