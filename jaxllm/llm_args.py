"""Engine arguments of `LLM(...)`, under TensorRT-LLM's names, validated before anything loads, and
the attention backend they name (`resolve_backend`)."""

from __future__ import annotations

import dataclasses
import datetime
import logging
from typing import Any, List, Optional

import jax

from jaxllm import calibration, quantization, speculative, trtllm_args
from jaxllm.adapters import LoraConfig
from jaxllm.sampling_params import MAX_LOGPROBS

logger = logging.getLogger("jaxllm")

# 'pallas_interpret' runs the Pallas kernels in the Pallas interpreter, on any platform: slow, for
# tests and for reading the kernels on a machine without a GPU.
ATTENTION_BACKENDS = ("xla", "pallas", "pallas_interpret")
# TensorRT-LLM backend names: the first two select jaxllm's default attention backend; 'tensorrt'
# additionally compiles every shape bucket at construction.
SEED_BACKENDS = ("pytorch", "_autodeploy", "tensorrt")
_logged_backend_alias = False


def default_backend(platform: str | None = None) -> str:
    """'pallas' on a GPU, 'xla' elsewhere (platform None: JAX's default)."""
    return "pallas" if (platform or jax.default_backend()) == "gpu" else "xla"


def resolve_backend(backend: Optional[str], platform: str | None = None) -> str:
    """The attention backend `backend` names (None: the platform's), checked against the platform
    the engine runs on ('gpu', 'cpu'; None: JAX's default)."""
    global _logged_backend_alias
    if backend is None:
        return default_backend(platform)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    if backend in SEED_BACKENDS:
        chosen = default_backend(platform)
        if not _logged_backend_alias:
            logger.warning("backend=%r selects jaxllm's %r attention backend", backend, chosen)
            _logged_backend_alias = True
        return chosen
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"backend={backend!r} is not valid; valid: None, {', '.join(map(repr, ATTENTION_BACKENDS + SEED_BACKENDS))}"
        )
    if backend == "pallas" and (platform or jax.default_backend()) != "gpu":
        raise ValueError("backend='pallas' runs the Pallas GPU kernels and this machine has no GPU; the CPU's backend "
                         "is 'xla' (the default here), and backend='pallas_interpret' runs the kernels in the "
                         "Pallas interpreter (very slow: for tests)")  # fmt: skip
    return backend


