"""Quantized weights: TensorRT-LLM's `QuantConfig` / `QuantAlgo`, and FP8 weights made and laid out.

`LLM(..., quant_config=QuantConfig(quant_algo=QuantAlgo.FP8, kv_cache_quant_algo=QuantAlgo.FP8))`
takes TensorRT-LLM's names. What jaxllm does with them:

  quant_algo FP8 (and FP8_PER_CHANNEL_PER_TOKEN, the same here): the seven projections of every
    layer (wq, wk, wv, wo, w_gate, w_up, w_down) are stored as float8 E4M3 with one float32 scale
    per output channel (`<name>_scale`, the projection's output axes), made from a bf16 / fp16 /
    fp32 checkpoint as each tensor loads (per channel: amax over the input axes / 448). The
    embeddings, the norms and the LM head stay in the model's dtype, as TensorRT-LLM keeps them.
    In the forward pass each projection's input is quantized per token (amax over its features /
    448, a scale per row, so a request's numbers do not depend on the rest of its batch) and the
    product of the two fp8 operands is accumulated in float32 (jaxllm/layers/linear.py).
  quant_algo W8A16: the same seven projections as int8 with a float32 scale per output channel
    (amax / 127), activations left in the model's dtype: the weight is widened to it inside the
    product (weight-only: a quarter of a float32 model's weight memory, half of a bf16 one's).
  quant_algo W4A16: the same as int4 (two weights a byte on the device: an eighth of float32's
    memory), with a scale per output channel and per group of `group_size` input channels (amax /
    7; round to nearest, no calibration), grouped along the projection's last input axis in groups
    of gcd(group_size, its size) (SmolLM2's 576 features: 64). Per output channel alone (TensorRT-
    LLM's W4A16) an int4 weight is too coarse for small models: top-1 agreement with bf16 0.56 on
    SmolLM2 (benchmarks/RESULTS.md); group-wise is how vLLM's and torchao's int4 weight-only work.
    With has_zero_point the groups are asymmetric, 16 levels from the group's minimum to its maximum
    (scale = (max - min) / 15), as GGUF's Q4_1 and AWQ store them, so a Q4_1 file's blocks are
    re-encoded exactly at group_size=32; kept as int4 q = level - 8 with w ~= q * scale + zero
    (zero = min + 8 * scale, `<name>_zero`).
  quant_algo W8A16_GPTQ: int8 weights in groups of `group_size` input channels, with offsets when
    has_zero_point (256 levels from the group's minimum), activations in the model's dtype: the
    layout of GPTQ's int8 checkpoints, and how a GGUF file's 5- to 8-bit blocks (Q5_0, Q5_1, Q5_K,
    Q6_K, Q8_0) are kept as they are (checkpoints/gguf.py). A float checkpoint is rounded to nearest
    per group: the format, not GPTQ's calibration.
  kv_cache_quant_algo FP8: the KV cache in float8 E4M3 (the same as kv_cache_config.dtype='fp8').

Other algorithms (group-wise AWQ / GPTQ, SmoothQuant, NVFP4, ...) are refused by name,
listing what is supported. The quantized parameters are described in models/params.py like any other
(their dtype and their scales' shapes and axes), so loading, sharding, saving and the abstract
pytree of a quantized model come from the same description as a float one's.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, List, Optional

import jax
import jax.numpy as jnp

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0  # E4M3's largest finite value (E4M3FN has no infinity: an overflowing cast is NaN)
# The layer projections a weight quantization applies to (models/params.py names), each with the
# number of its leading input axes (wo [H, hd, D]: two); the rest are output axes.
QUANTIZED_PARAMS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}
SCALE_SUFFIX = "_scale"
INPUT_SCALE_SUFFIX = "_input_scale"
ZERO_SUFFIX = "_zero"  # an asymmetric W4A16 group's offset


class QuantAlgo(enum.StrEnum):
    """TensorRT-LLM's quantization algorithms (tensorrt_llm.quantization.QuantAlgo), by name."""

    W8A16 = "W8A16"
    W4A16 = "W4A16"
    W4A16_AWQ = "W4A16_AWQ"
    W4A8_AWQ = "W4A8_AWQ"
    W8A16_GPTQ = "W8A16_GPTQ"
    W4A16_GPTQ = "W4A16_GPTQ"
    W8A8_SQ_PER_CHANNEL = "W8A8_SQ_PER_CHANNEL"
    W8A8_SQ_PER_TENSOR_PLUGIN = "W8A8_SQ_PER_TENSOR_PLUGIN"
    W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN = "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
    W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN = "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN"
    W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN = "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN"
    W4A8_QSERVE_PER_GROUP = "W4A8_QSERVE_PER_GROUP"
    W4A8_QSERVE_PER_CHANNEL = "W4A8_QSERVE_PER_CHANNEL"
    FP8 = "FP8"
    FP8_PER_CHANNEL_PER_TOKEN = "FP8_PER_CHANNEL_PER_TOKEN"
    FP8_BLOCK_SCALES = "FP8_BLOCK_SCALES"
    INT8 = "INT8"
    MIXED_PRECISION = "MIXED_PRECISION"
    NVFP4 = "NVFP4"
    W4A8_NVFP4_FP8 = "W4A8_NVFP4_FP8"
    W4A8_MXFP4_FP8 = "W4A8_MXFP4_FP8"
    W4A8_MXFP4_MXFP8 = "W4A8_MXFP4_MXFP8"
    W4A16_MXFP4 = "W4A16_MXFP4"
    NO_QUANT = "NO_QUANT"


