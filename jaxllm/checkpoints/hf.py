"""Hugging Face checkpoint directories: config.json plus single or sharded safetensors.

Pickled weights (`pytorch_model.bin`, `*.pt`, `*.pth`, `*.ckpt`) are refused: unpickling can run
arbitrary code. The error says how to convert them to safetensors first.

NVIDIA ModelOpt FP8 checkpoints (`hf_quant_config.json`, or config.json's `quantization_config`
with quant_method 'modelopt'; nvidia/Llama-3.1-8B-Instruct-FP8's layout) are read as they are: the
projections' float8 E4M3 `weight`s, their `weight_scale`s and (FP8) static `input_scale`s become
the params of ModelConfig.quant_algo 'FP8' / 'FP8_PER_CHANNEL_PER_TOKEN' (jaxllm/quantization.py).
Checkpoints quantized by other tools (GPTQ, AWQ, compressed-tensors, ...) are refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import dataclasses
import ml_dtypes  # (registers bfloat16 with numpy so safetensors can return it; float8 types below)
import numpy as np
from safetensors import SafetensorError, safe_open

from jaxllm.checkpoints.names import CheckpointError, TensorMapper, excluded_projections, hf_names
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
    cfg = config_from_hf_dict(read_config_dict(path))
    quant = quantization_of(path)
    if quant is None:
        return cfg
    # a KV cache calibrated for FP8 comes with each layer's k_scale / v_scale
    kv_scales = quant["kv_cache_quant_algo"] == "FP8"
    try:  # projections the export left in the checkpoint's dtype (exclude_modules)
        excluded = excluded_projections(cfg, quant["exclude_modules"])
    except ValueError as e:
        raise CheckpointError(f"{quant['source']}: {e}") from None
    return dataclasses.replace(cfg, quant_algo=quant["quant_algo"], kv_cache_scales=kv_scales, quant_exclude=excluded)


MODELOPT_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN")


def quantization_of(path: Path) -> dict | None:
    """A pre-quantized checkpoint's quantization: {"quant_algo": 'FP8' | 'FP8_PER_CHANNEL_PER_TOKEN',
    "kv_cache_quant_algo": 'FP8' | None, "exclude_modules": the module patterns left unquantized
    (lm_head's dropped: never quantized), "source": the file it says so in} from ModelOpt's
    hf_quant_config.json or config.json's quantization_config; None for a float checkpoint.
    Raises CheckpointError for any other quantization, naming what jaxllm reads."""
    quant_file = path / "hf_quant_config.json"
    if quant_file.is_file():
        try:
            data = json.loads(quant_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{quant_file}: not valid JSON ({e})") from None
        quant, source = data.get("quantization", data), str(quant_file)
    else:
        quant = read_config_dict(path).get("quantization_config")
        if not quant:
            return None
        source = f"{path / 'config.json'} quantization_config"
        method = str(quant.get("quant_method", "")).lower()
        if method != "modelopt":
            raise CheckpointError(f"{source}: quant_method={quant.get('quant_method')!r} is not supported; jaxllm "
                                  "reads float checkpoints (quantized as they load with quant_config=QuantConfig("
                                  "quant_algo='FP8')) and NVIDIA ModelOpt FP8 checkpoints (quant_method 'modelopt')")  # fmt: skip
    algo = str(quant.get("quant_algo") or "").upper()
    if algo not in MODELOPT_ALGOS:
        raise CheckpointError(f"{source}: quant_algo={quant.get('quant_algo')!r} is not supported; allowed: "
                              f"{', '.join(map(repr, MODELOPT_ALGOS))}")  # fmt: skip
    excluded = [m for m in quant.get("exclude_modules") or quant.get("ignore") or [] if "lm_head" not in m]
    kv = quant.get("kv_cache_quant_algo")
    if kv is not None and str(kv).upper() != "FP8":
        raise CheckpointError(f"{source}: kv_cache_quant_algo={kv!r} is not supported; allowed: None, 'FP8'")
    return {"quant_algo": algo, "kv_cache_quant_algo": "FP8" if kv is not None else None,
            "exclude_modules": excluded, "source": source}  # fmt: skip


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
                        if f.get_slice(name).get_dtype() in RAW_DTYPES:
                            return _read_raw(file, name)
                        return f.get_tensor(name)
                    except (SafetensorError, OSError) as e:
                        raise CheckpointError(f"{file}: tensor {name!r} cannot be read ({e})") from None

                yield name, load


# safetensors dtypes numpy has no type for (safetensors' numpy reader refuses them): read raw.
RAW_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


def _read_raw(file: Path, name: str) -> np.ndarray:
    """One tensor of a safetensors file by its header's offsets (an 8-byte header length, a JSON
    header, then the data)."""
    with open(file, "rb") as handle:
        (header_len,) = np.frombuffer(handle.read(8), "<u8")
        info = json.loads(handle.read(int(header_len)))[name]
        start, end = info["data_offsets"]
        handle.seek(8 + int(header_len) + start)
        data = handle.read(end - start)
    return np.frombuffer(data, RAW_DTYPES[info["dtype"]]).reshape(info["shape"])


def load_hf_tensors(path: Path, cfg: ModelConfig, only=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (param path, array in params layout) for every parameter, checking the whole set; with
    `only` (a predicate on param paths), for those alone, read no others and check nothing missing."""
    family = family_of(cfg.architecture)
    ignore = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    mapper = TensorMapper(cfg, hf_names(cfg, family), str(path), ignore=ignore, only=only)
    for name, load in iter_safetensors(safetensors_files(path)):
        if mapper.selects(name) and mapper.wants(name):
            yield mapper.convert(name, load())
    mapper.finish()
