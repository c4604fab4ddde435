"""TensorRT-LLM's `LLM()` arguments beyond jaxllm's own engine arguments (jaxllm/llm_args.py).

Two parts:
  - the config classes TensorRT-LLM scripts import (`CudaGraphConfig`, `SchedulerConfig` with its
    policies, `MoeConfig`, `TorchCompileConfig`, `PeftCacheConfig`, `BuildConfig`), under
    TensorRT-LLM's field names; an unknown field is a TypeError naming the allowed ones, a bad value
    a ValueError naming the allowed values;
  - `translate`, which turns every name of TensorRT-LLM's TorchLlmArgs (and a few of vLLM's engine
    names) that jaxllm's EngineArgs does not itself hold into jaxllm's engine arguments. Each name
    is honoured (mapped onto what jaxllm does), accepted with a one-time log line where it only
    tunes TensorRT-LLM's own machinery, or refused with what jaxllm offers instead where jaxllm
    cannot do what it asks.

docs/COMPATIBILITY.md lists every name and what becomes of it.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging
import os
from typing import Any, List, Optional

from jaxllm import guided

logger = logging.getLogger("jaxllm")


# ---- config classes ----------------------------------------------------------------------------
def _config(cls):
    """A dataclass whose constructor refuses unknown fields with a TypeError naming the allowed ones."""
    cls = dataclasses.dataclass(cls)
    names = tuple(f.name for f in dataclasses.fields(cls))
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"{cls.__name__} got unknown field(s) {unknown}; allowed: {', '.join(names)}")
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def _enum(enum_cls, value, name: str):
    try:
        return enum_cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"{name}={value!r} is invalid; allowed: {allowed}") from None


def _check_bool(owner: str, **values) -> None:
    for name, value in values.items():
        if not isinstance(value, bool):
            raise TypeError(f"{owner}.{name} must be a bool, got {value!r}")


def _check_int(owner: str, name: str, value, low: int = 0, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}.{name}={value!r} is invalid; allowed: an int >= {low}"
                         + (" or None" if allow_none else ""))  # fmt: skip


def as_config(cls, value, name: str):
    """`value` (None, an instance of `cls`, or its fields as a dict) as a `cls` or None."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**value)
    raise TypeError(f"{name} must be a {cls.__name__}, a dict of its fields or None, got {type(value).__name__}")


class CapacitySchedulerPolicy(enum.StrEnum):
    """Which requests the scheduler admits (TensorRT-LLM's names; see engine/scheduler.py)."""

    # admit while this step's pages fit and the projected growth of requests of known length does;
    # preempt when pages run out
    MAX_UTILIZATION = "MAX_UTILIZATION"
    GUARANTEED_NO_EVICT = "GUARANTEED_NO_EVICT"  # admit only what can run to its end beside the others
    STATIC_BATCH = "STATIC_BATCH"  # admit only when nothing runs: batches start and end together


class ContextChunkingPolicy(enum.StrEnum):
    FIRST_COME_FIRST_SERVED = "FIRST_COME_FIRST_SERVED"
    EQUAL_PROGRESS = "EQUAL_PROGRESS"
    FORCE_CHUNK = "FORCE_CHUNK"


class WaitingQueuePolicy(enum.StrEnum):
    FCFS = "fcfs"
    PRIORITY = "priority"