# What jaxllm runs: weight algorithms -> the weight format a float checkpoint is quantized to as it
# loads (ModelConfig.quant_algo). With no calibration data, activations are scaled per token; a
# ModelOpt checkpoint brings FP8's calibrated static input scales itself (checkpoints/hf.py).
WEIGHT_ALGOS = {QuantAlgo.FP8: "FP8_PER_CHANNEL_PER_TOKEN", QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN: "FP8_PER_CHANNEL_PER_TOKEN",
                QuantAlgo.W8A16: "W8A16", QuantAlgo.W4A16: "W4A16", QuantAlgo.W8A16_GPTQ: "W8A16"}  # fmt: skip
# The algorithms whose scales are per group of `group_size` input channels (with has_zero_point: offsets too).
GROUPED_ALGOS = (QuantAlgo.W4A16, QuantAlgo.W8A16_GPTQ)
# ModelConfig.quant_algo's values: FP8 with per-channel weight scales and per-token activation
# scales; (a ModelOpt FP8 checkpoint's) per-tensor weight scales and a static per-tensor input
# scale; int8 or int4 weights with per-channel scales and float activations (weight-only).
WEIGHT_FORMATS = ("FP8_PER_CHANNEL_PER_TOKEN", "FP8", "W8A16", "W4A16")
# weight-only formats -> (stored dtype, largest magnitude a scale maps to); int4's -8 is never made
WEIGHT_ONLY_FORMATS = {"W8A16": (jnp.int8, 127.0), "W4A16": (jnp.int4, 7.0)}
# asymmetric groups' levels, stored from -levels / 2 (int4: -8 to 7; int8: -128 to 127)
ASYMMETRIC_LEVELS = {"W8A16": 256, "W4A16": 16}
WEIGHT_ONLY_DTYPES = tuple(jnp.dtype(dtype) for dtype, _ in WEIGHT_ONLY_FORMATS.values())
KV_CACHE_ALGOS = {QuantAlgo.FP8: "fp8"}  # -> kv_cache_config.dtype


def _algo(value, name: str, supported) -> Optional[QuantAlgo]:
    if value is None:
        return None
    try:
        algo = QuantAlgo(value.value if isinstance(value, enum.Enum) else str(value).upper())
    except ValueError:
        algo = None
    if algo == QuantAlgo.NO_QUANT:
        return None
    if algo not in supported:
        allowed = ", ".join(repr(a.value) for a in supported)
        raise ValueError(f"QuantConfig.{name}={value!r} is not supported by jaxllm; allowed: None, 'NO_QUANT', {allowed}")
    return algo


