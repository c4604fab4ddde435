"""Checkpoint conversions (the converters/ command-line tools are thin wrappers over these).

  gguf_to_hf:  a .gguf file -> a Hugging Face directory (config.json, safetensors, tokenizer), so
               the weights can be used by any tool; tensors dequantized to float.
  to_jaxllm:   anything LLM(model=...) loads -> a jaxllm directory (orbax params, config, tokenizer).
Both read and check every tensor through the same maps as loading does, so a missing, unmapped,
duplicate or misshapen tensor fails the conversion.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from jaxllm.checkpoints import gguf, loader, saved
from jaxllm.checkpoints.names import CheckpointError, TensorMapper, gguf_names, hf_names
from jaxllm.config import RopeConfig, resolve_dtype
from jaxllm.layers.rope import inverse_frequencies
from jaxllm.models import family_of
from jaxllm.models.params import flatten_paths, param_specs

SHARD_BYTES = 2 << 30

# The Llama 3.1 RoPE scaling that llama.cpp bakes into `rope_freqs`; recognized when converting back.
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}  # fmt: skip


def _rope_parameters_for(cfg) -> dict | None:
    """config.json rope_parameters equivalent to a GGUF file's rope_freqs factors, if any."""
    if cfg.rope.freq_factors is None:
        return None
    base = RopeConfig(theta=cfg.rope.theta)
    want = inverse_frequencies(base, cfg.head_dim) / np.asarray(cfg.rope.freq_factors, np.float32)
    candidate = RopeConfig(theta=cfg.rope.theta, **{k: v for k, v in LLAMA31_ROPE.items()})
    if np.allclose(inverse_frequencies(candidate, cfg.head_dim), want, rtol=1e-5):
        return {**LLAMA31_ROPE, "rope_theta": cfg.rope.theta}
    raise CheckpointError("the GGUF rope_freqs factors match no Hugging Face rope scaling jaxllm knows (llama3)")


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32", progress: bool = True) -> Path:
    """Write a Hugging Face checkpoint directory equivalent to a GGUF file."""
    import ml_dtypes  # noqa: F401
    from safetensors.numpy import save_file

    from jaxllm.tokenizer import load_tokenizer

    gguf_path, out = Path(gguf_path), Path(out_dir)
    np_dtype = np.dtype(resolve_dtype(dtype))
    cfg = gguf.read_config(gguf_path)
    family = family_of(cfg.architecture)
    config = gguf.hf_config_dict(gguf_path)
    config["torch_dtype"] = np_dtype.name
    rope = _rope_parameters_for(cfg)
    if rope is not None:
        config["rope_scaling"] = rope
    out.mkdir(parents=True, exist_ok=True)
    # GGUF name -> HF name, both through our param paths, so the checks are the loader's own.
    hf_by_path = {path: name for name, (path, _) in hf_names(cfg, family).items()}
    mapper = TensorMapper(cfg, gguf_names(cfg, family), str(gguf_path))
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    total = len(flatten_paths(param_specs(cfg)))
    with tqdm(total=total, desc=f"converting {gguf_path.name}", unit="tensor", disable=None if progress else True) as bar:
        for name, array in gguf.iter_gguf_file_tensors(gguf_path, cfg):
            if not mapper.wants(name):
                continue
            path, _ = mapper.convert(name, array)  # checks duplicates and shapes
            tensor = np.ascontiguousarray(array.astype(np_dtype))
            if size + tensor.nbytes > SHARD_BYTES and shards[-1]:
                shards.append({})
                size = 0
            shards[-1][hf_by_path[path]] = tensor
            size += tensor.nbytes
            bar.update()
    mapper.finish()
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / file), metadata={"format": "pt"})
            weight_map.update({k: file for k in shard})
        index = {"metadata": {"total_size": sum(t.nbytes for s in shards for t in s.values())}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    load_tokenizer(gguf_path).save_pretrained(str(out))
    return out


def to_jaxllm(model: str | Path, out_dir: str | Path, dtype: str = "auto", revision: str | None = None,
              progress: bool = True) -> Path:  # fmt: skip
    """Write a jaxllm directory (orbax params, config, tokenizer) from any checkpoint LLM loads."""
    from jaxllm.tokenizer import load_tokenizer

    resolved = loader.resolve(model, revision)
    cfg = loader.read_config(resolved)
    jdtype = resolve_dtype(dtype, cfg.checkpoint_dtype)
    params = loader.load_params(resolved, cfg, jdtype, progress=progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved.save_params(out, params)
    saved.write_config(out, cfg, jdtype)
    load_tokenizer(resolved).save_pretrained(str(out))
    return out
