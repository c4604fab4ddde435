"""Llama 2, 3 and 3.1 (rope_scaling `llama3` and `linear`), and checkpoints built the same way."""

from jaxllm.config import ModelConfig
from jaxllm.models.family import Family, check_activation, common_fields


def config_from_hf(hf) -> ModelConfig:
    check_activation(hf, ("silu",))
    if getattr(hf, "mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported (no supported Llama checkpoint uses it)")
    bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(**common_fields(hf, "llama", "LlamaForCausalLM"), attention_bias=bias, attention_out_bias=bias)


FAMILY = Family(
    name="llama",
    architectures=("LlamaForCausalLM",),
    model_types=("llama",),
    gguf_architectures=("llama",),
    config_from_hf=config_from_hf,
    gguf_permuted_qk=True,
)