@dataclasses.dataclass
class QuantConfig:
    """TensorRT-LLM's `QuantConfig` (the LLM API's fields). jaxllm honours `quant_algo` (FP8,
    FP8_PER_CHANNEL_PER_TOKEN, W8A16, W4A16, W8A16_GPTQ), `kv_cache_quant_algo` (FP8),
    `exclude_modules` (fnmatch patterns over the Hugging Face module names of the layer projections
    left in the model's dtype: 'model.layers.0.self_attn.q_proj', '*.mlp.down_proj'; the LM head is
    never quantized) and, for W4A16 and W8A16_GPTQ, `group_size` (a power of two, 16 to 1024) and
    `has_zero_point`; the fields that tune other algorithms (smoothquant_val, ...) are accepted and
    must keep their defaults."""

    quant_algo: Optional[Any] = None
    kv_cache_quant_algo: Optional[Any] = None
    group_size: int = 128
    smoothquant_val: float = 0.5
    clamp_val: Optional[List[float]] = None
    use_meta_recipe: bool = False
    has_zero_point: bool = False
    pre_quant_scale: bool = False
    exclude_modules: Optional[List[str]] = None

    def __post_init__(self):
        self.quant_algo = _algo(self.quant_algo, "quant_algo", tuple(WEIGHT_ALGOS))
        self.kv_cache_quant_algo = _algo(self.kv_cache_quant_algo, "kv_cache_quant_algo", tuple(KV_CACHE_ALGOS))
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if self.quant_algo in GROUPED_ALGOS:
            g = self.group_size
            if not isinstance(g, int) or g < 16 or g > 1024 or g & (g - 1):
                raise ValueError(f"QuantConfig.group_size={g!r} is not supported for {self.quant_algo.value}; allowed: "
                                 "a power of two from 16 to 1024")  # fmt: skip
        excluded = self.exclude_modules
        if excluded is not None and (isinstance(excluded, str) or not all(isinstance(m, str) for m in excluded)):
            raise ValueError(f"QuantConfig.exclude_modules={excluded!r} is invalid; allowed: None or a list of module "
                             "name patterns ('model.layers.0.self_attn.q_proj', '*.mlp.down_proj', 'lm_head')")  # fmt: skip
        if excluded and self.quant_algo is None:
            raise ValueError(f"QuantConfig.exclude_modules={excluded!r} needs a quant_algo to exclude modules from")
        for name in ("group_size", "smoothquant_val", "clamp_val", "use_meta_recipe", "has_zero_point",
                     "pre_quant_scale"):  # fmt: skip
            if name in ("group_size", "has_zero_point") and self.quant_algo in GROUPED_ALGOS:
                continue
            if getattr(self, name) != defaults[name]:
                raise ValueError(f"QuantConfig.{name}={getattr(self, name)!r} is not supported: it tunes algorithms "
                                 f"jaxllm does not run; allowed: {defaults[name]!r}")  # fmt: skip

    @property
    def weight_format(self) -> Optional[str]:
        """ModelConfig.quant_algo a float checkpoint is quantized to ('FP8_PER_CHANNEL_PER_TOKEN'), or None."""
        return WEIGHT_ALGOS.get(self.quant_algo) if self.quant_algo is not None else None

    @property
    def weight_group_size(self) -> int:
        """ModelConfig.quant_group_size: group_size under W4A16 and W8A16_GPTQ, else 0 (a scale per
        output channel)."""
        return self.group_size if self.quant_algo in GROUPED_ALGOS else 0

    @property
    def weight_zero_point(self) -> bool:
        """ModelConfig.quant_zero_point: has_zero_point under W4A16 and W8A16_GPTQ (asymmetric groups)."""
        return bool(self.has_zero_point) and self.quant_algo in GROUPED_ALGOS

    def applied_to(self, cfg):
        """A float checkpoint's ModelConfig `cfg` with this config's weight format: quant_algo (the
        weight format), its groups and offsets, and the projections exclude_modules leaves float."""
        from jaxllm.checkpoints.names import excluded_projections

        return dataclasses.replace(cfg, quant_algo=self.weight_format, quant_group_size=self.weight_group_size,
                                   quant_zero_point=self.weight_zero_point,
                                   quant_exclude=excluded_projections(cfg, self.exclude_modules))  # fmt: skip

    @property
    def kv_cache_dtype(self) -> Optional[str]:
        """kv_cache_config.dtype this config asks for ('fp8'), or None."""
        return KV_CACHE_ALGOS.get(self.kv_cache_quant_algo) if self.kv_cache_quant_algo is not None else None

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for name in ("quant_algo", "kv_cache_quant_algo"):
            data[name] = data[name].value if data[name] is not None else None
        return data


def as_quant_config(value) -> Optional[QuantConfig]:
    """LLM(quant_config=...): a QuantConfig, its fields as a dict, or None."""
    if value is None or isinstance(value, QuantConfig):
        return value
    if isinstance(value, dict):
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(QuantConfig)})
        if unknown:
            raise TypeError(f"QuantConfig got unknown field(s) {unknown}; allowed: "
                            f"{', '.join(f.name for f in dataclasses.fields(QuantConfig))}")  # fmt: skip
        return QuantConfig(**value)
    raise TypeError(f"quant_config must be a QuantConfig, a dict or None, got {type(value).__name__}")