@_config
class SchedulerConfig:
    """TensorRT-LLM's scheduler config.

    capacity_scheduler_policy: MAX_UTILIZATION (jaxllm's default when no scheduler_config is given:
        admit while this step's pages fit and, for requests that surely run to max_tokens, while the
        peak of their projected growth does; preempt when pages run out),
        GUARANTEED_NO_EVICT (TensorRT-LLM's default: a request is admitted only when the KV pages
        of its whole length, max_tokens included, fit beside those every running request may
        still need, so nothing is ever preempted) or STATIC_BATCH (new requests wait until every
        running one has finished).
    context_chunking_policy: with chunked prefill, None or FIRST_COME_FIRST_SERVED (prompt chunks
        take the step's token budget in scheduling order) or EQUAL_PROGRESS (the prompts being
        computed share it a KV page at a time, in rounds); FORCE_CHUNK is refused.
    dynamic_batch_config: None (TensorRT-LLM's TensorRT backend only).
    waiting_queue_policy: 'fcfs' (TensorRT-LLM's default: requests are admitted, scheduled and
        preempted in arrival order, SchedulingParams.priority ignored) or 'priority' (higher
        priorities first, then arrival: jaxllm's order when no scheduler_config is given).
    use_python_scheduler, enable_prefix_aware_scheduling: accepted; jaxllm's scheduler is plain
        Python and always counts the cached pages of a prompt's prefix at admission.
    decode_cap (jaxllm's): when every running request decodes and no waiting one can be admitted
        (none waits, or the KV cache has no room for the next), run a decode step at the bucket
        below its rows when the engine's timings say that makes tokens faster, the requests left out
        taking the next step (jaxllm/engine/decode_cap.py): more tokens a second for a draining or
        KV-bound batch, the longer requests' tokens first. None: on with GPUs, off on the CPU.
    """

    capacity_scheduler_policy: CapacitySchedulerPolicy = CapacitySchedulerPolicy.GUARANTEED_NO_EVICT
    context_chunking_policy: Optional[ContextChunkingPolicy] = None
    dynamic_batch_config: Any = None
    waiting_queue_policy: WaitingQueuePolicy = WaitingQueuePolicy.FCFS
    use_python_scheduler: bool = False
    enable_prefix_aware_scheduling: bool = True
    decode_cap: Optional[bool] = None

    def __post_init__(self):
        self.capacity_scheduler_policy = _enum(CapacitySchedulerPolicy, self.capacity_scheduler_policy,
                                               "capacity_scheduler_policy")  # fmt: skip
        if self.context_chunking_policy is not None:
            policy = _enum(ContextChunkingPolicy, self.context_chunking_policy, "context_chunking_policy")
            if policy is ContextChunkingPolicy.FORCE_CHUNK:
                raise ValueError("context_chunking_policy='FORCE_CHUNK' is not supported: jaxllm chunks a prompt only "
                                 "where the step's token budget ends; allowed: None, 'FIRST_COME_FIRST_SERVED', "
                                 "'EQUAL_PROGRESS'")  # fmt: skip
            self.context_chunking_policy = policy
        if self.dynamic_batch_config is not None:
            raise ValueError("SchedulerConfig.dynamic_batch_config applies to TensorRT-LLM's TensorRT backend only; "
                             "allowed: None (jaxllm's batch limits are max_batch_size and max_num_tokens)")  # fmt: skip
        self.waiting_queue_policy = _enum(WaitingQueuePolicy, self.waiting_queue_policy, "waiting_queue_policy")
        _check_bool("SchedulerConfig", use_python_scheduler=self.use_python_scheduler,
                    enable_prefix_aware_scheduling=self.enable_prefix_aware_scheduling)  # fmt: skip
        if self.decode_cap is not None:
            _check_bool("SchedulerConfig", decode_cap=self.decode_cap)


@_config
class CudaGraphConfig:
    """TensorRT-LLM's CUDA graph config, as jaxllm's decode batch buckets.

    jaxllm runs every step as a program compiled before serving, padded to a bucket (on GPUs XLA
    records the programs as CUDA graphs, its command buffers): a decode-only step of B sequences
    runs in the smallest decode bucket >= B. `batch_sizes` lists the decode buckets up to its
    largest (sizes below the GPUs' two-row minimum, engine/buckets.py GPU_MIN_DECODE_ROWS, run the
    two-row bucket); above it the buckets go on in powers of two up to max_batch_size, since every
    batch needs a program. Without `batch_sizes` the buckets are jaxllm's powers of two.
    `enable_padding`: accepted; jaxllm always pads a batch to its bucket. CudaGraphConfig() is the
    default, as in TensorRT-LLM; LLM(cuda_graph_config=None), TensorRT-LLM's way to turn CUDA
    graphs off, compiles jaxllm's GPU programs without XLA's command buffers.

    Args:
      batch_sizes: decode batch sizes with their own program (positive ints).
      max_batch_size: max(batch_sizes) (derived when 0); without batch_sizes, 128 when 0.
      enable_padding: accepted (jaxllm always pads).
    """

    batch_sizes: Optional[List[int]] = None
    max_batch_size: int = 0
    enable_padding: bool = False

    def __post_init__(self):
        _check_int("CudaGraphConfig", "max_batch_size", self.max_batch_size)
        _check_bool("CudaGraphConfig", enable_padding=self.enable_padding)
        if self.batch_sizes:
            if not isinstance(self.batch_sizes, (list, tuple)) or any(
                isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.batch_sizes
            ):
                raise ValueError(f"CudaGraphConfig.batch_sizes={self.batch_sizes!r} is invalid; allowed: a list of "
                                 "positive ints")  # fmt: skip
            self.batch_sizes = sorted(set(self.batch_sizes))
            largest = self.batch_sizes[-1]
            if self.max_batch_size == 0:
                self.max_batch_size = largest
            elif self.max_batch_size != largest:
                raise ValueError(f"CudaGraphConfig.max_batch_size={self.max_batch_size} is invalid with batch_sizes="
                                 f"{self.batch_sizes}; allowed: 0 or max(batch_sizes)={largest}")  # fmt: skip
        else:
            self.batch_sizes = None
            self.max_batch_size = self.max_batch_size or 128


