"""Gemma 3 text models.

Sliding-window and global layers alternate (`layer_types`), each kind with its own RoPE base;
RMSNorm scales by (1 + w) and also normalizes q and k; norms sit before and after both attention
and the MLP; embeddings are scaled by sqrt(hidden_size); the MLP uses gelu-tanh; the softmax scale
is query_pre_attn_scalar ** -0.5.
"""

import math

from jaxllm.config import ModelConfig
from jaxllm.models.family import Family, check_activation, common_fields, layer_types_from_hf, rope_from_hf


def config_from_hf(hf) -> ModelConfig:
    check_activation(hf, ("gelu_pytorch_tanh", "gelu_tanh"), attr="hidden_activation")
    if getattr(hf, "attn_logit_softcapping", None):
        raise ValueError("attn_logit_softcapping is not supported (Gemma 3 checkpoints do not set it)")
    fields = common_fields(hf, "gemma3", "Gemma3ForCausalLM")
    fields["rope"] = rope_from_hf(hf, "full_attention")
    bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(
        **fields,
        rope_local=rope_from_hf(hf, "sliding_attention"),
        sliding_window=hf.sliding_window,
        layer_types=layer_types_from_hf(hf) or (),
        attention_bias=bias,
        attention_out_bias=bias,
        qk_norm=True,
        norm_offset=1.0,
        sandwich_norm=True,
        hidden_act="gelu_tanh",
        embed_scale=math.sqrt(hf.hidden_size),
        attn_scale=float(hf.query_pre_attn_scalar) ** -0.5,
        final_logit_softcapping=getattr(hf, "final_logit_softcapping", None),
    )


FAMILY = Family(
    name="gemma3",
    architectures=("Gemma3ForCausalLM",),
    model_types=("gemma3_text",),
    gguf_architectures=("gemma3",),
    config_from_hf=config_from_hf,
    hf_layer_norms=(
        ("attn_norm", "input_layernorm"),
        ("post_attn_norm", "post_attention_layernorm"),
        ("mlp_norm", "pre_feedforward_layernorm"),
        ("post_mlp_norm", "post_feedforward_layernorm"),
    ),
    gguf_layer_norms=(
        ("attn_norm", "attn_norm"),
        ("post_attn_norm", "post_attention_norm"),
        ("mlp_norm", "ffn_norm"),
        ("post_mlp_norm", "post_ffw_norm"),
    ),
    gguf_norm_plus_one=True,
)