def base_config(cfg):
    """A ModelConfig's float twin (quant_algo None, no K/V cache scales): what a quantized model is
    made from."""
    if cfg.quant_algo is None and not cfg.kv_cache_scales:
        return cfg
    return dataclasses.replace(cfg, quant_algo=None, quant_group_size=0, quant_zero_point=False, kv_cache_scales=False,
                               quant_exclude=())  # fmt: skip


# ---- quantized weights -------------------------------------------------------------------------
def weight_dtype(quant_algo: str):
    """The dtype a quantized projection is stored in under `quant_algo`."""
    return WEIGHT_ONLY_FORMATS[quant_algo][0] if quant_algo in WEIGHT_ONLY_FORMATS else FP8_DTYPE


def absmax_scale(x: jax.Array, axes: tuple[int, ...], qmax: float, keepdims: bool = False) -> jax.Array:
    """float32 amax of |x| over `axes` / qmax: the scale that maps those values onto [-qmax, qmax]
    (1 where they are all zero, such as tensor parallelism's padding channels)."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axes, keepdims=keepdims)
    return jnp.where(amax > 0, amax / qmax, 1.0)


def is_quantized(path: str, quant_algo: Optional[str]) -> bool:
    """Whether the parameter at `path` ("layers.3.wq") is stored quantized under `quant_algo`."""
    return quant_algo is not None and path.rsplit(".", 1)[-1] in QUANTIZED_PARAMS


def quantizes(path: str, cfg) -> bool:
    """Whether cfg stores the parameter at `path` quantized: a layer projection under its quant_algo,
    unless cfg.quant_exclude leaves it in the model's dtype."""
    return is_quantized(path, cfg.quant_algo) and path not in cfg.quant_exclude


def quantize_int(w: jax.Array, num_input_axes: int, quant_algo: str = "W8A16",
                 group_size: int = 0) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """A projection weight [*in, *out] -> (int8 or int4 [*in, *out], float32 scale) under the
    weight-only `quant_algo` (W8A16, W4A16), w ~= q * scale: round to nearest, one scale per output
    channel (amax over the input axes / 127 or / 7; scale [*out]) or, with group_size, per output
    channel and group of the last input axis (scale_shape)."""
    dtype, qmax = WEIGHT_ONLY_FORMATS[quant_algo]
    if group_size:
        grouped = w.reshape(grouped_shape(w.shape, num_input_axes, group_size))
        scale = absmax_scale(grouped, (num_input_axes,), qmax, keepdims=True)
        q = jnp.clip(jnp.round(grouped.astype(jnp.float32) / scale), -qmax, qmax).astype(dtype)
        return q.reshape(w.shape), jnp.squeeze(scale, num_input_axes)
    scale = absmax_scale(w, tuple(range(num_input_axes)), qmax)
    return jnp.clip(jnp.round(w.astype(jnp.float32) / scale), -qmax, qmax).astype(dtype), scale