MOE_BACKENDS = ("AUTO", "CUTLASS", "CUTEDSL", "WIDEEP", "TRTLLM", "DEEPGEMM", "DENSEGEMM", "VANILLA", "TRITON",
                "MARLIN", "MEGAMOE_DEEPGEMM")  # fmt: skip


@_config
class MoeConfig:
    """TensorRT-LLM's MoE config. jaxllm serves dense models only, so it has nothing to tune here;
    a non-default config is accepted with a one-time log line."""

    backend: str = "AUTO"
    max_num_tokens: Optional[int] = None
    load_balancer: Any = None
    disable_finalize_fusion: bool = False

    def __post_init__(self):
        if self.backend not in MOE_BACKENDS:
            raise ValueError(f"MoeConfig.backend={self.backend!r} is invalid; allowed: {', '.join(map(repr, MOE_BACKENDS))}")
        _check_int("MoeConfig", "max_num_tokens", self.max_num_tokens, low=1, allow_none=True)
        _check_bool("MoeConfig", disable_finalize_fusion=self.disable_finalize_fusion)


@_config
class TorchCompileConfig:
    """TensorRT-LLM's torch.compile config: accepted with a one-time log line (jaxllm's programs are
    compiled by XLA, all of them before LLM() returns)."""

    enable_fullgraph: bool = True
    enable_inductor: bool = False
    enable_piecewise_cuda_graph: bool = False
    capture_num_tokens: Optional[List[int]] = None
    enable_userbuffers: bool = True
    max_num_streams: int = 3

    def __post_init__(self):
        _check_bool("TorchCompileConfig", enable_fullgraph=self.enable_fullgraph, enable_inductor=self.enable_inductor,
                    enable_piecewise_cuda_graph=self.enable_piecewise_cuda_graph,
                    enable_userbuffers=self.enable_userbuffers)  # fmt: skip
        if self.capture_num_tokens is not None and (not isinstance(self.capture_num_tokens, (list, tuple)) or any(
                isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in self.capture_num_tokens)):  # fmt: skip
            raise ValueError(f"TorchCompileConfig.capture_num_tokens={self.capture_num_tokens!r} is invalid; allowed: "
                             "None or a list of positive ints")  # fmt: skip
        _check_int("TorchCompileConfig", "max_num_streams", self.max_num_streams, low=1)


@_config
class PeftCacheConfig:
    """TensorRT-LLM's PEFT (LoRA) cache sizes: accepted with a one-time log line. jaxllm's LoRA cache
    is sized by LoraConfig.max_loras (device slots) and max_cpu_loras (host)."""

    num_host_module_layer: int = 0
    num_device_module_layer: int = 0
    optimal_adapter_size: int = 8
    max_adapter_size: int = 64
    num_put_workers: int = 1
    num_ensure_workers: int = 1
    num_copy_streams: int = 1
    max_pages_per_block_host: int = 24
    max_pages_per_block_device: int = 8
    device_cache_percent: float = 0.02
    host_cache_size: int = 1024**3
    lora_prefetch_dir: Optional[str] = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.type == "int":
                _check_int("PeftCacheConfig", f.name, getattr(self, f.name))
        p = self.device_cache_percent
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"PeftCacheConfig.device_cache_percent={p!r} is invalid; allowed: a number in [0, 1]")
        if self.lora_prefetch_dir is not None:
            raise ValueError("PeftCacheConfig.lora_prefetch_dir is not supported (nor by TensorRT-LLM); allowed: None "
                             "(LoraConfig.lora_dir lists adapters read when the LLM starts)")  # fmt: skip


