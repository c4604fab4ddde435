"""Prompt adapters (prompt tuning): learned virtual-token embeddings prepended to a prompt.

TensorRT-LLM's names. An adapter is a Hugging Face PEFT prompt-tuning directory
(`adapter_config.json` and `adapter_model.safetensors` holding `prompt_embeddings`).
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass
class PromptAdapterRequest:
    """A request's prompt adapter: a name, a unique positive integer id, and its PEFT directory."""

    prompt_adapter_name: str
    prompt_adapter_id: int
    prompt_adapter_local_path: str = ""

    def __post_init__(self):
        if not isinstance(self.prompt_adapter_name, str) or not self.prompt_adapter_name:
            raise ValueError(f"PromptAdapterRequest.prompt_adapter_name must be a non-empty str, got {self.prompt_adapter_name!r}")
        pid = self.prompt_adapter_id
        if isinstance(pid, bool) or not isinstance(pid, int) or pid < 1:
            raise ValueError(f"PromptAdapterRequest.prompt_adapter_id={pid!r} is invalid; allowed: an int >= 1")
        path = self.prompt_adapter_local_path
        if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
            raise ValueError(f"PromptAdapterRequest.prompt_adapter_local_path={str(path)!r} is not a directory "
                             "(a PEFT prompt-tuning directory)")  # fmt: skip
        self.prompt_adapter_local_path = str(path)

    @property
    def adapter_id(self) -> int:
        return self.prompt_adapter_id

    @property
    def name(self) -> str:
        return self.prompt_adapter_name

    @property
    def local_path(self) -> str:
        return self.prompt_adapter_local_path