def _positive_int(name: str, value, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid; allowed: a positive int" + (" or None" if allow_none else ""))


@dataclasses.dataclass
class KvCacheConfig:
    """How much of the device the paged KV cache takes (TensorRT-LLM's KvCacheConfig).

    free_gpu_memory_fraction: share of the device memory left free after the weights (GPU only); the
        device memory is what JAX's allocator may hold, 92% of the card unless the environment's
        XLA_PYTHON_CLIENT_MEM_FRACTION (read when JAX's GPU backend starts) says otherwise.
    max_tokens: an upper bound on the tokens the cache holds (on the CPU, the default bound is
        what fits in min(1 GiB, 10% of RAM)).
    tokens_per_block: the page size.
    enable_block_reuse: keep full pages cached after their requests finish, and share them between
        requests with the same prefix (and the same cache_salt and adapters); see engine/prefix_cache.py.
    dtype: KV cache dtype: 'auto' (the model's), 'float32', 'bfloat16', 'float16', or 'fp8' (aliases
        'fp8_e4m3', 'float8_e4m3fn'): float8 E4M3, half the bytes of bf16, writes saturated to +-448.
    max_attention_window: per-layer attention windows (a list repeated over the layers; None: each
        layer's own). A window >= max_seq_len is no limit; a smaller one must be the model's own
        window for that layer (its sliding layers'): jaxllm does not narrow attention further.
    sink_token_length: None or 0 (jaxllm has no attention sinks).
    host_cache_size: bytes of host memory for pages evicted from the device prefix cache (None or 0:
        none); a later request with the same prefix copies them back instead of computing them
        (engine/host_cache.py).
    onboard_blocks: True: host pages are copied back to the device to be reused. jaxllm's kernels
        read device pages only, so False behaves as True (logged).
    secondary_offload_min_priority: only pages of a retention priority above it go to the host
        tier (None: all).
    event_buffer_max_size: > 0 records KV cache events (stored, removed, updated, created) for
        `LLM.get_kv_cache_events`, keeping at most this many (engine/kv_events.py).
    enable_partial_reuse: also reuse the leading tokens of a cached page that matches a new prompt
        only partly, by copying that page (after the prompt's whole cached pages).
    copy_on_partial_reuse: accepted; jaxllm always copies (a cached page is never written), so
        False behaves as True.
    """

    free_gpu_memory_fraction: float = 0.9
    max_tokens: Optional[int] = None
    tokens_per_block: int = 32
    enable_block_reuse: bool = True
    dtype: str = "auto"
    max_attention_window: Optional[List[int]] = None
    sink_token_length: Optional[int] = None
    host_cache_size: Optional[int] = None
    onboard_blocks: bool = True
    secondary_offload_min_priority: Optional[int] = None
    event_buffer_max_size: int = 0
    enable_partial_reuse: bool = True
    copy_on_partial_reuse: bool = True

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
        from jaxllm.config import KV_DTYPE_CHOICES, resolve_kv_dtype

        try:
            resolve_kv_dtype(self.dtype)
        except ValueError:
            raise ValueError(f"dtype={self.dtype!r} is invalid; allowed: {KV_DTYPE_CHOICES}") from None
        self._check_reuse_fields()

    def _check_reuse_fields(self) -> None:
        """The attention-window, host-tier, event and partial-reuse fields (TensorRT-LLM's)."""
        windows = self.max_attention_window
        if windows is not None:
            if (not isinstance(windows, (list, tuple)) or not windows
                    or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in windows)):  # fmt: skip
                raise ValueError(f"max_attention_window={windows!r} is invalid; allowed: None or a non-empty list "
                                 "of positive ints")  # fmt: skip
            self.max_attention_window = list(windows)
        if self.sink_token_length not in (None, 0) or isinstance(self.sink_token_length, bool):
            raise ValueError(f"sink_token_length={self.sink_token_length!r} is invalid; allowed: None, 0 (jaxllm's "
                             "attention keeps no sink tokens)")  # fmt: skip
        size = self.host_cache_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise ValueError(f"host_cache_size={size!r} is invalid; allowed: None or an int >= 0 (bytes)")
        minimum = self.secondary_offload_min_priority
        if minimum is not None and (isinstance(minimum, bool) or not isinstance(minimum, int)
                                    or not RETENTION_PRIORITY_MIN <= minimum <= RETENTION_PRIORITY_MAX):  # fmt: skip
            raise ValueError(f"secondary_offload_min_priority={minimum!r} is invalid; allowed: None or an int in "
                             f"[{RETENTION_PRIORITY_MIN}, {RETENTION_PRIORITY_MAX}]")  # fmt: skip
        events = self.event_buffer_max_size
        if isinstance(events, bool) or not isinstance(events, int) or events < 0:
            raise ValueError(f"event_buffer_max_size={events!r} is invalid; allowed: an int >= 0 (0: no events)")
        for name in ("onboard_blocks", "enable_partial_reuse", "copy_on_partial_reuse"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; allowed: True, False")


RETENTION_PRIORITY_MIN, RETENTION_PRIORITY_MAX, RETENTION_PRIORITY_DEFAULT = 0, 100, 35


def _check_priority(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not RETENTION_PRIORITY_MIN <= value <= RETENTION_PRIORITY_MAX:
        raise ValueError(f"{name}={value!r} is invalid; allowed: an int in [{RETENTION_PRIORITY_MIN}, {RETENTION_PRIORITY_MAX}]")


def _duration_ms(name: str, value) -> Optional[float]:
    """A retention duration (timedelta, or milliseconds) in milliseconds; None means forever."""
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        ms = value.total_seconds() * 1e3
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        ms = float(value)
    else:
        raise TypeError(f"{name} must be a datetime.timedelta, milliseconds or None, got {value!r}")
    if ms <= 0:
        raise ValueError(f"{name}={value!r} is invalid; allowed: a positive duration or None")
    return ms


@dataclasses.dataclass
class TokenRangeRetentionConfig:
    """Retention priority of the KV pages holding prompt tokens [token_start, token_end).

    token_end None means to the end of the prompt; after `duration_ms` (a timedelta or
    milliseconds) the pages fall back to the default priority (35).
    """

    token_start: int
    token_end: Optional[int] = None
    priority: int = RETENTION_PRIORITY_DEFAULT
    duration_ms: Any = None

    def __post_init__(self):
        if isinstance(self.token_start, bool) or not isinstance(self.token_start, int) or self.token_start < 0:
            raise ValueError(f"token_start={self.token_start!r} is invalid; allowed: an int >= 0")
        if self.token_end is not None and (
            isinstance(self.token_end, bool) or not isinstance(self.token_end, int) or self.token_end <= self.token_start
        ):
            raise ValueError(f"token_end={self.token_end!r} is invalid; allowed: None or an int > token_start={self.token_start}")
        _check_priority("priority", self.priority)
        _duration_ms("duration_ms", self.duration_ms)


@dataclasses.dataclass
class KvCacheRetentionConfig:
    """How long a request's KV pages should stay reusable after it finishes (TensorRT-LLM's names).

    When the cache is full, the engine evicts reusable pages of the lowest priority first (least
    recently used first among equals). Priorities are ints in [0, 100]; the default is 35.

    A page takes the highest priority of its tokens (prompt tokens outside every range: 35), and
    falls back to 35 a duration after its last holder released it. Takes effect with
    KvCacheConfig.enable_block_reuse (the default).

    Args:
      token_range_retention_configs: prompt token ranges and their priorities (ranges must not
        overlap; only the last may have token_end=None). Ranges are clipped to each prompt: the
        part past a prompt's end has no effect, so one config serves prompts of any length.
      decode_retention_priority: priority of the pages of generated tokens.
      decode_duration_ms: how long that priority lasts (None: until evicted).
    """

    TokenRangeRetentionConfig = TokenRangeRetentionConfig

    token_range_retention_configs: List[TokenRangeRetentionConfig] = dataclasses.field(default_factory=list)
    decode_retention_priority: int = RETENTION_PRIORITY_DEFAULT
    decode_duration_ms: Any = None
    transfer_mode: Any = None
    directory: Optional[str] = None

    def __post_init__(self):
        ranges = self.token_range_retention_configs
        if not isinstance(ranges, (list, tuple)) or any(not isinstance(r, TokenRangeRetentionConfig) for r in ranges):
            raise TypeError("token_range_retention_configs must be a list of TokenRangeRetentionConfig")
        ordered = sorted(ranges, key=lambda r: r.token_start)
        for a, b in zip(ordered, ordered[1:]):
            if a.token_end is None or a.token_end > b.token_start:
                raise ValueError(
                    f"token ranges [{a.token_start}, {a.token_end}) and [{b.token_start}, {b.token_end}) overlap; "
                    "allowed: disjoint ranges, only the last open-ended"
                )
        self.token_range_retention_configs = ordered
        _check_priority("decode_retention_priority", self.decode_retention_priority)
        _duration_ms("decode_duration_ms", self.decode_duration_ms)
        if self.directory is not None:
            raise ValueError("KvCacheRetentionConfig.directory (offloading pages to files) is not supported; allowed: None")


@dataclasses.dataclass
class CacheTransceiverConfig:
    """How this LLM hands KV pages to others in disaggregated serving (TensorRT-LLM's name).

    backend: 'DEFAULT' (jaxllm's transfer: device to device within a process, TCP between processes).
    kv_transfer_timeout_ms: how long a context_only request's pages wait to be fetched before they
        are released.
    host, port: where this LLM serves its contexts to other processes (port 0: any free port;
        host '0.0.0.0' for other hosts, which then reach it by this host's name).
    cluster_secret: a secret every LLM of the cluster shares (None: the JAXLLM_KV_CLUSTER_SECRET
        environment variable, if set). With one, peers prove it to each other on every connection
        and context states are signed with it; without one, the transfer port trusts its network.
        Never written out (repr, `EngineArgs.to_dict`).
    io_timeout_ms: the longest this LLM waits for a transfer peer: a connection, the ask or a reply
        header, any pause in the pages (both as server and as client).
    max_connections: connections this LLM's transfer server serves at once; more are refused.
    README.md, "What the KV transfer port trusts", has the whole threat model.
    """

    backend: str = "DEFAULT"
    max_tokens_in_buffer: Optional[int] = None
    kv_transfer_timeout_ms: int = 60_000
    host: str = "127.0.0.1"
    port: int = 0
    cluster_secret: Optional[str] = dataclasses.field(default=None, repr=False)
    io_timeout_ms: int = 30_000
    max_connections: int = 8

    def __post_init__(self):
        if self.backend not in ("DEFAULT",):
            raise ValueError(f"cache_transceiver_config.backend={self.backend!r} is invalid; allowed: 'DEFAULT'")
        _positive_int("max_tokens_in_buffer", self.max_tokens_in_buffer)
        _positive_int("kv_transfer_timeout_ms", self.kv_transfer_timeout_ms, allow_none=False)
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"cache_transceiver_config.host={self.host!r} is invalid; allowed: a host name or address")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"cache_transceiver_config.port={self.port!r} is invalid; allowed: an int in [0, 65535]")
        if self.cluster_secret is not None and (not isinstance(self.cluster_secret, str) or not self.cluster_secret):
            raise ValueError(f"cache_transceiver_config.cluster_secret (a {type(self.cluster_secret).__name__}) is "
                             "invalid; allowed: a non-empty str or None")  # fmt: skip
        _positive_int("io_timeout_ms", self.io_timeout_ms, allow_none=False)
        _positive_int("max_connections", self.max_connections, allow_none=False)