# BuildConfig fields that only shape a TensorRT engine build: accepted, logged once.
_BUILD_ONLY = ("opt_batch_size", "opt_num_tokens", "max_prompt_embedding_table_size", "kv_cache_type",
               "gather_context_logits", "strongly_typed", "profiling_verbosity", "enable_debug_output",
               "max_draft_len", "use_refit", "weight_sparsity", "weight_streaming", "plugin_config",
               "use_strip_plan", "dry_run", "visualize_network", "monitor_memory")  # fmt: skip
BUILD_SIZES = ("max_batch_size", "max_num_tokens", "max_seq_len", "max_input_len", "max_beam_width")


@_config
class BuildConfig:
    """TensorRT-LLM's BuildConfig. With the PyTorch backend TensorRT-LLM takes its runtime sizes
    (max_batch_size, max_num_tokens, max_seq_len, max_input_len, max_beam_width) as the LLM's, and so
    does jaxllm; a size left None keeps jaxllm's default, and a size given both here and to LLM()
    with another value is refused. gather_generation_logits is LLM()'s. The other fields shape a
    TensorRT engine build only: accepted with a one-time log line."""

    max_batch_size: Optional[int] = None
    max_num_tokens: Optional[int] = None
    max_seq_len: Optional[int] = None
    max_input_len: Optional[int] = None
    max_beam_width: Optional[int] = None
    gather_generation_logits: bool = False
    opt_batch_size: Any = None
    opt_num_tokens: Any = None
    max_prompt_embedding_table_size: Any = None
    kv_cache_type: Any = None
    gather_context_logits: Any = None
    strongly_typed: Any = None
    profiling_verbosity: Any = None
    enable_debug_output: Any = None
    max_draft_len: Any = None
    use_refit: Any = None
    weight_sparsity: Any = None
    weight_streaming: Any = None
    plugin_config: Any = None
    use_strip_plan: Any = None
    dry_run: Any = None
    visualize_network: Any = None
    monitor_memory: Any = None

    def __post_init__(self):
        for name in BUILD_SIZES:
            _check_int("BuildConfig", name, getattr(self, name), low=1, allow_none=True)
        _check_bool("BuildConfig", gather_generation_logits=self.gather_generation_logits)


