"""Qwen2 and Qwen2.5: biases on q/k/v, optional sliding-window layers (`layer_types`)."""

from jaxllm.config import ModelConfig
from jaxllm.models.family import Family, check_activation, common_fields, layer_types_from_hf


def config_from_hf(hf) -> ModelConfig:
    check_activation(hf, ("silu",))
    layer_types = layer_types_from_hf(hf)
    window = getattr(hf, "sliding_window", None) if layer_types and "sliding" in layer_types else None
    return ModelConfig(
        **common_fields(hf, "qwen2", "Qwen2ForCausalLM"),
        attention_bias=True,
        sliding_window=window,
        layer_types=layer_types or (),
    )


FAMILY = Family(
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    model_types=("qwen2",),
    gguf_architectures=("qwen2",),
    config_from_hf=config_from_hf,
)