@dataclasses.dataclass
class EngineArgs:
    """The engine arguments `LLM(**kwargs)` accepts (TensorRT-LLM names; defaults as there)."""

    # None: TensorRT-LLM's 2048 and 8192 on GPUs; on the CPU vLLM's 256 and 2048, since a CPU step of
    # thousands of tokens takes seconds and every bucket up to these limits is programs to compile
    # (`platform_defaults`).
    max_batch_size: Optional[int] = None
    max_num_tokens: Optional[int] = None
    max_seq_len: Optional[int] = None  # None: the model's max_position_embeddings (capped by the cache)
    max_input_len: Optional[int] = None
    kv_cache_config: Any = None
    enable_chunked_prefill: bool = True
    load_format: str = "auto"  # 'auto' reads the checkpoint; 'dummy' makes random weights on the device
    seed: Optional[int] = None  # engine-wide base for unseeded requests' random streams
    num_postprocess_workers: int = 0
    # get_stats: the most iterations kept between calls (None: 1000); enable_iter_req_stats adds
    # each iteration's per-request statistics (requestStats), kept for the most recent
    # request_stats_max_iterations iterations (None: all kept ones).
    iter_stats_max_iterations: Optional[int] = None
    enable_iter_perf_stats: bool = True
    enable_iter_req_stats: bool = False
    request_stats_max_iterations: Optional[int] = None
    # Accepted for compatibility with TensorRT-LLM scripts; values other than these are refused.
    pipeline_parallel_size: int = 1
    moe_expert_parallel_size: Optional[int] = None
    gpus_per_node: Optional[int] = None
    # Beam search: the widest beam a request may ask for (SamplingParams(use_beam_search=True, best_of=...)).
    max_beam_width: int = 1
    cache_transceiver_config: Any = None  # disaggregated serving: CacheTransceiverConfig
    # LoRA: enable_lora=True alone uses LoraConfig()'s defaults; a lora_config implies enable_lora.
    enable_lora: bool = False
    lora_config: Any = None  # adapters.LoraConfig (or its fields as a dict)
    # Prompt adapters (TensorRT-LLM's names): max_prompt_adapter_token > 0 implies
    # enable_prompt_adapter. The device slots and host cache sizes are jaxllm's (vLLM's names).
    enable_prompt_adapter: bool = False
    max_prompt_adapter_token: int = 0  # the most virtual tokens one adapter may have
    max_prompt_adapters: int = 4  # prompt adapters resident on the device at once
    max_cpu_prompt_adapters: Optional[int] = None  # kept loaded in host memory (default max_prompt_adapters)
    # Where compiled programs are kept between processes (engine/executables.py): None is the user's
    # cache directory ($JAXLLM_COMPILE_CACHE, else $XDG_CACHE_HOME/jaxllm/programs, else
    # ~/.cache/jaxllm/programs); "off" keeps nothing.
    compilation_cache_dir: Optional[str] = None
    # Multi-step decoding (vLLM's name): when only decodes are scheduled and nothing waits, run up to
    # this many decode steps per host round trip (the same tokens; streams then arrive in runs of
    # up to this many tokens). 1 turns it off.
    num_scheduler_steps: int = 8
    # The overlap scheduler (TensorRT-LLM's name): each step is scheduled and dispatched while the
    # last one runs, its input tokens from that one's samples read on the device, so the devices do
    # not wait for the host between the two (engine.py `Engine._run_ahead`).
    disable_overlap_scheduler: bool = False
    # Guided decoding (TensorRT-LLM's name; jaxllm/guided.py): 'llguidance', or 'xgrammar' (served
    # by llguidance). None: SamplingParams.guided_decoding is refused. Set, the sampler programs get
    # guided twins (their rows' token bitmasks applied on the device).
    guided_decoding_backend: Optional[str] = None
    # Speculative decoding (TensorRT-LLM's name; jaxllm/speculative.py): an NGramDecodingConfig (or
    # its fields as a dict with decoding_type='NGram'), or None.
    speculative_config: Any = None
    # TensorRT-LLM arguments the engine honours (jaxllm/trtllm_args.py; docs/COMPATIBILITY.md):
    # streaming updates every `stream_interval` tokens; one log line per iteration; decode batch
    # buckets from a CudaGraphConfig (None: no CUDA graphs, XLA's command buffers off); a
    # SchedulerConfig's capacity policy (None: MAX_UTILIZATION); the engine thread's gc
    # generation-0 threshold (None: Python's).
    stream_interval: int = 1
    print_iter_log: bool = False
    cuda_graph_config: Any = dataclasses.field(default_factory=trtllm_args.CudaGraphConfig)
    scheduler_config: Any = None
    garbage_collection_gen0_threshold: Optional[int] = None
    # vLLM's: the most log-probabilities per token a request may ask for (logprobs, prompt_logprobs);
    # at most MAX_LOGPROBS, the top-k every step computes.
    max_logprobs: int = MAX_LOGPROBS
    # Quantization (TensorRT-LLM's QuantConfig, jaxllm/quantization.py): FP8 weights quantized as
    # they load, and an FP8 KV cache (kv_cache_quant_algo FP8 is kv_cache_config.dtype='fp8').
    quant_config: Any = None
    # Calibration (TensorRT-LLM's CalibConfig, jaxllm/calibration.py): FP8's static input scales and the
    # fp8 KV cache's per-layer scales measured on local text as a float checkpoint loads.
    calib_config: Any = None

    def __post_init__(self):
        _positive_int("max_batch_size", self.max_batch_size)
        _positive_int("max_num_tokens", self.max_num_tokens)
        _positive_int("max_seq_len", self.max_seq_len)
        _positive_int("max_input_len", self.max_input_len)
        _positive_int("num_scheduler_steps", self.num_scheduler_steps, allow_none=False)
        m = self.max_logprobs
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= MAX_LOGPROBS:
            raise ValueError(f"max_logprobs={m!r} is invalid; allowed: an int in [0, {MAX_LOGPROBS}] (each step "
                             f"computes the top {MAX_LOGPROBS} log-probabilities; vLLM's -1, the whole vocabulary, "
                             "is not offered)")  # fmt: skip
        self._check_stats()
        if self.kv_cache_config is None:
            self.kv_cache_config = KvCacheConfig()
        elif isinstance(self.kv_cache_config, dict):
            self.kv_cache_config = KvCacheConfig(**self.kv_cache_config)
        elif not isinstance(self.kv_cache_config, KvCacheConfig):
            raise TypeError(f"kv_cache_config must be a KvCacheConfig or dict, got {type(self.kv_cache_config).__name__}")
        if self.cache_transceiver_config is None:
            self.cache_transceiver_config = CacheTransceiverConfig()
        elif isinstance(self.cache_transceiver_config, dict):
            self.cache_transceiver_config = CacheTransceiverConfig(**self.cache_transceiver_config)
        elif not isinstance(self.cache_transceiver_config, CacheTransceiverConfig):
            raise TypeError(f"cache_transceiver_config must be a CacheTransceiverConfig or dict, "
                            f"got {type(self.cache_transceiver_config).__name__}")  # fmt: skip
        if not isinstance(self.disable_overlap_scheduler, bool):
            raise TypeError(f"disable_overlap_scheduler must be a bool, got {self.disable_overlap_scheduler!r}")
        if not isinstance(self.enable_chunked_prefill, bool):
            raise TypeError(f"enable_chunked_prefill must be a bool, got {self.enable_chunked_prefill!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format={self.load_format!r} is invalid; allowed: 'auto', 'dummy'")
        if self.pipeline_parallel_size != 1:
            raise NotImplementedError("pipeline_parallel_size > 1 is not supported by jaxllm (use tensor_parallel_size)")
        if self.moe_expert_parallel_size not in (None, 1):
            raise NotImplementedError("moe_expert_parallel_size is not supported (no MoE models in jaxllm)")
        if isinstance(self.max_beam_width, bool) or not isinstance(self.max_beam_width, int):
            raise TypeError(f"max_beam_width must be an int, got {self.max_beam_width!r}")
        if not 1 <= self.max_beam_width <= MAX_LOGPROBS // 2:
            raise ValueError(f"max_beam_width={self.max_beam_width} is out of range; allowed: 1 to "
                             f"{MAX_LOGPROBS // 2}")  # fmt: skip
        self._check_adapters()
        self._check_quant_config()
        self.calib_config = calibration.as_calib_config(self.calib_config)
        self.speculative_config = speculative.as_speculative_config(self.speculative_config)
        trtllm_args.check_engine_fields(self)

    def _check_stats(self) -> None:
        for name in ("iter_stats_max_iterations", "request_stats_max_iterations"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name}={value!r} is invalid; allowed: an int >= 0 or None")
        for name in ("enable_iter_perf_stats", "enable_iter_req_stats"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; allowed: True, False")

    def _check_quant_config(self) -> None:
        self.quant_config = quantization.as_quant_config(self.quant_config)
        kv = self.quant_config.kv_cache_dtype if self.quant_config is not None else None
        if kv is None:
            return
        from jaxllm.config import resolve_kv_dtype

        current = self.kv_cache_config.dtype
        if current == "auto":
            self.kv_cache_config = dataclasses.replace(self.kv_cache_config, dtype=kv)
        elif resolve_kv_dtype(current) != resolve_kv_dtype(kv):
            raise ValueError(f"quant_config.kv_cache_quant_algo='FP8' conflicts with kv_cache_config.dtype={current!r}; "
                             "give one of them, or the same (kv_cache_config.dtype='fp8')")  # fmt: skip

    def _check_adapters(self) -> None:
        if not isinstance(self.enable_lora, bool):
            raise TypeError(f"enable_lora must be a bool, got {self.enable_lora!r}")
        if isinstance(self.lora_config, dict):
            self.lora_config = LoraConfig(**self.lora_config)
        elif self.lora_config is not None and not isinstance(self.lora_config, LoraConfig):
            raise TypeError(f"lora_config must be a LoraConfig, a dict or None, got {type(self.lora_config).__name__}")
        if self.lora_config is not None:
            self.enable_lora = True
        elif self.enable_lora:
            self.lora_config = LoraConfig()
        if not isinstance(self.enable_prompt_adapter, bool):
            raise TypeError(f"enable_prompt_adapter must be a bool, got {self.enable_prompt_adapter!r}")
        tokens = self.max_prompt_adapter_token
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"max_prompt_adapter_token={tokens!r} is invalid; allowed: an int >= 0")
        if tokens:
            self.enable_prompt_adapter = True
        elif self.enable_prompt_adapter:
            raise ValueError("enable_prompt_adapter=True needs max_prompt_adapter_token >= 1 (the most virtual "
                             "tokens an adapter may have)")  # fmt: skip
        _positive_int("max_prompt_adapters", self.max_prompt_adapters, allow_none=False)
        if self.max_cpu_prompt_adapters is None:
            self.max_cpu_prompt_adapters = self.max_prompt_adapters
        _positive_int("max_cpu_prompt_adapters", self.max_cpu_prompt_adapters, allow_none=False)
        if self.max_cpu_prompt_adapters < self.max_prompt_adapters:
            raise ValueError(f"max_cpu_prompt_adapters={self.max_cpu_prompt_adapters} is invalid; allowed: >= "
                             f"max_prompt_adapters={self.max_prompt_adapters}")  # fmt: skip

    def platform_defaults(self, platform: str) -> "EngineArgs":
        """These arguments with max_batch_size / max_num_tokens filled in for `platform` ('gpu', 'cpu')."""
        batch, tokens = (2048, 8192) if platform == "gpu" else (256, 2048)
        return dataclasses.replace(self, max_batch_size=self.max_batch_size or batch,
                                   max_num_tokens=self.max_num_tokens or tokens)  # fmt: skip

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "EngineArgs":
        kwargs = trtllm_args.translate(kwargs)  # TensorRT-LLM's (and vLLM's) other names
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"LLM() got unknown argument(s) {unknown}; engine arguments: {', '.join(sorted(names))}")
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """The arguments as plain values, the cluster secret left out (a saved engine must not carry it)."""
        data = dataclasses.asdict(self)
        if data.get("cache_transceiver_config"):
            data["cache_transceiver_config"]["cluster_secret"] = None
        return data
