"""Qwen3 (dense): RMSNorm on q and k per head, explicit head_dim."""

from jaxllm.config import ModelConfig
from jaxllm.models.family import Family, check_activation, common_fields, layer_types_from_hf


def config_from_hf(hf) -> ModelConfig:
    check_activation(hf, ("silu",))
    layer_types = layer_types_from_hf(hf)
    window = getattr(hf, "sliding_window", None) if layer_types and "sliding" in layer_types else None
    bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(
        **common_fields(hf, "qwen3", "Qwen3ForCausalLM"),
        attention_bias=bias,
        attention_out_bias=bias,
        qk_norm=True,
        sliding_window=window,
        layer_types=layer_types or (),
    )


FAMILY = Family(
    name="qwen3",
    architectures=("Qwen3ForCausalLM",),
    model_types=("qwen3",),
    gguf_architectures=("qwen3",),
    config_from_hf=config_from_hf,
)
