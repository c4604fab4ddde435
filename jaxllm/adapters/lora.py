"""LoRA adapters: what a request names (LoRARequest) and how many the engine holds (LoraConfig).

TensorRT-LLM's names. Adapters are Hugging Face PEFT directories (`adapter_config.json` and
`adapter_model.safetensors`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional


@dataclasses.dataclass
class LoRARequest:
    """A request's LoRA adapter: a name, a unique positive integer id, and its PEFT directory."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    lora_ckpt_source: str = "hf"

    def __post_init__(self):
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"LoRARequest.lora_name must be a non-empty str, got {self.lora_name!r}")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"LoRARequest.lora_int_id={self.lora_int_id!r} is invalid; allowed: an int >= 1")
        if not isinstance(self.lora_path, (str, os.PathLike)) or not os.path.isdir(self.lora_path):
            raise ValueError(f"LoRARequest.lora_path={str(self.lora_path)!r} is not a directory (a PEFT adapter directory)")
        self.lora_path = str(self.lora_path)
        if self.lora_ckpt_source != "hf":
            raise ValueError(f"LoRARequest.lora_ckpt_source={self.lora_ckpt_source!r} is invalid; allowed: 'hf'")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path


@dataclasses.dataclass
class LoraConfig:
    """How the engine serves LoRA adapters (`LLM(enable_lora=True, lora_config=LoraConfig(...))`).

    Args:
      max_lora_rank: the largest adapter rank served; a larger adapter is refused.
      max_loras: adapters resident on the device at once (each running request's adapter must be).
      max_cpu_loras: adapters kept loaded in host memory (>= max_loras).
      lora_target_modules: modules adapters may target (HF names: q_proj, k_proj, v_proj, o_proj,
        gate_proj, up_proj, down_proj); empty means all of them.
      lora_dir: adapter directories to load when the LLM starts.
    """

    lora_dir: List[str] = dataclasses.field(default_factory=list)
    lora_ckpt_source: str = "hf"
    max_lora_rank: int = 64
    lora_target_modules: List[str] = dataclasses.field(default_factory=list)
    trtllm_modules_to_hf_modules: Dict[str, str] = dataclasses.field(default_factory=dict)
    max_loras: Optional[int] = None
    max_cpu_loras: Optional[int] = None
