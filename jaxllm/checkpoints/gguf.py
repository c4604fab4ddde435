"""GGUF files (llama.cpp's format): metadata to a Hugging Face config, tensors dequantized to float.

Metadata is mapped onto the same config.json keys transformers uses for GGUF, so a GGUF file and
its Hugging Face twin give the same `ModelConfig`. Tensors are dequantized with the `gguf` package
(numpy), one at a time, and put in Hugging Face layout: llama.cpp's q/k row interleave for "llama"
files is undone, Gemma norms are shifted back by one. Llama 3.1 files carry their RoPE scaling as
a `rope_freqs` tensor; it becomes the config's per-frequency factors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from jaxllm.checkpoints.names import CheckpointError, TensorMapper, gguf_names
from jaxllm.config import ModelConfig, RopeConfig
from jaxllm.models import config_from_hf_dict, family_of

# Tensor types jaxllm loads (what gguf.quants.dequantize handles and llama.cpp writes for these models).
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "F64", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K",
)  # fmt: skip

# GGUF architecture -> Hugging Face model_type / architecture.
GGUF_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}

# GGUF key (after "<arch>.") -> config.json key.
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "attention.sliding_window": "sliding_window",
    "vocab_size": "vocab_size",
}
# Where each architecture keeps its head size (transformers reads the same key).
_HEAD_DIM_KEY = {"llama": "rope.dimension_count", "qwen2": "attention.key_length",
                 "qwen3": "attention.key_length", "gemma3": "attention.key_length"}  # fmt: skip


def _open(path: Path):
    import gguf

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct.error/IndexError on damaged files
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_metadata(path: Path) -> dict:
    """All key/value metadata of a GGUF file (tokenizer arrays included)."""
    reader = _open(path)
    return {key: field.contents() for key, field in reader.fields.items()}


def hf_config_dict(path: Path, reader=None) -> dict:
    """A config.json dictionary equivalent to the GGUF metadata."""
    reader = reader or _open(path)
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    model_type, architecture = GGUF_ARCHITECTURES[arch]
    name = str(_field(reader, "general.name", "") or "")
    if arch == "llama" and "mistral" in name.lower():  # llama.cpp writes Mistral as "llama"
        model_type, architecture = "mistral", "MistralForCausalLM"
    config: dict = {"model_type": model_type, "architectures": [architecture]}
    for key, hf_key in _CONFIG_KEYS.items():
        value = _field(reader, f"{arch}.{key}")
        if value is not None:
            config[hf_key] = value
    head_dim = _field(reader, f"{arch}.{_HEAD_DIM_KEY[arch]}")
    if head_dim is not None:
        config["head_dim"] = int(head_dim)
    if arch == "gemma3":
        # GGUF has no query_pre_attn_scalar; llama.cpp scales by head_dim, except for the 27B
        # model (62 layers), which uses hidden_size / num_heads, as its config.json does.
        heads = config["num_attention_heads"]
        scalar = config["hidden_size"] // heads if config.get("num_hidden_layers") == 62 else config["head_dim"]
        config["query_pre_attn_scalar"] = scalar
    if "vocab_size" not in config:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        config["vocab_size"] = len(tokens.data) if tokens is not None else None
    config["tie_word_embeddings"] = all(t.name != "output.weight" for t in reader.tensors)
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("padding_token_id", "pad_token_id")):  # fmt: skip
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            config[hf_key] = int(value)
    types = {t.tensor_type.name for t in reader.tensors}
    config["torch_dtype"] = "bfloat16" if types <= {"BF16", "F32"} and "BF16" in types else (
        "float16" if types <= {"F16", "F32"} and "F16" in types else "float32")  # fmt: skip
    return config


def read_config(path: Path) -> ModelConfig:
    reader = _open(path)
    cfg = config_from_hf_dict(hf_config_dict(path, reader))
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        factors = tuple(float(f) for f in np.asarray(_dequantize(freqs), np.float32).reshape(-1))
        rope = RopeConfig(**{**cfg.rope.__dict__, "freq_factors": factors})
        cfg = ModelConfig(**{**cfg.__dict__, "rope": rope})
    return cfg


def _dequantize(tensor) -> np.ndarray:
    """One GGUF tensor as a float32 numpy array in row-major (Hugging Face) layout."""
    from gguf.quants import dequantize

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise CheckpointError(
            f"GGUF tensor {tensor.name!r} has type {kind}, which jaxllm does not load; "
            f"supported: {', '.join(SUPPORTED_TYPES)}"
        )
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(shape)


def _unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleave of q/k rows ([heads * hd, D])."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_gguf_file_tensors(path: Path, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (GGUF tensor name, float32 array in Hugging Face layout), metadata-only tensors skipped."""
    family = family_of(cfg.architecture)
    reader = _open(path)
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":  # folded into the config (read_config)
            continue
        array = _dequantize(tensor)
        if family.gguf_permuted_qk and tensor.name.endswith("attn_q.weight"):
            array = _unpermute_qk(array, cfg.num_heads)
        elif family.gguf_permuted_qk and tensor.name.endswith("attn_k.weight"):
            array = _unpermute_qk(array, cfg.num_kv_heads)
        if family.gguf_norm_plus_one and tensor.name.endswith("norm.weight"):
            array = array - 1.0
        yield tensor.name, array


def load_gguf_tensors(path: Path, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (param path, array in params layout) for every parameter, checking the whole set."""
    mapper = TensorMapper(cfg, gguf_names(cfg, family_of(cfg.architecture)), str(path))
    for name, array in iter_gguf_file_tensors(path, cfg):
        if mapper.wants(name):
            yield mapper.convert(name, array)
    mapper.finish()