# ---- LLM() arguments ---------------------------------------------------------------------------
# Arguments that only tune TensorRT-LLM's own machinery: any value is accepted; one other than the
# default is logged once. name -> (TensorRT-LLM's default, what it tunes).
NOOP_ARGS: dict[str, tuple[Any, str]] = {
    "enable_autotuner": (True, "TensorRT-LLM's kernel autotuner (XLA autotunes jaxllm's programs as it compiles them)"),
    "torch_compile_config": (None, "torch.compile (XLA compiles jaxllm's programs, all before LLM() returns)"),
    "allreduce_strategy": ("AUTO", "TensorRT-LLM's all-reduce kernels (jaxllm's are XLA's, over NCCL)"),
    "peft_cache_config": (None, "TensorRT-LLM's PEFT cache (jaxllm's: LoraConfig.max_loras / max_cpu_loras)"),
    "moe_config": (MoeConfig(), "MoE kernels (jaxllm serves dense models only)"),
    "enable_layerwise_nvtx_marker": (False, "NVTX profiling markers"),
    "enable_min_latency": (False, "Llama4's min-latency kernels"),
    "force_dynamic_quantization": (False, "TensorRT-LLM's dynamic quantization"),
    "use_cute_dsl_blockscaling_mm": (False, "CuTe DSL kernels"),
    "use_cute_dsl_blockscaling_bmm": (False, "CuTe DSL kernels"),
    "use_cute_dsl_bf16_bmm": (False, "CuTe DSL kernels"),
    "use_cute_dsl_bf16_gemm": (False, "CuTe DSL kernels"),
    "use_fine_grained_sync": (False, "MoE kernel synchronization"),
    "nvfp4_gemm_config": (None, "NVFP4 GEMM kernels"),
    "enable_mla_skip_correction": (False, "MLA attention kernels"),
    "mla_skip_correction_threshold": (8.0, "MLA attention kernels"),
    "sampler_type": ("auto", "TensorRT-LLM's sampler choice (jaxllm has one sampler, on the device)"),
    "sampler_force_async_worker": (False, "TensorRT-LLM's sampler copies"),
    "enable_in_graph_sampling": (False, "TensorRT-LLM's CUDA graphs (jaxllm samples in its own compiled program)"),
    "enable_speculative_beam_history_d2h": (False, "beam search copies"),
    "enable_early_first_token_response": (False, "TensorRT-LLM's overlap scheduler"),
    "enable_low_latency_host_dispatch": (False, "CUDA host callbacks"),
    "prefill_cuda_graph_backend": ("disabled", "prefill CUDA graphs (jaxllm compiles every prefill bucket)"),
    "prefill_capture_num_tokens": (None, "prefill CUDA graphs (jaxllm compiles every prefill bucket)"),
    "checkpoint_io_policy": ("auto", "TensorRT-LLM's checkpoint reader"),
    "mx_config": (None, "ModelExpress weight transfer"),
    "gms_config": (None, "GPU Memory Service weight sharing"),
    "max_stats_len": (1000, "TensorRT-LLM's performance statistics buffer"),
    "layer_wise_benchmarks_config": (None, "layer-wise benchmarks"),
    "enable_resource_governor": (False, "TensorRT-LLM's resource governor"),
    "batch_wait_timeout_ms": (0, "batch accumulation (jaxllm admits waiting requests at every step)"),
    "batch_wait_timeout_iters": (0, "batch accumulation (jaxllm admits waiting requests at every step)"),
    "batch_wait_max_tokens_ratio": (0, "batch accumulation (jaxllm admits waiting requests at every step)"),
    "perf_metrics_max_requests": (0, "a deprecated perf-metrics buffer"),
    "prometheus_metrics_config": (None, "trtllm-serve's metrics (jaxllm serve has its own /metrics)"),
    "return_perf_metrics": (False, "trtllm-serve's metrics header (jaxllm: SamplingParams.return_perf_metrics)"),
    "telemetry_config": (None, "TensorRT-LLM's usage telemetry (jaxllm sends none)"),
    "postprocess_tokenizer_dir": (None, "postprocess workers (jaxllm detokenizes on its engine thread)"),
    "enable_lm_head_tp_in_adp": (False, "attention data parallelism"),
    "multimodal_config": (None, "multimodal encoders (jaxllm serves text models)"),
    "disable_mm_encoder": (False, "multimodal encoders (jaxllm serves text models)"),
    "encoder_max_batch_size": (None, "encoder-decoder models (jaxllm serves decoder-only models)"),
    "encoder_max_num_tokens": (None, "encoder-decoder models (jaxllm serves decoder-only models)"),
    "enable_encoder_decoder_mixed_cuda_graph": (True, "encoder-decoder models (jaxllm serves decoder-only models)"),
    "disable_log_stats": (False, "vLLM's periodic stats log (jaxllm logs iterations only with print_iter_log=True)"),
}

