"""Prompt adapters (prompt tuning): learned virtual-token embeddings prepended to a prompt.

TensorRT-LLM's names. An adapter is a Hugging Face PEFT prompt-tuning directory:
`adapter_config.json` (peft_type PROMPT_TUNING, num_virtual_tokens) and
`adapter_model.safetensors` holding `prompt_embeddings` [num_virtual_tokens, hidden_size].

The virtual tokens take the first KV positions of a sequence. On the host they are the token ids
vocab_size + i (i < num_virtual_tokens), ahead of the user's prompt; the runner maps them to rows of
a device table that the embedding step reads instead of the vocabulary (jaxllm/layers/adapters.py).
Like transformers fed `inputs_embeds`, their embeddings are used as they are (Gemma's embedding
scale applies only to vocabulary tokens).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from jaxllm.adapters.peft import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, read_adapter_config,
                                  read_adapter_tensors)
from jaxllm.config import ModelConfig


@dataclasses.dataclass
class PromptAdapterRequest:
    """A request's prompt adapter: a name, a unique positive integer id, and its PEFT directory.

    The id identifies the adapter for the LLM's lifetime (caches and KV-cache reuse key on it).
    """

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

    @property
    def path(self) -> str:
        return self.prompt_adapter_local_path


@dataclasses.dataclass(frozen=True, eq=False)
class PromptAdapter:
    """One prompt adapter on the host."""

    adapter_id: int
    path: str
    embeddings: np.ndarray  # [num_virtual_tokens, hidden_size] float32

    @property
    def num_virtual_tokens(self) -> int:
        return self.embeddings.shape[0]


def load_prompt_adapter(path: str | Path, cfg: ModelConfig, max_tokens: int, adapter_id: int = 0) -> PromptAdapter:
    """Read and check a PEFT prompt-tuning directory against the model.

    Args:
      path: the PEFT directory.
      cfg: the model config (its hidden_size).
      max_tokens: max_prompt_adapter_token; an adapter with more virtual tokens is refused.
      adapter_id: the PromptAdapterRequest's prompt_adapter_id.
    Raises:
      AdapterError (a ValueError) naming the file and the bad value.
    """
    path = Path(path)
    config = read_adapter_config(path, "PROMPT_TUNING")
    where = path / ADAPTER_CONFIG
    count = config.get("num_virtual_tokens")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise AdapterError(f"{where}: num_virtual_tokens={count!r} is invalid; allowed: an int >= 1")
    if config.get("num_transformer_submodules") not in (None, 1):
        raise AdapterError(f"{where}: num_transformer_submodules={config['num_transformer_submodules']!r}; allowed: 1 "
                           "(decoder-only models)")  # fmt: skip
    if count > max_tokens:
        raise AdapterError(f"{path}: {count} virtual tokens exceed max_prompt_adapter_token={max_tokens}; allowed: "
                           f"<= {max_tokens} (raise LLM(max_prompt_adapter_token=...))")  # fmt: skip
    tensors = read_adapter_tensors(path)
    if set(tensors) != {"prompt_embeddings"}:
        raise AdapterError(f"{path / ADAPTER_WEIGHTS}: holds {sorted(tensors)}; a prompt-tuning adapter holds exactly "
                           "'prompt_embeddings'")  # fmt: skip
    embeddings = tensors["prompt_embeddings"]
    if embeddings.shape != (count, cfg.hidden_size):
        raise AdapterError(f"{path / ADAPTER_WEIGHTS}: prompt_embeddings has shape {tuple(embeddings.shape)}; this "
                           f"model needs ({count}, {cfg.hidden_size}) (num_virtual_tokens, hidden_size)")  # fmt: skip
    return PromptAdapter(adapter_id=adapter_id, path=str(path), embeddings=embeddings.astype(np.float32))
