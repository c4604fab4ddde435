"""Hugging Face checkpoint directories: config.json plus single or sharded safetensors.

Pickled weights (`pytorch_model.bin`, `*.pt`, `*.pth`, `*.ckpt`) are refused: unpickling can run
arbitrary code. The error says how to convert them to safetensors first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy so safetensors can return it)
import numpy as np
from safetensors import SafetensorError, safe_open

from jaxllm.checkpoints.names import CheckpointError, TensorMapper, hf_names
from jaxllm.config import ModelConfig
from jaxllm.models import config_from_hf_dict, family_of

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PICKLE_ERROR = (
    "{path} holds pickled weights, which jaxllm refuses to load: unpickling can run arbitrary code. "
    "Convert the checkpoint to safetensors first, in an environment you trust, for example:\n"
    "  python -c \"from transformers import AutoModelForCausalLM as M; "
    "M.from_pretrained('{src}').save_pretrained('{src}-safetensors', safe_serialization=True)\"\n"
    "then pass the new directory."
)


def is_hf_directory(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_config_dict(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None


def read_config(path: Path) -> ModelConfig:
    return config_from_hf_dict(read_config_dict(path))


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint directory, from its index when sharded."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({path / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {', '.join(missing)}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    pickled = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise CheckpointError(PICKLE_ERROR.format(path=pickled[0], src=path))
    raise FileNotFoundError(f"{path}: no model.safetensors, no model.safetensors.index.json, no *.safetensors")


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, object]]:
    """Yield (name, lazy loader) for every tensor of the files; loading reads one tensor at a time."""
    for file in files:
        try:
            handle = safe_open(str(file), framework="numpy")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e}); is it truncated?") from None
        with handle as f:
            for name in f.keys():

                def load(f=f, name=name, file=file):
                    try:
                        return f.get_tensor(name)
                    except (SafetensorError, OSError) as e:
                        raise CheckpointError(f"{file}: tensor {name!r} cannot be read ({e})") from None

                yield name, load


def load_hf_tensors(path: Path, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (param path, array in params layout) for every parameter, checking the whole set."""
    family = family_of(cfg.architecture)
    ignore = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    mapper = TensorMapper(cfg, hf_names(cfg, family), str(path), ignore=ignore)
    for name, load in iter_safetensors(safetensors_files(path)):
        if mapper.wants(name):
            yield mapper.convert(name, load())
    mapper.finish()