# Arguments jaxllm cannot honour beyond their defaults: name -> (allowed values, what jaxllm offers).
DEFAULT_ONLY_ARGS: dict[str, tuple[tuple, str]] = {
    "context_parallel_size": ((1,), "jaxllm splits a model across devices with tensor_parallel_size"),
    "enable_attention_dp": ((False,), "jaxllm splits a model across devices with tensor_parallel_size"),
    "attention_dp_config": ((None,), "jaxllm has no attention data parallelism (tensor_parallel_size splits a model)"),
    "moe_tensor_parallel_size": ((None, 1, -1), "jaxllm serves dense models only (tensor_parallel_size splits them)"),
    "moe_cluster_parallel_size": ((None, 1, -1), "jaxllm serves dense models only (tensor_parallel_size splits them)"),
    "cp_config": ((None,), "jaxllm has no context parallelism (tensor_parallel_size splits a model)"),
    "pp_partition": ((None,), "jaxllm has no pipeline parallelism (tensor_parallel_size splits a model)"),
    "dwdp_config": ((None,), "jaxllm serves dense models only"),
    "checkpoint_loader": ((None,), "jaxllm reads HF checkpoint directories, GGUF files and its saved engines itself"),
    "custom_tokenizer": ((None,), "pass a tokenizer object or path as LLM(tokenizer=...)"),
    "post_processor_hook": ((None,), "postprocess RequestOutput.outputs in the caller"),
    "model_kwargs": ((None,), "edit the checkpoint's config.json"),
    "decoding_config": ((None,), "speculative decoding takes speculative_config"),
    "sparse_attention_config": ((None,), "jaxllm's attention is dense (paged)"),
    "kv_cache_compression_config": ((None,), "jaxllm keeps every token's K/V"),
    "kv_connector_config": ((None,), "disaggregated serving moves KV pages through cache_transceiver_config"),
    "mm_encoder_only": ((False,), "jaxllm serves text models"),
    "encode_only": ((False,), "jaxllm generates (LLM.generate); prompt log-probabilities: SamplingParams.prompt_logprobs"),
    "encoder_cuda_graph_config": ((None,), "jaxllm serves decoder-only models"),
    "reasoning_parser": ((None,), "jaxllm does not split reasoning content from the answer"),
    "orchestrator_type": ((None,), "jaxllm runs several processes with python -m jaxllm.launch"),
    "mpi_session": ((None,), "jaxllm runs several processes with python -m jaxllm.launch (no MPI)"),
    "ray_worker_extension_cls": ((None,), "jaxllm has no Ray workers"),
    "ray_placement_config": ((None,), "jaxllm has no Ray workers"),
    "ray_worker_nsight_options": ((None,), "jaxllm has no Ray workers"),
    "sleep_config": ((None,), "shut an LLM down with LLM.shutdown() and build it again"),
    "reorder_policy_config": ((None,), "order requests with SchedulingParams.priority"),
    "num_serve_frontends": ((1,), "jaxllm serve runs one frontend process"),
    "otlp_traces_endpoint": ((None,), "jaxllm exports no OpenTelemetry traces"),
    "perf_metrics_output_dir": ((None,), "per-request metrics: SamplingParams.return_perf_metrics"),
    "enable_energy_metrics": ((False,), "jaxllm reads no NVML energy counters"),
    "generation_config": (("trtllm",), "jaxllm's SamplingParams defaults are TensorRT-LLM's; give values per request"),
    "batching_type": ((None, "INFLIGHT"), "jaxllm batches in flight"),
}

GUIDED_DECODING_BACKENDS = guided.BACKENDS
_logged: set[str] = set()


def _log_once(name: str, message: str, *args) -> None:
    if name not in _logged:
        _logged.add(name)
        logger.warning(message, *args)


def _differs(value, default) -> bool:
    """Whether a no-op argument's value is worth a log line: not TensorRT-LLM's default (a config
    where the default is None, such as torch_compile_config=TorchCompileConfig(), turns a feature on)."""
    if isinstance(value, dict) and dataclasses.is_dataclass(default):
        return value != dataclasses.asdict(default)
    return value != default


def _set_once(out: dict, name: str, value, source: str) -> None:
    """out[name] = value, refusing a different value already given."""
    if value is None:
        return
    given = out.get(name)
    if given is not None and given != value:
        raise ValueError(f"{source}={value!r} conflicts with {name}={given!r}; give one of them, or the same value")
    out[name] = value


