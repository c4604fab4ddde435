"""The LLM class: TensorRT-LLM's `LLM` API over the jaxllm engine.

    llm = LLM(model="smollm2")
    out = llm.generate("What is machine learning?", SamplingParams(temperature=0.7, top_p=0.9, max_tokens=200))
    print(out.outputs[0].text)

`LLM.__init__` validates its arguments, resolves and loads the checkpoint, sizes the KV cache and
starts the engine thread. `generate` / `generate_async` validate and tokenize every prompt before
anything reaches the engine, so a bad prompt raises in the caller and the engine keeps serving.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import json
import logging
import os
import sys
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxllm import distributed
from jaxllm import inputs as inputs_lib
from jaxllm.checkpoints import loader, saved
from jaxllm.config import ModelConfig, resolve_dtype
from jaxllm.engine.block_manager import BlockManager
from jaxllm.engine import kv_transfer
from jaxllm.engine.engine import Engine, EngineShutdown
from jaxllm.engine.kv_planner import check_weights_fit, plan_num_pages
from jaxllm.engine.executables import resolve_cache_dir
from jaxllm.engine.runner import BIAS_SLOTS, ModelRunner, RunnerConfig
from jaxllm.engine.scheduler import Scheduler, SchedulerConfig
from jaxllm.engine.sequence import Request
from jaxllm.adapters.bank import AdapterBank
from jaxllm.adapters.cache import AdapterCache
from jaxllm.adapters.lora import LORA_PARAMS, load_lora_adapter
from jaxllm.adapters.prompt import load_prompt_adapter
from jaxllm.engine.adapter_slots import AdapterAdmission, SlotTable
from jaxllm.disaggregated_params import ContextFetches, context_state
from jaxllm.inputs import PreprocessedInputs, RequestFactory, request_extras
from jaxllm.llm_args import EngineArgs, resolve_backend
from jaxllm import sharding as sharding_lib
from jaxllm.models.params import flatten_paths, param_bytes, unflatten_paths
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import SamplingParams
from jaxllm.tokenizer import load_tokenizer

logger = logging.getLogger("jaxllm")

EXECUTABLES_DIR = "executables"
PRECOMPILE_ENV = "JAXLLM_PRECOMPILE"


# LLMs whose engines still run. The interpreter's exit stops them (`_stop_live_engines`): an engine
# thread still inside XLA when the interpreter tears threads down aborts the process ("FATAL:
# exception not rethrown", exit status 134), so every engine is stopped and joined first, and its
# unfinished requests resolve with EngineShutdown. Registered with atexit at the first LLM, after JAX
# has set up its backends, so it runs before JAX's own exit handlers.
_LIVE: "weakref.WeakSet[LLM]" = weakref.WeakSet()
_exit_hook_registered = False


def _stop_live_engines() -> None:
    for llm in list(_LIVE):
        try:
            llm.shutdown()
        except Exception:  # one engine's trouble must not keep the others running
            logger.exception("stopping an LLM at exit failed")


def _register_live(llm: "LLM") -> None:
    global _exit_hook_registered
    _LIVE.add(llm)
    if not _exit_hook_registered:
        atexit.register(_stop_live_engines)
        _exit_hook_registered = True


def _release_host_memory() -> None:
    """Hand the memory a shut-down engine freed back to the operating system.

    The engine's runner and programs sit in reference cycles (bound methods and closures over the
    runner), so they are freed by the cycle collector, not when shutdown drops them. And on the CPU
    the weights, the KV cache and the host arrays of loading are malloc'ed by XLA and numpy from
    several threads: glibc keeps what those threads free in per-thread arenas, below a moving mmap
    threshold, and returns little of it, so RSS grew by tens of MB for every LLM made and shut down
    in one process (hundreds with SmolLM2), freed memory no later LLM reused. malloc_trim(0) returns
    the free pages of every arena (glibc only; elsewhere this is a no-op).
    """
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)


def _load_glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


_libc = _load_glibc()


@contextlib.contextmanager
def _phase(what: str, *args):
    """Log one start-up phase with its time (INFO)."""
    started = time.perf_counter()
    yield
    logger.info(what + " in %.1f s", *args, time.perf_counter() - started)


def _jsonable(kwargs: dict) -> dict:
    """Engine arguments as plain JSON values (for the followers of a multi-process run)."""
    import dataclasses

    out = {}
    for key, value in kwargs.items():
        out[key] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    json.dumps(out)  # raises TypeError for anything that cannot travel
    return out


class LLM:
    """Generate text with a language model (TensorRT-LLM's `LLM`)."""

    def __init__(
        self,
        model: str | Path,
        tokenizer: Any = None,
        tokenizer_mode: str = "auto",
        skip_tokenizer_init: bool = False,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        revision: Optional[str] = None,
        tokenizer_revision: Optional[str] = None,
        backend: Optional[str] = None,
        devices: Optional[list] = None,
        _follower_channel: Any = None,
        **kwargs: Any,
    ):
        """Load a model and start its engine.

        Beyond TensorRT-LLM's arguments: `devices`, the JAX devices to run on (default: the first
        `tensor_parallel_size` of jax.devices()), e.g. to place two LLMs on two GPUs of one process.
        Engine arguments (`**kwargs`) are listed in jaxllm/llm_args.py.
        """
        self._shutdown_lock = threading.Lock()
        self._engine: Engine | None = None
        self._fetches = ContextFetches(self._shutdown_lock)  # generation_only requests fetching their pages
        self.llm_id = uuid.uuid4().hex
        self.disaggregated_params = None
        self.workspace = None
        # Multi-process runs (jaxllm/launch.py): the leader tells the followers what to build.
        self._channel = _follower_channel
        if _follower_channel is None and distributed.initialize_from_env():
            if devices is not None:
                raise ValueError("devices= cannot be given in a multi-process run: the mesh spans every process")
            if tensor_parallel_size != jax.device_count():
                raise ValueError(
                    f"tensor_parallel_size={tensor_parallel_size} must equal the {jax.device_count()} devices of "
                    f"the {jax.process_count()} processes in a multi-process run"
                )
            self._channel = distributed.StepChannel()
            self._channel.send({"kind": "construct", "kwargs": {
                "model": str(model), "dtype": dtype if isinstance(dtype, str) else jax.numpy.dtype(dtype).name,
                "tensor_parallel_size": tensor_parallel_size, "revision": revision, "backend": backend,
                "skip_tokenizer_init": True, **_jsonable(kwargs)}})  # fmt: skip
        if devices is not None and (not isinstance(devices, (list, tuple)) or len(devices) != tensor_parallel_size
                                    or not all(isinstance(d, jax.Device) for d in devices)):  # fmt: skip
            raise ValueError(f"devices={devices!r} is invalid; allowed: None or a list of "
                             f"tensor_parallel_size={tensor_parallel_size} jax devices")  # fmt: skip
        use_mesh = tensor_parallel_size != 1 or devices is not None
        self.mesh = sharding_lib.make_mesh(tensor_parallel_size, devices) if use_mesh else None
        self.tensor_parallel_size = tensor_parallel_size
        if not isinstance(skip_tokenizer_init, bool):
            raise TypeError(f"skip_tokenizer_init must be a bool, got {skip_tokenizer_init!r}")
        resolve_dtype(dtype)  # validate the name before loading anything
        started = time.perf_counter()
        platform = (list(self.mesh.devices.flat)[0] if self.mesh is not None else jax.devices()[0]).platform
        resolve_backend(backend, platform)  # validate names before loading anything
        EngineArgs.from_kwargs(kwargs)
        with _phase("resolved model %s", model):
            self.resolved = loader.resolve(model, revision)
        self.model_name = str(model)
        if self.resolved.kind == "saved":
            cfg, saved_dtype, saved_args = saved.read_config(self.resolved.path)
            # A saved engine keeps its arguments (its compiled buckets depend on them) unless overridden.
            backend = backend if backend is not None else saved_args.pop("backend", None)
            saved_args.pop("backend", None)
            kwargs = {**saved_args, **kwargs}
            self.dtype = resolve_dtype(dtype, saved_dtype)
        else:
            cfg = loader.read_config(self.resolved)
            self.dtype = resolve_dtype(dtype, cfg.checkpoint_dtype)
        self.backend_name = backend
        self.backend = resolve_backend(backend, platform)
        self.args = EngineArgs.from_kwargs(kwargs).platform_defaults(platform)
        self.compile_cache_dir = resolve_cache_dir(self.args.compilation_cache_dir)
        self.config: ModelConfig = cfg
        self.tp_plan = sharding_lib.plan_tensor_parallel(cfg, tensor_parallel_size) if self.mesh is not None else None
        self.engine_config = self.tp_plan.engine_config(cfg) if self.tp_plan is not None else cfg
        # Refuse weights that cannot fit before anything is built per layer or allocated.
        check_weights_fit(param_bytes(cfg, self.dtype), list(self.mesh.devices.flat) if self.mesh is not None
                          else jax.devices()[:1], tensor_parallel_size)  # fmt: skip
        # The programs depend on the weights' shapes, not their values: they are loaded from the
        # cache or compiled (on a pool of threads) while the tokenizer and the weights load.
        self.params = None
        runner = self._build_runner()
        # (Several processes load their weights in step, before the leader's programs are sent.)
        preparing = self._prepare_programs(runner, background=True) if self._channel is None else None
        self.tokenizer = None
        if not skip_tokenizer_init:
            with _phase("tokenizer"):
                source = tokenizer if tokenizer is not None else self.resolved
                self.tokenizer = load_tokenizer(source, tokenizer_revision or revision, trust_remote_code,
                                                tokenizer_mode)  # fmt: skip
        with _phase("weights (%s, %s)", "random" if self.args.load_format == "dummy" else self.resolved.kind,
                    jax.numpy.dtype(self.dtype).name):  # fmt: skip
            self.params = loader.load_engine_params(self.resolved, cfg, self.dtype, self.tp_plan, self.mesh,
                                                    self.args.load_format, self.args.seed or 0,
                                                    cache_dir=self.compile_cache_dir)  # fmt: skip
        runner.params = self.params
        if self._channel is not None and not distributed.is_leader():
            runner.allocate()
            runner.follow()  # until the leader shuts down
            return
        if preparing is not None:
            preparing()
        else:
            self._prepare_programs(runner, background=False)
        self._start_engine(runner)
        self.load_seconds = time.perf_counter() - started
        logger.info("ready in %.1f s", self.load_seconds)

    # ---- construction ------------------------------------------------------------------------
    def _build_adapters(self) -> AdapterBank | None:
        """The adapter bank on the device and the host caches, when LoRA or prompt adapters are enabled."""
        args = self.args
        self._lora_cache = self._prompt_cache = None
        if not (args.enable_lora or args.enable_prompt_adapter):
            return None
        lora_slots = lora_rank = 0
        targets: tuple[str, ...] = ()
        if args.enable_lora:
            lora = args.lora_config
            lora_slots, lora_rank = lora.max_loras, lora.max_lora_rank
            targets = lora.target_params()
            if not targets and lora.lora_dir:  # serve the modules the configured adapters adapt
                found = {p for d in lora.lora_dir for p in load_lora_adapter(d, self.config, lora_rank).target_params}
                targets = tuple(p for p in LORA_PARAMS if p in found)
            else:
                for d in lora.lora_dir:
                    load_lora_adapter(d, self.config, lora_rank, targets or LORA_PARAMS)
            targets = targets or LORA_PARAMS
            self._lora_cache = AdapterCache("LoRA", lora.max_cpu_loras, lambda path, adapter_id: load_lora_adapter(
                path, self.config, lora_rank, targets, adapter_id))  # fmt: skip
        prompt_slots = prompt_tokens = 0
        if args.enable_prompt_adapter:
            prompt_slots, prompt_tokens = args.max_prompt_adapters, args.max_prompt_adapter_token
            self._prompt_cache = AdapterCache(
                "prompt adapter", args.max_cpu_prompt_adapters,
                lambda path, adapter_id: load_prompt_adapter(path, self.config, prompt_tokens, adapter_id))  # fmt: skip
        return AdapterBank(self.config, self.engine_config, self.dtype, lora_slots=lora_slots, lora_rank=lora_rank,
                           lora_targets=targets, prompt_slots=prompt_slots, prompt_tokens=prompt_tokens,
                           plan=self.tp_plan, mesh=self.mesh)  # fmt: skip

    def _abstract_params(self):
        """The weights as ShapeDtypeStructs with the shardings they load into."""
        from jaxllm.models.params import abstract_params

        abstract = abstract_params(self.engine_config, self.dtype)
        if self.mesh is not None:
            shardings = sharding_lib.param_shardings(self.engine_config, self.mesh)
        else:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: device, abstract)
        return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings)

    def _build_runner(self) -> ModelRunner:
        """The KV cache sized for the device, and the runner over it (its weights still abstract)."""
        cfg, args = self.engine_config, self.args
        self._adapter_bank = adapters = self._build_adapters()  # before sizing the KV cache
        kv_cfg = args.kv_cache_config
        kv_dtype = self.dtype if kv_cfg.dtype == "auto" else resolve_dtype(kv_cfg.dtype)
        self._kv_dtype = kv_dtype
        page_size = kv_cfg.tokens_per_block
        max_num_tokens = args.max_num_tokens
        devices = list(self.mesh.devices.flat) if self.mesh is not None else None
        abstract = self._abstract_params()
        weight_bytes = max(0, sum(int(np.prod(a.sharding.shard_shape(a.shape))) * jax.numpy.dtype(a.dtype).itemsize
                                  for a in jax.tree.leaves(abstract)))  # fmt: skip
        num_pages = plan_num_pages(cfg, kv_dtype, page_size, kv_cfg, max_num_tokens, args.max_batch_size, devices,
                                   tp_kv_shards=self.tensor_parallel_size, max_seq_len=args.max_seq_len,
                                   pending_bytes=weight_bytes)  # fmt: skip
        capacity = (num_pages - 1) * page_size
        if num_pages < 2:
            raise ValueError(
                "the KV cache has no room for a single page after the weights; lower max_num_tokens / "
                "max_batch_size or raise kv_cache_config.free_gpu_memory_fraction"
            )
        if self._channel is not None:  # every process must size the cache alike: the leader decides
            num_pages = self._agree_on("num_pages", num_pages)
            capacity = (num_pages - 1) * page_size
        max_seq_len = args.max_seq_len or cfg.max_position_embeddings
        if max_seq_len > capacity:
            if args.max_seq_len is not None:
                raise ValueError(
                    f"max_seq_len={args.max_seq_len} exceeds what the KV cache holds ({capacity} tokens); "
                    f"allowed: <= {capacity}, or a larger kv_cache_config"
                )
            max_seq_len = capacity
        self.max_seq_len = max_seq_len
        runner_config = RunnerConfig(
            max_num_tokens=max_num_tokens,
            max_batch_size=args.max_batch_size,
            max_seq_len=max_seq_len,
            page_size=page_size,
            num_pages=num_pages,
            backend=self.backend,
            kv_dtype=kv_dtype,
            decode_steps=args.num_scheduler_steps,
        )
        kv_bytes = num_pages * page_size * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
        kv_type = jax.numpy.dtype(kv_dtype)
        logger.info("KV cache: %d pages of %d tokens (%.2f GB, %s), max_seq_len %d", num_pages, page_size,
                    kv_bytes * kv_type.itemsize / 1e9, kv_type.name, max_seq_len)
        return ModelRunner(cfg, abstract, runner_config, mesh=self.mesh, channel=self._channel, adapters=adapters,
                           cache_dir=self.compile_cache_dir)  # fmt: skip

    def _prepare_programs(self, runner: ModelRunner, background: bool):
        """Make every program the engine can ask for: serving then never waits for a compilation
        ($JAXLLM_PRECOMPILE=0 compiles each at its first use instead, for tests and experiments; the
        'tensorrt' backend, TensorRT-LLM's ahead-of-time one, precompiles whatever it says). With
        `background`, on a thread: returns a function that waits for it (and raises what it raised)."""
        if self._channel is not None and not distributed.is_leader():
            return None  # a follower makes what the leader's precompile message lists
        started = time.perf_counter()

        def prepare():
            if self.resolved.kind == "saved":
                loaded = runner.load_executables(self.resolved.path / EXECUTABLES_DIR)
                logger.info("loaded %d compiled programs from %s", loaded, self.resolved.path)
            if os.environ.get(PRECOMPILE_ENV, "1") != "0" or self.backend_name == "tensorrt":
                runner.precompile()

        if not background:
            prepare()
            logger.info("programs in %.1f s", time.perf_counter() - started)
            return None
        failure: list[BaseException] = []

        def run():
            try:
                prepare()
            except BaseException as e:  # handed to the caller's thread by wait()
                failure.append(e)

        thread = threading.Thread(target=run, name="jaxllm-programs", daemon=True)
        thread.start()

        def wait():
            thread.join()
            if failure:
                raise failure[0]
            logger.info("programs in %.1f s", time.perf_counter() - started)

        return wait

    def _start_engine(self, runner: ModelRunner) -> None:
        """The scheduler and the engine thread, over a runner whose programs are ready."""
        cfg, args = self.engine_config, self.args
        runner.allocate()
        runner.warm_up()
        kv_cfg = args.kv_cache_config
        num_pages, page_size, max_num_tokens = runner.config.num_pages, runner.config.page_size, args.max_num_tokens
        adapters, kv_dtype, max_seq_len = self._adapter_bank, self._kv_dtype, self.max_seq_len
        admission = AdapterAdmission(
            lora=SlotTable(adapters.lora_slots, runner.write_lora) if adapters and adapters.lora_slots else None,
            prompt=(SlotTable(adapters.prompt_slots, runner.write_prompt_adapter)
                    if adapters and adapters.prompt_slots else None),
            bias=SlotTable(BIAS_SLOTS, lambda slot, row: runner.write_bias(slot, row.values)),
        )  # fmt: skip
        scheduler = Scheduler(
            SchedulerConfig(max_num_tokens, args.max_batch_size, args.enable_chunked_prefill),
            BlockManager(num_pages, page_size, enable_reuse=kv_cfg.enable_block_reuse),
            admission=admission,
        )
        transceiver = args.cache_transceiver_config
        layout = kv_transfer.KVLayout(self.config.num_layers, self.config.num_kv_heads, self.config.head_dim,
                                      jax.numpy.dtype(kv_dtype).name, max_seq_len)  # fmt: skip
        transfer = kv_transfer.TransferSettings(
            llm_id=self.llm_id, fingerprint=kv_transfer.fingerprint(self.config, kv_dtype), layout=layout,
            plan=self.tp_plan, host=transceiver.host, port=transceiver.port,
            timeout_s=transceiver.kv_transfer_timeout_ms / 1e3, io_timeout_s=transceiver.io_timeout_ms / 1e3,
            max_connections=transceiver.max_connections,
            cluster_key=kv_transfer.cluster_key(transceiver.cluster_secret),
        )  # fmt: skip
        self._kv_fingerprint = transfer.fingerprint
        self._engine = Engine(runner, scheduler, self.tokenizer, max_seq_len, cfg.vocab_size, transfer,
                              overlap=not args.disable_overlap_scheduler)  # fmt: skip
        self._requests = RequestFactory(self.config, self.tokenizer, max_seq_len, args.max_input_len, args.max_batch_size,
                                        self._lora_cache, self._prompt_cache)  # fmt: skip
        _register_live(self)

    def _agree_on(self, name: str, value: int) -> int:
        if distributed.is_leader():
            self._channel.send({"kind": "agree", name: int(value)})
            return int(value)
        header, _ = self._channel.recv()
        return int(header[name])

    # ---- requests ----------------------------------------------------------------------------
    def _check_open(self) -> Engine:
        if self._engine is None:
            raise EngineShutdown("this LLM has been shut down")
        return self._engine

    def preprocess(self, inputs, sampling_params=None):
        """Tokenize and validate prompts; returns PreprocessedInputs (a list for a batch), which
        `generate` and `generate_async` accept as they are."""
        prompts, single = inputs_lib.as_prompt_list(inputs)
        params = inputs_lib.params_list(sampling_params, len(prompts))
        out = [self._requests.preprocess(p, sp, f"prompt {i}") for i, (p, sp) in enumerate(zip(prompts, params))]
        return out[0] if single else out

    def _make_request(self, pre: PreprocessedInputs, streaming: bool, extras: dict) -> Request:
        engine = self._check_open()
        state = context_state(extras.get("disaggregated_params"), pre, extras, vocab_size=self.config.vocab_size,
                              multi_process=self._channel is not None, cluster_key=engine.transfer.cluster_key,
                              fingerprint=self._kv_fingerprint)  # fmt: skip
        return self._requests.make(pre, streaming, extras, abort_fn=engine.abort, context_state=state)

    def _submit(self, *requests: Request) -> None:
        """Queue requests, together (the engine admits them in one iteration); a generation_only one
        first fetches its context's pages (in the background)."""
        engine = self._check_open()
        plain = [r for r in requests if r.context_state is None]
        if plain:
            engine.submit(*plain)
        fetched = [r for r in requests if r.context_state is not None]
        if not fetched:
            return
        with self._shutdown_lock:
            if self._engine is not engine:
                raise EngineShutdown("this LLM has been shut down")
            self._fetches.start(engine, fetched, self.config.vocab_size)

    def generate_async(
        self,
        inputs,
        sampling_params: Optional[SamplingParams] = None,
        lora_request=None,
        prompt_adapter_request=None,
        streaming: bool = False,
        kv_cache_retention_config=None,
        disaggregated_params=None,
        scheduling_params=None,
        cache_salt=None,
    ) -> RequestOutput:
        """Submit one prompt; returns its RequestOutput, a future (result(), await, iteration).

        The request-level arguments are those of `generate`, one value each.
        """
        extras = request_extras(1, lora_request=lora_request, prompt_adapter_request=prompt_adapter_request,
                                kv_cache_retention_config=kv_cache_retention_config,
                                disaggregated_params=disaggregated_params, scheduling_params=scheduling_params,
                                cache_salt=cache_salt)[0]  # fmt: skip
        if not isinstance(streaming, bool):
            raise TypeError(f"streaming must be a bool, got {streaming!r}")
        if not inputs_lib.is_single_prompt(inputs):
            raise TypeError("generate_async takes one prompt; call it once per prompt (or use generate for a batch)")
        params = inputs_lib.params_list(sampling_params, 1)[0]
        pre = self._requests.preprocess(inputs, params, "prompt")
        self._requests.load_adapters(pre, extras, "prompt")
        request = self._make_request(pre, streaming, extras)
        self._submit(request)
        return request.output

    def generate(
        self,
        inputs,
        sampling_params=None,
        use_tqdm: bool = True,
        lora_request=None,
        prompt_adapter_request=None,
        kv_cache_retention_config=None,
        disaggregated_params=None,
        scheduling_params=None,
        cache_salt=None,
    ):
        """Generate for one prompt (returns a RequestOutput) or a batch (a list, in input order).

        The request-level arguments (lora_request, ..., cache_salt) take one value for every
        prompt or a list of one per prompt:
          kv_cache_retention_config: a KvCacheRetentionConfig, how long the request's KV pages stay
            reusable (priorities of prompt token ranges and of generated tokens; ranges are clipped
            to the prompt, see engine/prefix_cache.page_retention).
          scheduling_params: a SchedulingParams; under contention higher priorities are admitted and
            scheduled first and preempted last.
          cache_salt: a non-empty str; only requests with the same salt share cached KV pages.
        Retention and salts matter only with kv_cache_config.enable_block_reuse (the default).
        """
        prompts, single = inputs_lib.as_prompt_list(inputs)
        extras = request_extras(len(prompts), lora_request=lora_request, prompt_adapter_request=prompt_adapter_request,
                                kv_cache_retention_config=kv_cache_retention_config,
                                disaggregated_params=disaggregated_params, scheduling_params=scheduling_params,
                                cache_salt=cache_salt)  # fmt: skip
        params = inputs_lib.params_list(sampling_params, len(prompts))
        # Validate everything first: one bad prompt rejects the call before anything is queued.
        pre = [self._requests.preprocess(p, sp, f"prompt {i}") for i, (p, sp) in enumerate(zip(prompts, params))]
        for i, (p, e) in enumerate(zip(pre, extras)):
            self._requests.load_adapters(p, e, f"prompt {i}")
        requests = [self._make_request(p, False, e) for p, e in zip(pre, extras)]
        self._submit(*requests)
        outputs = [r.output for r in requests]
        bar = tqdm(total=len(outputs), desc="Processed prompts", unit="prompt", disable=not use_tqdm or len(outputs) < 2)
        started = time.perf_counter()
        generated = 0
        with bar:
            for out in outputs:
                out.result()
                generated += sum(len(o.token_ids) for o in out.outputs)
                bar.set_postfix_str(f"{generated / max(time.perf_counter() - started, 1e-9):.1f} tok/s")
                bar.update()
        return outputs[0] if single else outputs

    # ---- stats, saving, lifetime -------------------------------------------------------------
    def get_stats(self, timeout: float = 2.0) -> list[dict]:
        """Per-iteration statistics collected since the last call (TensorRT-LLM's keys)."""
        engine = self._check_open()
        deadline = time.monotonic() + (timeout or 0)
        stats = engine.stats()
        while not stats and time.monotonic() < deadline and engine.scheduler.has_work():
            time.sleep(0.01)
            stats = engine.stats()
        return stats

    async def get_stats_async(self, timeout: float = 2.0):
        """Async iterator over the per-iteration statistics (TensorRT-LLM's get_stats_async)."""
        import asyncio

        for item in await asyncio.to_thread(self.get_stats, timeout):
            yield item

    def save(self, engine_dir: str | Path) -> None:
        """Save weights (orbax), config, tokenizer and engine arguments; `LLM(model=engine_dir)` reloads it."""
        path = Path(engine_dir)
        path.mkdir(parents=True, exist_ok=True)
        engine = self._check_open()
        params = engine.runner.params
        if self.tp_plan is not None and not self.tp_plan.is_identity:  # back to the checkpoint's layout
            flat = {p: self.tp_plan.restore(p, x) for p, x in flatten_paths(params).items()}
            params = unflatten_paths(flat, self.config)
        saved.save_params(path, params)
        engine.runner.save_executables(path / EXECUTABLES_DIR)
        saved.write_config(path, self.config, self.dtype, self.args.to_dict() | {"backend": self.backend_name})
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(str(path))

    def shutdown(self) -> None:
        """Stop the engine; pending requests fail with EngineShutdown; device memory is released.

        Not needed before a script ends: the interpreter's exit shuts every live LLM down."""
        _LIVE.discard(self)
        with self._shutdown_lock:
            engine, self._engine = self._engine, None
            fetching = self._fetches.detach()
        ContextFetches.fail(fetching, lambda: EngineShutdown("the LLM was shut down before this request received "
                                                             "its pages"))  # fmt: skip
        if engine is None:
            return
        engine.shutdown()
        for array in jax.tree.leaves((engine.runner.params, engine.runner.kv_cache)):
            if isinstance(array, jax.Array) and not array.is_deleted():
                array.delete()
        if engine.runner.adapters is not None:
            engine.runner.adapters.delete()
        engine.runner.params = engine.runner.kv_cache = None
        self.params = None
        del engine
        _release_host_memory()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self):
        try:
            self.shutdown()
        except Exception:
            pass
