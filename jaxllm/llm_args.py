"""Engine arguments of `LLM(...)`, under TensorRT-LLM's names, validated before anything loads."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional


def _positive_int(name: str, value, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid; allowed: a positive int" + (" or None" if allow_none else ""))


@dataclasses.dataclass
class KvCacheConfig:
    """How much of the device the paged KV cache takes (TensorRT-LLM's KvCacheConfig).

    free_gpu_memory_fraction: share of the device memory left free after the weights (GPU only).
    max_tokens: an upper bound on the tokens the cache holds (on the CPU, the default bound is
        what fits in min(1 GiB, 10% of RAM)).
    tokens_per_block: the page size.
    enable_block_reuse: share full pages between requests with the same prefix.
    dtype: KV cache dtype: 'auto' (the model's), 'float32', 'bfloat16', 'float16'.
    """

    free_gpu_memory_fraction: float = 0.9
    max_tokens: Optional[int] = None
    tokens_per_block: int = 32
    enable_block_reuse: bool = True
    dtype: str = "auto"

    def __post_init__(self):
        f = self.free_gpu_memory_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
            raise ValueError(f"free_gpu_memory_fraction={f!r} is invalid; allowed: a number in (0, 1]")
        _positive_int("max_tokens", self.max_tokens)
        _positive_int("tokens_per_block", self.tokens_per_block, allow_none=False)
        tpb = self.tokens_per_block
        if tpb & (tpb - 1) or tpb > 1024:
            raise ValueError(f"tokens_per_block={tpb} is invalid; allowed: a power of two up to 1024")
        if not isinstance(self.enable_block_reuse, bool):
            raise TypeError(f"enable_block_reuse must be a bool, got {self.enable_block_reuse!r}")


@dataclasses.dataclass
class EngineArgs:
    """The engine arguments `LLM(**kwargs)` accepts (TensorRT-LLM names; defaults as there)."""

    max_batch_size: int = 2048
    max_num_tokens: int = 8192
    max_seq_len: Optional[int] = None  # None: the model's max_position_embeddings (capped by the cache)
    max_input_len: Optional[int] = None
    kv_cache_config: Any = None
    enable_chunked_prefill: bool = True
    load_format: str = "auto"  # 'auto' reads the checkpoint; 'dummy' makes random weights on the device
    seed: Optional[int] = None  # engine-wide base for unseeded requests' random streams
    num_postprocess_workers: int = 0
    iter_stats_max_iterations: Optional[int] = None
    enable_iter_perf_stats: bool = True
    # Accepted for compatibility with TensorRT-LLM scripts; values other than these are refused.
    pipeline_parallel_size: int = 1
    moe_expert_parallel_size: Optional[int] = None
    gpus_per_node: Optional[int] = None
    enable_lora: bool = False
    lora_config: Any = None
    max_beam_width: int = 1
    # Compilation: persistent compilation cache directory (None: JAX's default behaviour).
    compilation_cache_dir: Optional[str] = None

    def __post_init__(self):
        _positive_int("max_batch_size", self.max_batch_size, allow_none=False)
        _positive_int("max_num_tokens", self.max_num_tokens, allow_none=False)
        _positive_int("max_seq_len", self.max_seq_len)
        _positive_int("max_input_len", self.max_input_len)
        if self.kv_cache_config is None:
            self.kv_cache_config = KvCacheConfig()
        elif isinstance(self.kv_cache_config, dict):
            self.kv_cache_config = KvCacheConfig(**self.kv_cache_config)
        elif not isinstance(self.kv_cache_config, KvCacheConfig):
            raise TypeError(f"kv_cache_config must be a KvCacheConfig or dict, got {type(self.kv_cache_config).__name__}")
        if not isinstance(self.enable_chunked_prefill, bool):
            raise TypeError(f"enable_chunked_prefill must be a bool, got {self.enable_chunked_prefill!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format={self.load_format!r} is invalid; allowed: 'auto', 'dummy'")
        if self.pipeline_parallel_size != 1:
            raise NotImplementedError("pipeline_parallel_size > 1 is not supported by jaxllm (use tensor_parallel_size)")
        if self.moe_expert_parallel_size not in (None, 1):
            raise NotImplementedError("moe_expert_parallel_size is not supported (no MoE models in jaxllm)")
        if self.max_beam_width != 1:
            raise NotImplementedError("beam search (max_beam_width > 1) is not supported by jaxllm")
        if self.enable_lora or self.lora_config is not None:
            raise NotImplementedError("LoRA (enable_lora / lora_config) is not supported yet")

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "EngineArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"LLM() got unknown argument(s) {unknown}; engine arguments: {', '.join(sorted(names))}")
        return cls(**kwargs)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        return data