def _kv_cache_dtype(out: dict, value) -> None:
    """kv_cache_dtype (TensorRT-LLM's older name) is kv_cache_config.dtype ('fp8': float8 E4M3)."""
    from jaxllm.config import KV_DTYPE_CHOICES, resolve_kv_dtype

    if not isinstance(value, str):
        raise TypeError(f"kv_cache_dtype must be a str, got {value!r}")
    if value == "auto":
        return
    try:
        resolve_kv_dtype(value)
    except ValueError:
        raise ValueError(f"kv_cache_dtype={value!r} is not supported; allowed: {KV_DTYPE_CHOICES} "
                         "(jaxllm has no nvfp4 / int8 KV cache)") from None  # fmt: skip
    config = out.get("kv_cache_config")
    current = config.get("dtype", "auto") if isinstance(config, dict) else getattr(config, "dtype", "auto")
    if current != "auto" and resolve_kv_dtype(current) != resolve_kv_dtype(value):
        raise ValueError(f"kv_cache_dtype={value!r} conflicts with kv_cache_config.dtype={current!r}; give one of them")
    if config is None:
        out["kv_cache_config"] = {"dtype": value}
    elif isinstance(config, dict):
        out["kv_cache_config"] = {**config, "dtype": value}
    else:
        out["kv_cache_config"] = dataclasses.replace(config, dtype=value)


def _lora_sizes(out: dict, sizes: dict) -> None:
    """Top-level max_loras / max_lora_rank / max_cpu_loras (vLLM's and older TensorRT-LLM's names) are
    lora_config's, when LoRA is enabled (enable_lora=True or a lora_config), as there."""
    from jaxllm.adapters import LoraConfig

    config = out.get("lora_config")
    if isinstance(config, dict):
        config = LoraConfig(**config)
    if config is None:
        if out.get("enable_lora") is not True:
            _log_once("max_loras", "%s have no effect without enable_lora=True", ", ".join(sorted(sizes)))
            return
        out["lora_config"] = LoraConfig(**sizes)
        return
    for name, value in sizes.items():
        current = getattr(config, name)
        if current is not None and current != value and not (name == "max_lora_rank" and current == 64):
            raise ValueError(f"{name}={value!r} conflicts with lora_config.{name}={current!r}; give one of them")
    out["lora_config"] = dataclasses.replace(config, **sizes)


def translate(kwargs: dict) -> dict:
    """The engine arguments of `LLM(**kwargs)`: TensorRT-LLM's (and vLLM's) names that EngineArgs does
    not hold are mapped onto it, validated, logged once, or refused (ValueError / TypeError naming
    what jaxllm offers). Names it does not know are left for EngineArgs to refuse."""
    out = dict(kwargs)
    for name, (allowed, offers) in DEFAULT_ONLY_ARGS.items():
        if name in out:
            value = out.pop(name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not supported by jaxllm; allowed: "
                                 f"{', '.join(map(repr, allowed))} ({offers})")  # fmt: skip
    for name, (default, tunes) in NOOP_ARGS.items():
        if name not in out:
            continue
        value = out.pop(name)
        if name == "moe_config":
            value = as_config(MoeConfig, value, name)
        elif name == "torch_compile_config":
            value = as_config(TorchCompileConfig, value, name)
        elif name == "peft_cache_config":
            value = as_config(PeftCacheConfig, value, name)
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
        if _differs(value, default):
            _log_once(name, "%s=%r is accepted and has no effect: it tunes %s", name, value, tunes)
    if out.get("guided_decoding_backend") is not None and out["guided_decoding_backend"] not in GUIDED_DECODING_BACKENDS:
        raise ValueError(f"guided_decoding_backend={out['guided_decoding_backend']!r} is not supported; allowed: "
                         f"{', '.join(map(repr, GUIDED_DECODING_BACKENDS))} (both served by llguidance) or None")  # fmt: skip
    if "checkpoint_format" in out:
        fmt = out.pop("checkpoint_format")
        if fmt is not None and (not isinstance(fmt, str) or fmt.upper() != "HF"):
            raise ValueError(f"checkpoint_format={fmt!r} is not supported; allowed: None, 'HF' (jaxllm reads HF "
                             "checkpoint directories, GGUF files and its saved engines, whichever `model` is)")  # fmt: skip
    if out.pop("normalize_log_probs", False) is not False:
        raise ValueError("normalize_log_probs=True is not supported: jaxllm's log-probabilities are under the model's "
                         "whole distribution (not renormalized over top-k / top-p); allowed: False")  # fmt: skip
    env = out.pop("env_overrides", None)
    if env is not None:
        if not isinstance(env, dict):
            raise TypeError(f"env_overrides must be a dict of environment variables, got {type(env).__name__}")
        os.environ.update({str(k): str(v) for k, v in env.items()})
    if "max_model_len" in out:  # vLLM's name of max_seq_len
        _set_once(out, "max_seq_len", out.pop("max_model_len"), "max_model_len")
    build = as_config(BuildConfig, out.pop("build_config", None), "build_config")
    if build is not None:
        for name in BUILD_SIZES:
            _set_once(out, name, getattr(build, name), f"build_config.{name}")
        if build.gather_generation_logits:
            out["gather_generation_logits"] = True
        set_fields = [n for n in _BUILD_ONLY if getattr(build, n) is not None]
        if set_fields:
            _log_once("build_config", "build_config fields %s are accepted and have no effect: they shape a "
                      "TensorRT engine build", set_fields)  # fmt: skip
    generation_logits = out.pop("gather_generation_logits", False)
    if not isinstance(generation_logits, bool):
        raise TypeError(f"gather_generation_logits must be a bool, got {generation_logits!r}")
    if "kv_cache_dtype" in out:
        _kv_cache_dtype(out, out.pop("kv_cache_dtype"))
    sizes = {name: out.pop(name) for name in ("max_loras", "max_lora_rank", "max_cpu_loras") if name in out}
    if sizes:
        _lora_sizes(out, sizes)
    return out


