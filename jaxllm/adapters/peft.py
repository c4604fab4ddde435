"""Reading Hugging Face PEFT adapter directories: `adapter_config.json` and `adapter_model.safetensors`.

Shared by LoRA (jaxllm/adapters/lora.py) and prompt tuning (jaxllm/adapters/prompt.py). Pickled
`adapter_model.bin` files are refused, as pickled checkpoints are.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy so safetensors can return it)
import numpy as np

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterError(ValueError):
    """An adapter directory that jaxllm cannot serve exactly (its config, tensors, shapes or size)."""


def read_adapter_config(path: Path, peft_type: str) -> dict:
    """The parsed adapter_config.json of a PEFT directory, checked to be of `peft_type`."""
    config_file = Path(path) / ADAPTER_CONFIG
    if not config_file.is_file():
        raise AdapterError(f"{path}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{config_file}: not valid JSON ({e})") from None
    if config.get("peft_type") != peft_type:
        raise AdapterError(f"{config_file}: peft_type={config.get('peft_type')!r}; allowed: {peft_type!r}")
    return config


def read_adapter_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a PEFT directory's adapter_model.safetensors (pickled .bin files are refused)."""
    from safetensors import SafetensorError, safe_open

    weights = Path(path) / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = ""
        if (Path(path) / "adapter_model.bin").is_file():
            pickled = " (adapter_model.bin is pickled, which jaxllm refuses; re-save with safe_serialization=True)"
        raise AdapterError(f"{path}: no {ADAPTER_WEIGHTS}{pickled}")
    try:
        with safe_open(str(weights), framework="numpy") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{weights}: not a readable safetensors file ({e})") from None
