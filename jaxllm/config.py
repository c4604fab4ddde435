"""Model configuration: one frozen dataclass for every supported family, and dtype names.

`ModelConfig` is what the pure model functions take as their static configuration. It is built
from a Hugging Face config (parsed by transformers, so legacy `rope_scaling` and v5
`rope_parameters` files both work) or from GGUF metadata (which the GGUF reader first turns into
the same Hugging Face config dictionary). Family-specific reading lives in `jaxllm/models/`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax.numpy as jnp

from jaxllm.quantization import QUANTIZED_PARAMS, WEIGHT_FORMATS

DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


def resolve_dtype(name: Any, checkpoint_dtype: str | None = None) -> jnp.dtype:
    """Turn a user's dtype argument into a JAX dtype.

    Args:
      name: "auto", "float32", "bfloat16", "float16" (or fp32/bf16/fp16, or a jnp dtype).
      checkpoint_dtype: the checkpoint's `torch_dtype`, used by "auto"; float32 when unknown.
    Raises:
      ValueError: for any other name, listing the allowed ones.
    """
    if not isinstance(name, str):
        try:
            dtype = jnp.dtype(name)
        except TypeError:
            dtype = None
        if dtype is not None and dtype.name in DTYPES:
            return DTYPES[dtype.name]
        raise ValueError(f"dtype={name!r} is not supported; allowed: 'auto', {', '.join(map(repr, DTYPES))}")
    key = DTYPE_ALIASES.get(name.lower(), name.lower())
    if key == "auto":
        ckpt = (checkpoint_dtype or "float32").replace("torch.", "")
        ckpt = DTYPE_ALIASES.get(ckpt, ckpt)
        return DTYPES.get(ckpt, jnp.float32)
    if key not in DTYPES:
        raise ValueError(f"dtype={name!r} is not supported; allowed: 'auto', {', '.join(map(repr, DTYPES))}")
    return DTYPES[key]


# The KV cache may also be float8 E4M3 (TensorRT-LLM's KvCacheConfig(dtype="fp8"), vLLM's
# kv_cache_dtype "fp8" / "fp8_e4m3"): half the bytes of bf16 per K/V element, about twice the
# tokens in the same memory. Writes saturate to +-448 (layers/attention.py:to_kv_dtype); reads
# upcast. It is a KV cache dtype only: the model's dtype stays one of DTYPES.
KV_FP8_DTYPE = jnp.float8_e4m3fn
KV_FP8_NAMES = ("fp8", "fp8_e4m3", "float8_e4m3fn")
KV_DTYPE_CHOICES = f"'auto', {', '.join(map(repr, DTYPES))}, 'fp8' (float8 E4M3; also 'fp8_e4m3', 'float8_e4m3fn')"


def resolve_kv_dtype(name: Any, model_dtype: Any = None) -> Any:
    """kv_cache_config.dtype -> the KV cache's dtype.

    Args:
      name: "auto" (the model's: `model_dtype`), a name `resolve_dtype` takes, or "fp8" (aliases
        "fp8_e4m3", "float8_e4m3fn", or the jnp dtype itself): float8 E4M3.
      model_dtype: the weights' dtype, what "auto" gives.
    Raises:
      ValueError: for any other name, listing the allowed ones.
    """
    if isinstance(name, str):
        key = name.lower()
        if key == "auto":
            return model_dtype
        if key in KV_FP8_NAMES:
            return KV_FP8_DTYPE
    else:
        try:
            if jnp.dtype(name) == jnp.dtype(KV_FP8_DTYPE):
                return KV_FP8_DTYPE
        except TypeError:
            pass
    try:
        return resolve_dtype(name)
    except ValueError:
        raise ValueError(f"KV cache dtype={name!r} is not supported; allowed: {KV_DTYPE_CHOICES}") from None


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one attention kind (Gemma 3 has one for sliding and one for global layers)."""

    theta: float
    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # Per-frequency divisors as llama.cpp stores them (`rope_freqs` of Llama 3.1 GGUF files).
    freq_factors: tuple[float, ...] | None = None

    SUPPORTED = ("default", "linear", "llama3")

    @classmethod
    def from_hf(cls, params: dict | None, default_theta: float) -> "RopeConfig":
        params = dict(params or {})
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        if rope_type not in cls.SUPPORTED:
            raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(cls.SUPPORTED)}")
        return cls(
            theta=float(params.get("rope_theta", default_theta)),
            rope_type=rope_type,
            factor=float(params.get("factor", 1.0) or 1.0),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
        )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the forward pass needs to know about a model, for all families.

    Layers are either "full" or "sliding" (`layer_types`); sliding layers attend to the last
    `sliding_window` positions (the query's own included) and use `rope_local`.
    """

    architecture: str  # the Hugging Face architecture name, e.g. "LlamaForCausalLM"
    family: str  # llama | mistral | qwen2 | qwen3 | gemma3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    rope_local: RopeConfig | None = None  # sliding layers' rotary (Gemma 3); None: same as `rope`
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    attention_bias: bool = False  # biases on q/k/v (Qwen2; Llama and Qwen3 when configured)
    attention_out_bias: bool = False  # a bias on the output projection (Llama, Qwen3 attention_bias)
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim on q and k
    norm_offset: float = 0.0  # Gemma: RMSNorm scales by (1 + w)
    sandwich_norm: bool = False  # Gemma 3: norms after attention and around the MLP
    hidden_act: str = "silu"  # silu | gelu_tanh
    embed_scale: float | None = None  # Gemma: embeddings times sqrt(hidden_size)
    attn_scale: float = 0.0  # softmax scale; 0 means 1/sqrt(head_dim)
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    checkpoint_dtype: str | None = None
    # Tensor parallelism pads the vocabulary to a multiple of the device count (jaxllm/sharding.py);
    # 0 means no padding. Logits are cut back to vocab_size before sampling.
    padded_vocab_size: int = 0
    # How the layer projections are stored (jaxllm/quantization.py): None (the model's dtype), or
    # float8 E4M3 with a scale per output channel and activations quantized per token
    # ("FP8_PER_CHANNEL_PER_TOKEN") or with a calibrated static scale per projection ("FP8", a
    # ModelOpt checkpoint's), or int8 / int4 weights with float activations ("W8A16", "W4A16"). Part of the
    # engine's static config: the params' description
    # (models/params.py) and the forward pass (layers/linear.py) follow it.
    quant_algo: str | None = None
    # The input channels a W4A16 / W8A16 scale covers (gcd with each projection's last input axis),
    # or 0: a scale per output channel.
    quant_group_size: int = 0
    # The groups asymmetric (an offset per group beside its scale, `<name>_zero`)
    quant_zero_point: bool = False
    # Layer projections left in the model's dtype under quant_algo ("layers.3.wv", ...): QuantConfig's
    # exclude_modules, or a GGUF file's tensors whose blocks are not kept (checkpoints/gguf.py).
    quant_exclude: tuple[str, ...] = ()
    # Each layer holds calibrated FP8 KV cache scales (`k_scale`, `v_scale`: a ModelOpt checkpoint
    # calibrated for an fp8 cache): an fp8 cache stores K / k_scale and V / v_scale.
    kv_cache_scales: bool = False

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full",) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        bad = set(self.layer_types) - {"full", "sliding"}
        if bad:
            raise ValueError(f"unknown layer types {sorted(bad)}; allowed: 'full', 'sliding'")
        if "sliding" in self.layer_types and not self.sliding_window:
            raise ValueError("sliding layers need a sliding_window")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.quant_algo is not None and self.quant_algo not in WEIGHT_FORMATS:
            raise ValueError(f"quant_algo={self.quant_algo!r} is not supported; allowed: None, "
                             f"{', '.join(map(repr, WEIGHT_FORMATS))}")  # fmt: skip
        if self.quant_group_size and self.quant_algo not in ("W4A16", "W8A16"):
            raise ValueError(f"quant_group_size={self.quant_group_size} applies to quant_algo 'W4A16' and 'W8A16' "
                             f"only; got quant_algo={self.quant_algo!r}")  # fmt: skip
        if self.quant_zero_point and not self.quant_group_size:
            raise ValueError("quant_zero_point needs a quant_group_size")
        if self.quant_exclude:
            if self.quant_algo is None:
                raise ValueError("quant_exclude names projections left unquantized; it needs a quant_algo")
            projections = {f"layers.{i}.{name}" for i in range(self.num_layers) for name in QUANTIZED_PARAMS}
            unknown = sorted(set(self.quant_exclude) - projections)
            if unknown:
                raise ValueError(f"quant_exclude names {unknown[:4]}, which are not layer projections of this model; "
                                 f"allowed: 'layers.<0..{self.num_layers - 1}>.<{'|'.join(QUANTIZED_PARAMS)}>'")  # fmt: skip
        if self.attn_scale == 0.0:
            object.__setattr__(self, "attn_scale", 1.0 / math.sqrt(self.head_dim))

    @property
    def param_vocab_size(self) -> int:
        return self.padded_vocab_size or self.vocab_size

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of `layer`, or None for a full-attention layer."""
        return self.sliding_window if self.layer_types[layer] == "sliding" else None

    def first_layer_like(self, layer: int) -> int:
        """The first layer of `layer`'s type (its window and RoPE are the same): layers of one type
        share one traced function (models/transformer.py:paged_layer)."""
        return self.layer_types.index(self.layer_types[layer])

    def layer_rope(self, layer: int) -> RopeConfig:
        if self.layer_types[layer] == "sliding" and self.rope_local is not None:
            return self.rope_local
        return self.rope

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        data = json.loads(text)
        for key in ("rope", "rope_local"):
            if data.get(key):
                rope = dict(data[key])
                if rope.get("freq_factors") is not None:
                    rope["freq_factors"] = tuple(rope["freq_factors"])
                data[key] = RopeConfig(**rope)
        data["layer_types"] = tuple(data["layer_types"])
        data["eos_token_ids"] = tuple(data["eos_token_ids"])
        data["quant_exclude"] = tuple(data.get("quant_exclude", ()))
        return cls(**data)