def attention_backend(backend: Optional[str], attn_backend: Optional[str]) -> Optional[str]:
    """LLM's `backend` with TensorRT-LLM's `attn_backend` folded in: 'TRTLLM' and 'FLASHINFER' name
    jaxllm's default attention backend (the Pallas kernels on GPUs), 'VANILLA' its plain-XLA one
    ('xla'); logged once. An attention backend named by both must agree."""
    if attn_backend is None:
        return backend
    if not isinstance(attn_backend, str) or attn_backend.upper() not in ("TRTLLM", "FLASHINFER", "VANILLA"):
        raise ValueError(f"attn_backend={attn_backend!r} is invalid; allowed: 'TRTLLM', 'FLASHINFER', 'VANILLA' "
                         "(or jaxllm's own names through backend=: 'xla', 'pallas', 'pallas_interpret')")  # fmt: skip
    chosen = "xla" if attn_backend.upper() == "VANILLA" else None  # None: the platform's default
    if backend in (None, "pytorch", "_autodeploy", "tensorrt"):
        if attn_backend.upper() != "TRTLLM":
            _log_once("attn_backend", "attn_backend=%r selects jaxllm's %s attention backend", attn_backend,
                      repr(chosen) if chosen else "default")  # fmt: skip
        return chosen if chosen is not None else backend
    if chosen is not None and backend != chosen:
        raise ValueError(f"attn_backend={attn_backend!r} (jaxllm's 'xla') conflicts with backend={backend!r}; give one")
    return backend


def check_engine_fields(args) -> None:
    """Validate (and turn dicts into configs) the TensorRT-LLM arguments EngineArgs holds because the
    engine honours them: stream_interval, print_iter_log, cuda_graph_config, scheduler_config,
    garbage_collection_gen0_threshold."""
    si = args.stream_interval
    if isinstance(si, bool) or not isinstance(si, int) or si < 1:
        raise ValueError(f"stream_interval={si!r} is invalid; allowed: a positive int")
    if not isinstance(args.print_iter_log, bool):
        raise TypeError(f"print_iter_log must be a bool, got {args.print_iter_log!r}")
    args.cuda_graph_config = as_config(CudaGraphConfig, args.cuda_graph_config, "cuda_graph_config")
    args.scheduler_config = as_config(SchedulerConfig, args.scheduler_config, "scheduler_config")
    gc0 = args.garbage_collection_gen0_threshold
    if gc0 is not None and (isinstance(gc0, bool) or not isinstance(gc0, int) or gc0 < 0):
        raise ValueError(f"garbage_collection_gen0_threshold={gc0!r} is invalid; allowed: an int >= 0 or None")
