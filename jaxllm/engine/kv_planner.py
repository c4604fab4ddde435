"""Sizing the paged KV cache from the memory the device has left after the weights.

On a GPU: pages = free_gpu_memory_fraction x (memory left after the weights, less the step's
activation estimate) / bytes per page. On the CPU, which shares memory with everything else, the
caches of all the process's devices together take at most min(1 GiB, 10% of RAM), and never more
than the engine can fill at once (max_batch_size sequences of max_seq_len tokens). `max_tokens`
caps both.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig

CPU_BUDGET_BYTES = 1 << 30
CPU_RAM_SHARE = 0.10


def bytes_per_token(cfg: ModelConfig, kv_dtype, tp_kv_shards: int = 1) -> int:
    """K and V bytes one token takes in every layer, on one device."""
    heads = -(-cfg.num_kv_heads // tp_kv_shards)
    return 2 * cfg.num_layers * heads * cfg.head_dim * jnp.dtype(kv_dtype).itemsize


def activation_reserve(cfg: ModelConfig, max_num_tokens: int, max_batch_size: int) -> int:
    """A generous estimate of one step's transient memory (bytes): hidden states and MLP of every
    packed token in float32, plus the logits and sampling buffers of every sequence."""
    per_token = 4 * (6 * cfg.hidden_size + 3 * cfg.intermediate_size + 2 * cfg.num_heads * cfg.head_dim)
    logits = 4 * cfg.vocab_size * (3 * max_batch_size + max_num_tokens)
    return per_token * max_num_tokens + logits + (512 << 20)


def device_free_bytes(device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def plan_num_pages(cfg: ModelConfig, kv_dtype, page_size: int, kv_config, max_num_tokens: int,
                   max_batch_size: int, devices=None, tp_kv_shards: int = 1, max_seq_len: int | None = None,
                   pending_bytes: int = 0) -> int:  # fmt: skip
    """How many pages (page 0 included) the KV cache gets.

    Args:
      devices: the devices holding the cache (default: the first local device).
      max_seq_len: the longest sequence the engine serves (default: the model's maximum); on the
        CPU the cache holds at most max_batch_size of them.
      pending_bytes: what each device will still take for the weights (the cache is sized before
        they load, so that the programs can be made meanwhile).
    """
    devices = [d for d in (devices or jax.local_devices()[:1]) if d.process_index == jax.process_index()]
    per_token = bytes_per_token(cfg, kv_dtype, tp_kv_shards)
    free = [None if f is None else f - pending_bytes for f in (device_free_bytes(d) for d in devices)]
    if devices[0].platform != "cpu" and all(f is not None for f in free):
        budget = (min(free) - activation_reserve(cfg, max_num_tokens, max_batch_size)) * kv_config.free_gpu_memory_fraction
    else:
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            ram = 8 << 30
        # Virtual CPU devices share the host's RAM: the budget is for all of them together.
        budget = min(CPU_BUDGET_BYTES, CPU_RAM_SHARE * ram) / len(devices)
    tokens = int(max(0, budget) // per_token)
    if devices[0].platform == "cpu":
        tokens = min(tokens, max_batch_size * (max_seq_len or cfg.max_position_embeddings))
    if kv_config.max_tokens is not None:
        tokens = min(tokens, kv_config.max_tokens)
    return tokens // page_size + 1
