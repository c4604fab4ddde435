"""Directories that jaxllm itself saved (`LLM.save`, `python -m converters.hf_to_jaxllm`).

Layout:
  jaxllm_config.json   model config, dtype, engine arguments, format version
  params/              the params pytree, an orbax checkpoint
  tokenizer files      as transformers' save_pretrained writes them
  compile_cache/       JAX's persistent compilation cache (when an engine was saved)
"""

from __future__ import annotations

import json
from pathlib import Path

import jax

from jaxllm.config import ModelConfig

CONFIG_FILE = "jaxllm_config.json"
FORMAT_VERSION = 1


def is_saved_directory(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def save_params(path: Path, params) -> None:
    import orbax.checkpoint as ocp

    target = (Path(path) / "params").absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(target, params, force=True)


def restore_params(path: Path, abstract_params):
    """Restore params onto the shardings that `abstract_params` (ShapeDtypeStructs) carry."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore((Path(path) / "params").absolute(), abstract_params)


def write_config(path: Path, cfg: ModelConfig, dtype, engine_args: dict | None = None) -> None:
    data = {
        "format_version": FORMAT_VERSION,
        "model_config": json.loads(cfg.to_json()),
        "dtype": jax.numpy.dtype(dtype).name,
        "engine_args": engine_args or {},
    }
    (Path(path) / CONFIG_FILE).write_text(json.dumps(data, indent=2))


def read_config(path: Path) -> tuple[ModelConfig, str, dict]:
    data = json.loads((Path(path) / CONFIG_FILE).read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: saved format version {data.get('format_version')!r}, this jaxllm reads {FORMAT_VERSION}")
    return ModelConfig.from_json(json.dumps(data["model_config"])), data["dtype"], data.get("engine_args", {})
