"""Sizing the paged KV cache from the memory the device has left after the weights.

On a GPU: pages = free_gpu_memory_fraction x (memory left after the weights, less the step's
activation estimate) / bytes per page, where the memory is what JAX's allocator may hold: 92% of the
card unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise (set by `import jaxllm`; JAX alone takes
75%). On the CPU, which shares memory with everything else, the caches of all the process's devices
together take at most min(1 GiB, 10% of RAM), and never more than the engine can fill at once
(max_batch_size sequences of max_seq_len tokens). `max_tokens` caps both; on a GPU whose allocator
keeps no statistics (XLA_PYTHON_CLIENT_ALLOCATOR=platform) it is the size, else 1 GiB with a warning.

Before any of that, `check_weights_fit` refuses a model whose weights alone (estimated from the
config) exceed the memory the devices have: a config with ten million layers fails at once with
both figures instead of allocating until the process runs out of memory.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig

CPU_BUDGET_BYTES = 1 << 30
CPU_RAM_SHARE = 0.10
# The cache of a GPU whose allocator reports no memory statistics, unless max_tokens sizes it.
UNKNOWN_DEVICE_BUDGET_BYTES = 1 << 30

logger = logging.getLogger(__name__)


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


def host_available_bytes() -> int:
    """The host memory a new allocation can take: /proc/meminfo's MemAvailable (Linux), else the
    free physical pages, else all of them; capped by the cgroup's limit less its usage."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        for name in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
            try:
                available = os.sysconf("SC_PAGE_SIZE") * os.sysconf(name)
                break
            except (ValueError, OSError):
                continue
    try:  # a container's limit (cgroup v2)
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            available = min(available if available is not None else int(limit), int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(0, available if available is not None else 8 << 30)


def check_weights_fit(weight_bytes: int, devices, tensor_parallel_size: int = 1) -> None:
    """Refuse (ValueError, with both figures) weights that cannot fit: on a GPU, each device's share
    (weight_bytes / tensor_parallel_size, a lower bound) against its free memory; on the CPU, where
    every virtual device shares the host's memory, all of them against the host's available memory.

    Args:
      weight_bytes: the whole model's parameter bytes (models/params.param_bytes).
      devices: the devices the weights are placed on.
    """
    devices = [d for d in devices if d.process_index == jax.process_index()]
    if not devices:
        return
    free = [device_free_bytes(d) for d in devices]
    if devices[0].platform != "cpu" and all(f is not None for f in free):
        need, available = -(-weight_bytes // tensor_parallel_size), min(free)
        where = f"each of the {len(devices)} devices" if len(devices) > 1 else f"the device ({devices[0].device_kind})"
        share = f" per device ({tensor_parallel_size}-way tensor parallel)" if tensor_parallel_size > 1 else ""
    else:
        need, available, where, share = weight_bytes, host_available_bytes(), "the host", ""
    if need > available:
        raise ValueError(
            f"the model's weights need an estimated {need:,} bytes ({need / (1 << 30):.2f} GiB){share}, more than "
            f"the {available:,} bytes ({available / (1 << 30):.2f} GiB) {where} has available; allowed: weights "
            "within the available memory (check the config's sizes and num_hidden_layers, choose a smaller dtype, "
            "or spread the model over more devices with tensor_parallel_size)"
        )


def plan_num_pages(cfg: ModelConfig, kv_dtype, page_size: int, kv_config, max_num_tokens: int,
                   max_batch_size: int, devices=None, tp_kv_shards: int = 1, max_seq_len: int | None = None,
                   pending_bytes: int = 0, extra_per_token: int = 0) -> int:  # fmt: skip
    """How many pages (page 0 included) the KV cache gets.

    Args:
      devices: the devices holding the cache (default: the first local device).
      max_seq_len: the longest sequence the engine serves (default: the model's maximum); on the
        CPU the cache holds at most max_batch_size of them.
      pending_bytes: what each device will still take for the weights (the cache is sized before
        they load, so that the programs can be made meanwhile).
      extra_per_token: bytes a token takes in another cache over the same pages (a draft model's).
    """
    devices = [d for d in (devices or jax.local_devices()[:1]) if d.process_index == jax.process_index()]
    per_token = bytes_per_token(cfg, kv_dtype, tp_kv_shards) + extra_per_token
    free = [None if f is None else f - pending_bytes for f in (device_free_bytes(d) for d in devices)]
    if devices[0].platform != "cpu" and all(f is not None for f in free):
        budget = (min(free) - activation_reserve(cfg, max_num_tokens, max_batch_size)) * kv_config.free_gpu_memory_fraction
    elif devices[0].platform != "cpu":
        # An accelerator whose allocator keeps no statistics (XLA_PYTHON_CLIENT_ALLOCATOR=platform):
        # its free memory is unknown, so the cache takes max_tokens when given (the cap below), else a
        # small default.
        if kv_config.max_tokens is not None:
            budget = kv_config.max_tokens * per_token
        else:
            budget = UNKNOWN_DEVICE_BUDGET_BYTES
            logger.warning(
                "the %s device reports no memory statistics (is XLA_PYTHON_CLIENT_ALLOCATOR=platform set?): the KV "
                "cache gets %d GiB; set kv_cache_config.max_tokens to size it, or use JAX's default allocator",
                devices[0].platform, UNKNOWN_DEVICE_BUDGET_BYTES >> 30)  # fmt: skip
    else:
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            ram = 8 << 30
        # Virtual CPU devices share the host's RAM: the budget is for all of them together.
        budget = min(CPU_BUDGET_BYTES, CPU_RAM_SHARE * ram) / len(devices)
    tokens = int(max(0, budget) // per_token)
    if devices[0].platform == "cpu":  # whole pages per sequence: a max_seq_len of 52 at page 32 needs 2
        pages_per_seq = -(-(max_seq_len or cfg.max_position_embeddings) // page_size)
        tokens = min(tokens, max_batch_size * pages_per_seq * page_size)
    if kv_config.max_tokens is not None:
        tokens = min(tokens, kv_config.max_tokens)
    return tokens // page_size + 1
