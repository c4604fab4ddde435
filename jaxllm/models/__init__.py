"""Model families and the registry that picks one for a checkpoint.

The forward pass itself is shared (transformer.py); each family module says how its Hugging Face
config and tensor names map onto it.
"""

from __future__ import annotations

from typing import Any

from jaxllm.config import ModelConfig
from jaxllm.models import gemma3, llama, mistral, qwen2, qwen3
from jaxllm.models.family import Family

FAMILIES: tuple[Family, ...] = (llama.FAMILY, mistral.FAMILY, qwen2.FAMILY, qwen3.FAMILY, gemma3.FAMILY)


def supported_architectures() -> list[str]:
    return [a for f in FAMILIES for a in f.architectures]


def family_of(name: str) -> Family:
    """The family for an HF architecture name, model_type, family name or GGUF architecture."""
    for family in FAMILIES:
        if name == family.name or name in family.architectures or name in family.model_types:
            return family
    for family in FAMILIES:
        if name in family.gguf_architectures:
            return family
    raise ValueError(
        f"model architecture {name!r} is not supported; supported architectures: "
        f"{', '.join(supported_architectures())}"
    )


def family_of_hf_dict(config: dict) -> Family:
    """Pick the family from a raw config.json dictionary (architectures first, then model_type)."""
    names = list(config.get("architectures") or []) + [config.get("model_type")]
    for name in names:
        if not name:
            continue
        try:
            return family_of(name)
        except ValueError:
            continue
    shown = config.get("architectures") or config.get("model_type")
    raise ValueError(
        f"model architecture {shown!r} is not supported; supported architectures: "
        f"{', '.join(supported_architectures())}"
    )


# A Llama config.json that spells these out is read directly: transformers' config classes import
# torch wherever it is installed, seconds of every start there. The rest take LlamaConfig's defaults.
# (tests/test_startup.py checks both readings agree.)
_DIRECT_REQUIRED = {"llama": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                              "vocab_size", "rms_norm_eps", "max_position_embeddings")}  # fmt: skip
_DIRECT_DEFAULTS = {"llama": {"hidden_act": "silu", "rope_theta": 10000.0, "tie_word_embeddings": False,
                              "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False, "mlp_bias": False}}  # fmt: skip
_DIRECT_KNOWN = {"llama": set(_DIRECT_REQUIRED["llama"]) | set(_DIRECT_DEFAULTS["llama"]) | {
    "model_type", "architectures", "num_key_value_heads", "head_dim", "rope_scaling", "rope_parameters", "dtype",
    "torch_dtype", "pad_token_id", "initializer_range", "use_cache", "pretraining_tp", "transformers_version",
    "attention_dropout"}}  # fmt: skip


def config_from_hf_dict(config: dict) -> ModelConfig:
    """Build a ModelConfig from a config.json dictionary: directly when it is a Llama config that
    spells out what matters (`_DIRECT_REQUIRED`) and holds nothing else unusual, else parsed through
    transformers' config class so that every serialization transformers accepts works."""
    family = family_of_hf_dict(config)
    direct = _DIRECT_REQUIRED.get(family.name)
    if direct and all(config.get(k) is not None for k in direct) and set(config) <= _DIRECT_KNOWN[family.name]:
        import types

        return family.config_from_hf(types.SimpleNamespace(**{**_DIRECT_DEFAULTS[family.name], **config}))
    from transformers import AutoConfig

    model_type = config.get("model_type") or family.model_types[0]
    fields = {k: v for k, v in config.items() if k != "model_type"}
    hf = AutoConfig.for_model(model_type, **fields)
    return family.config_from_hf(hf)


def config_from_hf_object(hf: Any) -> ModelConfig:
    return family_of_hf_dict(hf.to_dict()).config_from_hf(hf)
