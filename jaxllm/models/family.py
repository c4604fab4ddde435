"""What a model family module declares, and the config reading they share.

A family is the set of facts that differ between checkpoints of one lineage: the Hugging Face
architecture names it answers to, how its config becomes a `ModelConfig`, and how its tensors are
named in Hugging Face and GGUF files (jaxllm/checkpoints/names.py applies those names).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jaxllm.config import ModelConfig, RopeConfig


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]  # Hugging Face `architectures` entries
    model_types: tuple[str, ...]  # Hugging Face `model_type` values
    gguf_architectures: tuple[str, ...]  # GGUF `general.architecture` values
    config_from_hf: Callable[[Any], ModelConfig]
    # Layer norms: our param name -> the Hugging Face module name inside a decoder layer.
    hf_layer_norms: tuple[tuple[str, str], ...] = (
        ("attn_norm", "input_layernorm"),
        ("mlp_norm", "post_attention_layernorm"),
    )
    # Layer norms: our param name -> the GGUF tensor name inside blk.N.
    gguf_layer_norms: tuple[tuple[str, str], ...] = (("attn_norm", "attn_norm"), ("mlp_norm", "ffn_norm"))
    gguf_permuted_qk: bool = False  # llama.cpp interleaves q/k rows of "llama" checkpoints for its RoPE
    gguf_norm_plus_one: bool = False  # llama.cpp stores Gemma norms as 1 + w


def _get(hf, name, default=None):
    value = getattr(hf, name, default)
    return default if value is None else value


def eos_ids(hf) -> tuple[int, ...]:
    eos = _get(hf, "eos_token_id", ())
    if isinstance(eos, int):
        return (eos,)
    return tuple(int(e) for e in eos)


def rope_from_hf(hf, key: str | None = None) -> RopeConfig:
    """The RoPE of an HF config: transformers v5 keeps it in `rope_parameters` (per layer kind for
    Gemma 3); legacy attributes `rope_theta`/`rope_scaling` are honoured when present."""
    params = getattr(hf, "rope_parameters", None) or {}
    if key is not None and key in params:
        params = params[key]
    elif key is not None and isinstance(params, dict) and any(isinstance(v, dict) for v in params.values()):
        params = {}
    legacy = getattr(hf, "rope_scaling", None)
    if not params and legacy:
        params = dict(legacy)
    return RopeConfig.from_hf(params, float(_get(hf, "rope_theta", 10000.0)))


def layer_types_from_hf(hf) -> tuple[str, ...] | None:
    types = getattr(hf, "layer_types", None)
    if not types:
        return None
    mapping = {"full_attention": "full", "sliding_attention": "sliding"}
    unknown = sorted(set(types) - set(mapping))
    if unknown:
        raise ValueError(f"layer types {unknown} are not supported; supported: {sorted(mapping)}")
    return tuple(mapping[t] for t in types)


def common_fields(hf, family: str, architecture: str) -> dict:
    """Fields every family reads the same way from its HF config."""
    num_heads = int(hf.num_attention_heads)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
    dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
    return dict(
        architecture=architecture,
        family=family,
        vocab_size=int(hf.vocab_size),
        hidden_size=int(hf.hidden_size),
        intermediate_size=int(hf.intermediate_size),
        num_layers=int(hf.num_hidden_layers),
        num_heads=num_heads,
        num_kv_heads=int(_get(hf, "num_key_value_heads", num_heads)),
        head_dim=int(head_dim),
        rms_norm_eps=float(hf.rms_norm_eps),
        rope=rope_from_hf(hf),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        max_position_embeddings=int(_get(hf, "max_position_embeddings", 4096)),
        bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_ids=eos_ids(hf),
        pad_token_id=getattr(hf, "pad_token_id", None),
        checkpoint_dtype=None if dtype is None else str(dtype).replace("torch.", ""),
    )


def check_activation(hf, allowed: tuple[str, ...], attr: str = "hidden_act") -> None:
    act = getattr(hf, attr, allowed[0])
    if act not in allowed:
        raise ValueError(f"{attr}={act!r} is not supported for this family; supported: {', '.join(allowed)}")
