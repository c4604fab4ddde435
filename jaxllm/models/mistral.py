"""Mistral: Llama's block with an explicit head_dim and an optional sliding window on every layer."""

from jaxllm.config import ModelConfig
from jaxllm.models.family import Family, check_activation, common_fields


def config_from_hf(hf) -> ModelConfig:
    check_activation(hf, ("silu",))
    window = getattr(hf, "sliding_window", None)
    fields = common_fields(hf, "mistral", "MistralForCausalLM")
    layer_types = ("sliding" if window else "full",) * fields["num_layers"]
    return ModelConfig(**fields, sliding_window=window, layer_types=layer_types)


FAMILY = Family(
    name="mistral",
    architectures=("MistralForCausalLM",),
    model_types=("mistral",),
    gguf_architectures=(),  # llama.cpp writes Mistral as "llama"; it loads through the Llama family
    config_from_hf=config_from_hf,
    gguf_permuted_qk=True,
)