def quantize_int_asymmetric(w: jax.Array, num_input_axes: int, group_size: int,
                            quant_algo: str = "W4A16") -> tuple[jax.Array, ...]:  # fmt: skip
    """A projection weight [*in, *out] -> (int4 or int8 q [*in, *out], float32 scale, float32 zero),
    each scale / zero of `scale_shape`, w ~= q * scale + zero: per output channel and group of the
    last input axis, L levels (W4A16: 16, W8A16: 256) from the group's minimum (level 0,
    q = -L / 2) to its maximum, scale (max - min) / (L - 1) (1 for a constant group),
    zero = min + L / 2 * scale."""
    levels_n = ASYMMETRIC_LEVELS[quant_algo]
    grouped = w.reshape(grouped_shape(w.shape, num_input_axes, group_size)).astype(jnp.float32)
    lo = jnp.min(grouped, axis=num_input_axes, keepdims=True)
    hi = jnp.max(grouped, axis=num_input_axes, keepdims=True)
    scale = jnp.where(hi > lo, (hi - lo) / (levels_n - 1), 1.0)
    levels = jnp.clip(jnp.round((grouped - lo) / scale), 0, levels_n - 1)
    q = (levels - levels_n // 2).astype(weight_dtype(quant_algo))
    zero = lo + (levels_n // 2) * scale
    return q.reshape(w.shape), jnp.squeeze(scale, num_input_axes), jnp.squeeze(zero, num_input_axes)


def group_of(extent: int, group_size: int) -> int:
    """The input channels a scale covers along an axis of `extent` under `group_size`."""
    return math.gcd(extent, group_size)


def grouped_shape(shape: tuple, num_input_axes: int, group_size: int) -> tuple:
    """A weight's shape [*in, *out] with its last input axis split into (groups, group)."""
    n = num_input_axes - 1
    g = group_of(shape[n], group_size)
    return tuple(shape[:n]) + (shape[n] // g, g) + tuple(shape[n + 1 :])


def scale_shape(shape: tuple, num_input_axes: int, group_size: int) -> tuple:
    """The scale of a weight of `shape` [*in, *out]: [*out] per output channel (group_size 0), or
    [*in[:-1], groups, *out] per group along the last input axis."""
    if not group_size:
        return tuple(shape[num_input_axes:])
    grouped = grouped_shape(shape, num_input_axes, group_size)
    return grouped[:num_input_axes] + grouped[num_input_axes + 1 :]


def quantize_fp8(w: jax.Array, num_input_axes: int) -> tuple[jax.Array, jax.Array]:
    """A projection weight [*in, *out] -> (float8 E4M3 [*in, *out], float32 scale [*out]) with
    w ~= q * scale: one scale per output channel, amax over the input axes / 448 (1 for an all-zero
    channel, such as tensor parallelism's padding). Jittable; under a mesh the amax is reduced
    across the shards of the input axes, so a channel's scale is the same at every TP size."""
    scale = absmax_scale(w, tuple(range(num_input_axes)), FP8_MAX)
    return jnp.clip(w.astype(jnp.float32) / scale, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE), scale


# The functions below take the model's config `cfg` (a config.ModelConfig; not imported here, since
# config imports this module) for its weight format: quant_algo, quant_group_size, quant_zero_point.
def quantized_paths(path: str, cfg) -> list[str]:
    """The params one layer projection becomes under cfg's weight format (what `quantize_path` returns)."""
    extra = [path + INPUT_SCALE_SUFFIX] if cfg.quant_algo == "FP8" else [path + ZERO_SUFFIX] if cfg.quant_zero_point else []
    return [path, path + SCALE_SUFFIX] + extra


def quantize_path(path: str, w: jax.Array, cfg) -> dict[str, jax.Array]:
    """{path: the quantized weight, path + "_scale": its scales} for one layer projection under
    cfg's weight format (jittable); with asymmetric W4A16 groups also path + "_zero", their offsets;
    under "FP8" also path + "_input_scale" = 1 (no calibration data: dummy weights' activations are
    O(1))."""
    num_input_axes = QUANTIZED_PARAMS[path.rsplit(".", 1)[-1]]
    if cfg.quant_zero_point:
        q, scale, zero = quantize_int_asymmetric(w, num_input_axes, cfg.quant_group_size, cfg.quant_algo)
        return {path: q, path + SCALE_SUFFIX: scale, path + ZERO_SUFFIX: zero}
    if cfg.quant_algo in WEIGHT_ONLY_FORMATS:
        q, scale = quantize_int(w, num_input_axes, cfg.quant_algo, cfg.quant_group_size)
    else:
        q, scale = quantize_fp8(w, num_input_axes)
    out = {path: q, path + SCALE_SUFFIX: scale}
    if cfg.quant_algo == "FP8":
        out[path + INPUT_SCALE_SUFFIX] = jnp.ones((), jnp.float32)
    return out


@dataclasses.dataclass(frozen=True)
class IntGroups:
    """A layer projection read already in a grouped weight-only layout, asymmetric groups of the last
    input axis (a GGUF file's blocks as they are: jaxllm/checkpoints/gguf.py), in params layout: q
    [*in, *out] int8 on the host (in [-8, 7] for W4A16), scale and zero float32 of `scale_shape`,
    w = q * scale + zero. A checkpoint form of what `quantize_path` makes from a float weight."""

    q: Any
    scale: Any
    zero: Any

    def params(self, path: str, cfg) -> dict:
        """{path: q as cfg stores it (int4 / int8), path + "_scale": scale[, path + "_zero": zero]}
        under cfg's grouped config (a symmetric one, quant_zero_point False, takes only blocks whose
        offsets are all zero)."""
        q = self.q.astype(weight_dtype(cfg.quant_algo))
        return dict(zip(quantized_paths(path, cfg), (q, self.scale, self.zero)))


def quantize_flat(flat: dict, cfg) -> dict:
    """A flat params dict ("layers.3.wq" -> array, models/params.py:flatten_paths) with its layer
    projections quantized under cfg's weight format (none: unchanged)."""
    out = {}
    for path, w in flat.items():
        out.update(quantize_path(path, w, cfg) if quantizes(path, cfg) else {path: w})
    return out
