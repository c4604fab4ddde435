"""Assembling an LLM's engine from its arguments, and taking it apart at shutdown.

`EngineBuilder` resolves the model and reads its config (a saved engine brings its own arguments),
then `build` runs the start-up order (docs/ARCHITECTURE.md): size the KV cache from the weights'
abstract bytes -> prepare the programs on a thread while the tokenizer and the weights load ->
allocate the KV cache (after compiling, whose autotuning needs that memory) -> the scheduler and the
engine thread. Each phase logs its time at INFO. `dismantle` stops an engine and frees its memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np

from jaxllm import calibration, distributed, speculative
from jaxllm import sharding as sharding_lib
from jaxllm.adapters.bank import AdapterBank
from jaxllm.adapters.cache import AdapterCache
from jaxllm.adapters.lora import LORA_PARAMS, load_lora_adapter
from jaxllm.adapters.prompt import load_prompt_adapter
from jaxllm.checkpoints import loader, saved
from jaxllm.config import ModelConfig, resolve_dtype, resolve_kv_dtype
from jaxllm.engine import kv_state
from jaxllm.engine.adapter_slots import AdapterAdmission, SlotTable
from jaxllm.engine.block_manager import BlockManager
from jaxllm.engine.decode_cap import DecodeCap
from jaxllm.engine.engine import Engine
from jaxllm.engine.executables import resolve_cache_dir
from jaxllm.engine.host_cache import HostPageCache
from jaxllm.engine.kv_events import KVCacheEvents
from jaxllm.engine.kv_planner import bytes_per_token, check_weights_fit, plan_num_pages
from jaxllm.engine.runner import BIAS_SLOTS, ModelRunner, RunnerConfig
from jaxllm.engine.scheduler import Scheduler, SchedulerConfig
from jaxllm.engine.stats import IterationStats
from jaxllm.llm_args import EngineArgs, resolve_backend
from jaxllm.models.params import engine_abstract_params, param_bytes
from jaxllm.tokenizer import load_tokenizer

logger = logging.getLogger("jaxllm")

EXECUTABLES_DIR = "executables"  # a saved engine's compiled programs, beside its weights
PRECOMPILE_ENV = "JAXLLM_PRECOMPILE"


@contextlib.contextmanager
def _phase(what: str, *args):
    """Log one start-up phase with its time (INFO)."""
    started = time.perf_counter()
    yield
    logger.info(what + " in %.1f s", *args, time.perf_counter() - started)


class EngineBuilder:
    """Builds one LLM's engine. Its attributes are what the LLM keeps: the resolved model (`resolved`,
    `config`, `dtype`), its arguments (`args`, `backend`, `backend_name`), the tensor-parallel layout
    (`tp_plan`, `engine_config`), and, once built, `max_seq_len`, `tokenizer`, `params`, the adapter
    caches and `kv_fingerprint`.

    Args:
      model, revision, dtype, backend, kwargs: the LLM's arguments (already validated); kwargs are
        the engine arguments (jaxllm/llm_args.py).
      mesh: the devices' mesh (None: one device); platform: their platform ('gpu', 'cpu').
      channel: the step channel of a multi-process run (None: one process).
      llm_id: the LLM's id (what a context state names).
    """

    def __init__(self, model: str | Path, revision: Optional[str], dtype, backend: Optional[str], kwargs: dict, *,
                 mesh, tensor_parallel_size: int, platform: str, channel: Any = None, llm_id: str = "",
                 precompile_only=None):  # fmt: skip
        self.mesh, self.tensor_parallel_size, self.channel, self.llm_id = mesh, tensor_parallel_size, channel, llm_id
        self.platform = platform
        # A buckets.ProgramNeeds: only the programs it keeps are made before serving (a batch job's).
        self.precompile_only = precompile_only
        self.revision = revision
        with _phase("resolved model %s", model):
            self.resolved = loader.resolve(model, revision)
        if self.resolved.kind == "saved":
            cfg, saved_dtype, saved_args = saved.read_config(self.resolved.path)
            # A saved engine keeps its arguments (its compiled buckets depend on them) unless overridden.
            backend = backend if backend is not None else saved_args.pop("backend", None)
            saved_args.pop("backend", None)
            saved_args.pop("calib_config", None)  # a calibrated engine saved its scales with its weights
            kwargs = {**saved_args, **kwargs}
            self.dtype = resolve_dtype(dtype, saved_dtype)
        else:
            cfg = loader.read_config(self.resolved)
            self.dtype = resolve_dtype(dtype, cfg.checkpoint_dtype)
        self.backend_name = backend
        self.backend = resolve_backend(backend, platform)
        self.args = EngineArgs.from_kwargs(kwargs).platform_defaults(platform)
        self.calib_samples = None  # calib_config's dataset, read (and checked) by _quantization
        cfg = self._quantization(cfg)
        self.compile_cache_dir = resolve_cache_dir(self.args.compilation_cache_dir)
        self.config: ModelConfig = cfg
        self.tp_plan = sharding_lib.plan_tensor_parallel(cfg, tensor_parallel_size) if mesh is not None else None
        self.engine_config = self.tp_plan.engine_config(cfg) if self.tp_plan is not None else cfg
        # Refuse weights that cannot fit before anything is built per layer or allocated.
        check_weights_fit(param_bytes(cfg, self.dtype), list(mesh.devices.flat) if mesh is not None
                          else jax.devices()[:1], tensor_parallel_size)  # fmt: skip
        self.tokenizer = self.params = None
        self.lora_cache = self.prompt_cache = None
        self.draft = self._resolve_draft()  # DraftTargetDecodingConfig's model: (resolved, config), or None
        self.draft_runner: ModelRunner | None = None

    def _quantization(self, cfg: ModelConfig) -> ModelConfig:
        """The engine's weight format: a pre-quantized (ModelOpt) checkpoint's or a saved engine's own,
        or quant_config's, made as a float checkpoint loads (with a calib_config, FP8's static input
        scales and the fp8 cache's K/V scales too: calibration.calibrated_config). A ModelOpt
        checkpoint whose KV cache was calibrated for FP8 gets an fp8 cache unless
        kv_cache_config.dtype says otherwise, as in TensorRT-LLM."""
        qc, calib = self.args.quant_config, self.args.calib_config
        if calib is not None:
            if cfg.quant_algo is not None or cfg.kv_cache_scales or self.resolved.kind == "saved":
                raise ValueError(f"calib_config is given, but {self.resolved.path} is quantized or saved already (its "
                                 "scales stand); calibration measures a float Hugging Face or GGUF checkpoint's FP8 "
                                 "scales as it loads: allowed: calib_config=None")  # fmt: skip
            kv_fp8 = resolve_kv_dtype(self.args.kv_cache_config.dtype, self.dtype) == resolve_kv_dtype("fp8")
            calibrated = calibration.calibrated_config(cfg, qc, kv_fp8)
            if self.channel is None or distributed.is_leader():  # (followers get the leader's scales)
                self.calib_samples = calibration.read_samples(calib)  # a bad dataset fails before anything is built
            return calibrated
        if cfg.quant_algo is not None:  # the checkpoint is quantized already: its format stands
            # (kv_cache_scales: hf.read_config found the checkpoint calibrated for an fp8 KV cache)
            if cfg.kv_cache_scales and self.args.kv_cache_config.dtype == "auto":
                self.args.kv_cache_config = dataclasses.replace(self.args.kv_cache_config, dtype="fp8")
            return cfg
        if qc is None or qc.weight_format is None:
            return cfg
        return qc.applied_to(cfg)

    def build(self, tokenizer: Any, tokenizer_revision: Optional[str], trust_remote_code: bool, tokenizer_mode: str,
              skip_tokenizer_init: bool) -> Engine | None:  # fmt: skip
        """Load everything and start the engine thread; None in a follower process, once its leader
        has shut down (it follows the leader's steps until then)."""
        # The programs depend on the weights' shapes, not their values: they are loaded from the
        # cache or compiled (on a pool of threads) while the tokenizer and the weights load.
        runner = self._build_runner()
        # (Several processes load their weights in step, before the leader's programs are sent.)
        preparing = self._prepare_programs(runner, background=True) if self.channel is None else None
        if not skip_tokenizer_init:
            with _phase("tokenizer"):
                source = tokenizer if tokenizer is not None else self.resolved
                self.tokenizer = load_tokenizer(source, tokenizer_revision or self.revision, trust_remote_code,
                                                tokenizer_mode)  # fmt: skip
        args = self.args
        scales = None
        if args.calib_config is not None:
            with _phase("calibration (%s)", args.calib_config.calib_dataset):
                scales = self._calibrated_scales()
        with _phase("weights (%s, %s)", "random" if args.load_format == "dummy" else self.resolved.kind,
                    jax.numpy.dtype(self.dtype).name):  # fmt: skip
            self.params = loader.load_engine_params(self.resolved, self.config, self.dtype, self.tp_plan, self.mesh,
                                                    args.load_format, args.seed or 0,
                                                    cache_dir=self.compile_cache_dir, scales=scales)  # fmt: skip
        runner.params = self.params
        if self.draft_runner is not None:
            with _phase("draft model's weights (%s)", "random" if args.load_format == "dummy" else self.draft[0].kind):
                self.draft_runner.params = loader.load_engine_params(self.draft[0], self.draft[1], self.dtype, None, None,
                                                                     args.load_format, (args.seed or 0) + 1,
                                                                     cache_dir=self.compile_cache_dir)  # fmt: skip
            if os.environ.get(PRECOMPILE_ENV, "1") != "0":
                with _phase("draft model's programs"):
                    self.draft_runner.precompile()
        if self.channel is not None and not distributed.is_leader():
            runner.allocate()
            runner.follow()  # until the leader shuts down
            return None
        if preparing is not None:
            preparing()
        else:
            self._prepare_programs(runner, background=False)
        return self._start_engine(runner)

    def _resolve_draft(self):
        """DraftTargetDecodingConfig's draft model, (resolved, config): one device and process, the
        target's vocabulary; None without one."""
        spec = self.args.speculative_config
        if not isinstance(spec, speculative.DraftTargetDecodingConfig):
            return None
        if self.mesh is not None or self.channel is not None:
            raise ValueError("speculative_config=DraftTargetDecodingConfig(...) needs one device and one process "
                             "(tensor_parallel_size=1); allowed there: NGramDecodingConfig")  # fmt: skip
        resolved = loader.resolve(spec.speculative_model)
        if resolved.kind == "saved":
            cfg = saved.read_config(resolved.path)[0]
        else:
            cfg = loader.read_config(resolved)
        if cfg.vocab_size != self.config.vocab_size:
            raise ValueError(f"speculative_model={spec.speculative_model!r} has a vocabulary of {cfg.vocab_size} "
                             f"tokens, the model {self.config.vocab_size}; allowed: a draft model of the same "
                             "vocabulary (tokenizer)")  # fmt: skip
        return resolved, cfg

    def _build_adapters(self) -> AdapterBank | None:
        """The adapter bank on the device and the host caches, when LoRA or prompt adapters are enabled."""
        args = self.args
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
            self.lora_cache = AdapterCache("LoRA", lora.max_cpu_loras, lambda path, adapter_id: load_lora_adapter(
                path, self.config, lora_rank, targets, adapter_id))  # fmt: skip
        prompt_slots = prompt_tokens = 0
        if args.enable_prompt_adapter:
            prompt_slots, prompt_tokens = args.max_prompt_adapters, args.max_prompt_adapter_token
            self.prompt_cache = AdapterCache(
                "prompt adapter", args.max_cpu_prompt_adapters,
                lambda path, adapter_id: load_prompt_adapter(path, self.config, prompt_tokens, adapter_id))  # fmt: skip
        return AdapterBank(self.config, self.engine_config, self.dtype, lora_slots=lora_slots, lora_rank=lora_rank,
                           lora_targets=targets, prompt_slots=prompt_slots, prompt_tokens=prompt_tokens,
                           plan=self.tp_plan, mesh=self.mesh)  # fmt: skip

    def _abstract_params(self):
        """The weights as ShapeDtypeStructs with the shardings they load into."""
        abstract = engine_abstract_params(self.engine_config, self.dtype, self.mesh)
        if self.mesh is not None:
            shardings = sharding_lib.engine_param_shardings(self.engine_config, self.mesh)
        else:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: device, abstract)
        return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings)

    def _plan_pages(self, abstract) -> int:
        """The KV cache's pages: what the devices hold beside the weights (the leader's number in a
        multi-process run, so that every process sizes the cache alike)."""
        cfg, args = self.engine_config, self.args
        kv_cfg = args.kv_cache_config
        devices = list(self.mesh.devices.flat) if self.mesh is not None else None
        weight_bytes = max(0, sum(int(np.prod(a.sharding.shard_shape(a.shape))) * jax.numpy.dtype(a.dtype).itemsize
                                  for a in jax.tree.leaves(abstract)))  # fmt: skip
        extra = 0
        if self.draft is not None:  # its weights, and its K/V in the same pages
            weight_bytes += param_bytes(self.draft[1], self.dtype)
            extra = bytes_per_token(self.draft[1], self.kv_dtype)
        num_pages = plan_num_pages(cfg, self.kv_dtype, kv_cfg.tokens_per_block, kv_cfg, args.max_num_tokens,
                                   args.max_batch_size, devices, tp_kv_shards=self.tensor_parallel_size,
                                   max_seq_len=args.max_seq_len, pending_bytes=weight_bytes,
                                   extra_per_token=extra)  # fmt: skip
        if num_pages < 2:
            raise ValueError(
                "the KV cache has no room for a single page after the weights; lower max_num_tokens / "
                "max_batch_size or raise kv_cache_config.free_gpu_memory_fraction"
            )
        if self.channel is not None:  # every process must size the cache alike: the leader decides
            num_pages = self._agree_on("num_pages", num_pages)
        return num_pages

    def _build_runner(self) -> ModelRunner:
        """The KV cache sized for the device, and the runner over it (its weights still abstract)."""
        cfg, args = self.engine_config, self.args
        self.adapter_bank = self._build_adapters()  # before sizing the KV cache
        kv_cfg = args.kv_cache_config
        self.kv_dtype = resolve_kv_dtype(kv_cfg.dtype, self.dtype)
        self._check_kv_dtype_backend()
        page_size = kv_cfg.tokens_per_block
        abstract = self._abstract_params()
        num_pages = self._plan_pages(abstract)
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
        self._check_kv_cache_extras(cfg, kv_cfg, max_seq_len)
        runner_config = RunnerConfig(
            max_num_tokens=args.max_num_tokens,
            max_batch_size=args.max_batch_size,
            max_seq_len=max_seq_len,
            page_size=page_size,
            num_pages=num_pages,
            backend=self.backend,
            kv_dtype=self.kv_dtype,
            decode_steps=args.num_scheduler_steps,
            decode_batch_sizes=tuple(args.cuda_graph_config.batch_sizes)
            if args.cuda_graph_config is not None and args.cuda_graph_config.batch_sizes else None,
            command_buffers=args.cuda_graph_config is not None,
            guided=args.guided_decoding_backend is not None,
        )
        kv_bytes = num_pages * page_size * bytes_per_token(cfg, self.kv_dtype)
        logger.info("KV cache: %d pages of %d tokens (%.2f GB, %s), max_seq_len %d", num_pages, page_size,
                    kv_bytes / 1e9, jax.numpy.dtype(self.kv_dtype).name, max_seq_len)
        if self.draft is not None:  # greedy drafts of max_draft_len tokens: a multi-step decode of that many
            k = args.speculative_config.max_draft_len
            draft_config = dataclasses.replace(runner_config, decode_steps=k, guided=False)
            self.draft_runner = ModelRunner(self.draft[1], _abstract_on_one_device(self.draft[1], self.dtype), draft_config,
                                            cache_dir=self.compile_cache_dir)  # fmt: skip
        return ModelRunner(cfg, abstract, runner_config, mesh=self.mesh, channel=self.channel,
                           adapters=self.adapter_bank, cache_dir=self.compile_cache_dir)  # fmt: skip

    def _check_kv_dtype_backend(self) -> None:
        """A float8 KV cache on the Pallas kernels needs a GPU that converts float8 E4M3 (compute
        capability 8.9+: Ada, Hopper and later; Triton refuses the cast below that). The 'xla'
        backend reads such a cache on any device."""
        if jax.numpy.dtype(self.kv_dtype).itemsize != 1 or self.backend != "pallas":
            return
        devices = list(self.mesh.devices.flat) if self.mesh is not None else jax.local_devices()[:1]
        for device in devices:
            capability = getattr(device, "compute_capability", None)
            try:
                major, minor = (int(x) for x in str(capability).split(".")[:2])
            except ValueError:
                continue  # not reported: let the kernels' compilation decide
            if (major, minor) < (8, 9):
                raise ValueError(f"kv_cache_config.dtype={self.args.kv_cache_config.dtype!r} is not supported by the "
                                 f"Pallas kernels on {device.device_kind} (compute capability {capability}; float8 "
                                 "E4M3 needs 8.9 or later); allowed: backend='xla' with an fp8 KV cache, or "
                                 "kv_cache_config.dtype 'auto', 'bfloat16', 'float16', 'float32'")  # fmt: skip

    def _check_kv_cache_extras(self, cfg, kv_cfg, max_seq_len: int) -> None:
        """KvCacheConfig fields that depend on the model or the run: max_attention_window (each
        layer's window is its own, or at least max_seq_len: no limit), the host tier (one process)."""
        windows = kv_cfg.max_attention_window
        if windows is not None:
            own = [cfg.layer_window(i) for i in range(cfg.num_layers)]
            for i, window in enumerate(windows[i % len(windows)] for i in range(cfg.num_layers)):
                if window < max_seq_len and window != own[i]:
                    described = sorted({w for w in own if w is not None})
                    model = (f"its sliding layers attend to {described[0]} positions, the others to all"
                             if described else "every layer attends to all positions")  # fmt: skip
                    raise ValueError(
                        f"kv_cache_config.max_attention_window={windows} is invalid for this model ({model}; "
                        f"layer {i} would get {window}); allowed: None, a window >= max_seq_len={max_seq_len}, or "
                        f"per layer the model's own windows {[w or max_seq_len for w in own]}"
                    )
        if kv_cfg.host_cache_size and self.channel is not None:
            raise ValueError(f"kv_cache_config.host_cache_size={kv_cfg.host_cache_size} is invalid in a multi-process "
                             "LLM (pages cannot be moved there); allowed: None or 0")  # fmt: skip
        if kv_cfg.host_cache_size and not kv_cfg.onboard_blocks:
            logger.warning("kv_cache_config.onboard_blocks=False: jaxllm's attention reads device pages only, so "
                           "host-tier pages are copied back to the device before reuse (as with True)")
        if kv_cfg.secondary_offload_min_priority is not None and not kv_cfg.host_cache_size:
            logger.warning("kv_cache_config.secondary_offload_min_priority has no effect without host_cache_size")

    def _kv_cache_tiers(self, runner: ModelRunner) -> tuple[HostPageCache | None, KVCacheEvents | None]:
        """The host tier and the event buffer KvCacheConfig asks for (None: not asked, or block reuse off)."""
        kv_cfg = self.args.kv_cache_config
        host = events = None
        if not kv_cfg.enable_block_reuse:
            if kv_cfg.host_cache_size or kv_cfg.event_buffer_max_size:
                logger.warning("kv_cache_config.host_cache_size and event_buffer_max_size need enable_block_reuse=True")
            return None, None
        if kv_cfg.host_cache_size:
            page_bytes = sum(int(np.prod(x.shape)) // x.shape[1] * x.dtype.itemsize
                             for layer in runner.kv_cache for x in layer)  # fmt: skip
            host = HostPageCache(kv_cfg.host_cache_size, page_bytes, runner.gather_pages, runner.scatter_pages,
                                 kv_cfg.secondary_offload_min_priority)  # fmt: skip
            logger.info("KV host tier: %d pages (%d bytes each)", host.capacity, page_bytes)
        if kv_cfg.event_buffer_max_size:
            events = KVCacheEvents(kv_cfg.event_buffer_max_size, self.max_seq_len)
        return host, events

    def _page_copier(self, runner: ModelRunner):
        """Partial reuse's page copy (KvCacheConfig.enable_partial_reuse), or None: off, or a
        multi-process LLM (whose pages do not move), where whole pages only are reused."""
        kv_cfg = self.args.kv_cache_config
        if not kv_cfg.enable_block_reuse or not kv_cfg.enable_partial_reuse:
            return None
        if self.channel is not None:
            logger.info("kv_cache_config.enable_partial_reuse: a multi-process LLM reuses whole pages only")
            return None

        runner.prepare_copies()  # compiled now, not at the first partial hit
        draft = self.draft_runner
        if draft is None:
            return runner.copy_page
        draft.prepare_copies()

        def copy_page(source: int, target: int) -> None:  # the draft model's K/V in the same pages
            runner.copy_page(source, target)
            draft.copy_page(source, target)

        return copy_page

    def _prepare_programs(self, runner: ModelRunner, background: bool):
        """Make every program the engine can ask for: serving then never waits for a compilation
        ($JAXLLM_PRECOMPILE=0 compiles each at its first use instead, for tests and experiments; the
        'tensorrt' backend, TensorRT-LLM's ahead-of-time one, precompiles whatever it says). With
        `background`, on a thread: returns a function that waits for it (and raises what it raised)."""
        if self.channel is not None and not distributed.is_leader():
            return None  # a follower makes what the leader's precompile message lists
        started = time.perf_counter()

        def prepare():
            if self.resolved.kind == "saved":
                loaded = runner.load_executables(self.resolved.path / EXECUTABLES_DIR)
                logger.info("loaded %d compiled programs from %s", loaded, self.resolved.path)
            if os.environ.get(PRECOMPILE_ENV, "1") != "0" or self.backend_name == "tensorrt":
                only = self.precompile_only
                runner.precompile(None if only is None else [s for s in runner.bucket_shapes() if only.keeps(s)])

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

    def _transfer_settings(self) -> kv_state.TransferSettings:
        """Where and how this engine's KV pages travel in disaggregated serving."""
        transceiver = self.args.cache_transceiver_config
        layout = kv_state.KVLayout(self.config.num_layers, self.config.num_kv_heads, self.config.head_dim,
                                      jax.numpy.dtype(self.kv_dtype).name, self.max_seq_len)  # fmt: skip
        return kv_state.TransferSettings(
            llm_id=self.llm_id, fingerprint=kv_state.fingerprint(self.config, self.kv_dtype), layout=layout,
            plan=self.tp_plan, host=transceiver.host, port=transceiver.port,
            timeout_s=transceiver.kv_transfer_timeout_ms / 1e3, io_timeout_s=transceiver.io_timeout_ms / 1e3,
            max_connections=transceiver.max_connections,
            cluster_key=kv_state.cluster_key(transceiver.cluster_secret),
        )  # fmt: skip

    def _start_engine(self, runner: ModelRunner) -> Engine:
        """The scheduler and the engine thread, over a runner whose programs are ready."""
        cfg, args, adapters = self.engine_config, self.args, self.adapter_bank
        runner.allocate()
        runner.warm_up()
        if self.draft_runner is not None:
            self.draft_runner.allocate()
        kv_cfg = args.kv_cache_config
        host, events = self._kv_cache_tiers(runner)
        num_pages, page_size, max_num_tokens = runner.config.num_pages, runner.config.page_size, args.max_num_tokens
        admission = AdapterAdmission(
            lora=SlotTable(adapters.lora_slots, runner.write_lora) if adapters and adapters.lora_slots else None,
            prompt=(SlotTable(adapters.prompt_slots, runner.write_prompt_adapter)
                    if adapters and adapters.prompt_slots else None),
            bias=SlotTable(BIAS_SLOTS, lambda slot, row: runner.write_bias(slot, row.values)),
        )  # fmt: skip
        scheduler = Scheduler(
            SchedulerConfig(max_num_tokens, args.max_batch_size, args.enable_chunked_prefill,
                            capacity_policy=(args.scheduler_config.capacity_scheduler_policy.value
                                             if args.scheduler_config is not None else "MAX_UTILIZATION"),
                            max_seq_len=self.max_seq_len,
                            priorities=args.scheduler_config is None
                            or args.scheduler_config.waiting_queue_policy.value == "priority",
                            equal_progress=args.scheduler_config is not None
                            and args.scheduler_config.context_chunking_policy == "EQUAL_PROGRESS"),  # fmt: skip
            BlockManager(num_pages, page_size, enable_reuse=kv_cfg.enable_block_reuse, host=host, events=events,
                         copy_page=self._page_copier(runner)),
            admission=admission,
        )
        transfer = self._transfer_settings()
        self.kv_fingerprint = transfer.fingerprint
        # enable_iter_perf_stats=False keeps no iteration (TensorRT-LLM's get_stats is then empty).
        stats = IterationStats(args.iter_stats_max_iterations if args.enable_iter_perf_stats else 0,
                               args.enable_iter_req_stats and args.enable_iter_perf_stats,
                               args.request_stats_max_iterations)  # fmt: skip
        return Engine(runner, scheduler, self.tokenizer, self.max_seq_len, cfg.vocab_size, transfer,
                      overlap=not args.disable_overlap_scheduler, stats=stats, stream_interval=args.stream_interval,
                      print_iter_log=args.print_iter_log,
                      gc_gen0_threshold=args.garbage_collection_gen0_threshold,
                      speculation=speculative.Speculation(args.speculative_config, runner.adapters is not None,
                                                          self.draft_runner)
                      if args.speculative_config is not None else None,
                      decode_cap=DecodeCap(runner.buckets.seq_buckets, runner.config.decode_steps)
                      if self._decode_cap() else None)  # fmt: skip

    def _decode_cap(self) -> bool:
        """SchedulerConfig.decode_cap, or by default whether the engine runs on GPUs (engine/decode_cap.py)."""
        chosen = self.args.scheduler_config.decode_cap if self.args.scheduler_config is not None else None
        return self.platform == "gpu" if chosen is None else chosen

    def _calibrated_scales(self) -> dict[str, float]:
        """calib_config's scales; in a multi-process run the leader's, sent to every process (each
        must hold the same replicated scales), and a failure of the leader's ends each follower's build."""
        args = self.args
        if self.channel is not None and not distributed.is_leader():
            header, _ = self.channel.recv()
            if "error" in header:
                raise RuntimeError(f"calibration failed in the leader process: {header['error']}")
            return header["scales"]
        try:
            scales = calibration.calibrate(self.resolved, self.config, self.dtype, args.calib_config, self.tokenizer,
                                           args.load_format, args.seed or 0, self.calib_samples)  # fmt: skip
        except Exception as e:
            if self.channel is not None:
                self.channel.send({"kind": "calibration", "error": f"{type(e).__name__}: {e}"})
            raise
        if self.channel is not None:
            self.channel.send({"kind": "calibration", "scales": scales})
        return scales

    def _agree_on(self, name: str, value: int) -> int:
        if distributed.is_leader():
            self.channel.send({"kind": "agree", name: int(value)})
            return int(value)
        header, _ = self.channel.recv()
        return int(header[name])


def _abstract_on_one_device(cfg: ModelConfig, dtype):
    """A model's weights as ShapeDtypeStructs on the first device (a draft model's)."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        engine_abstract_params(cfg, dtype))  # fmt: skip


def dismantle(engine: Engine) -> None:
    """Stop an engine (its unfinished requests fail with EngineShutdown), delete its device arrays
    and take it apart. Its host memory goes back by `release_host_memory`, once the caller holds no
    reference to it.

    The engine and its runners sit in reference cycles (the bound methods they hand their parts:
    the postprocessor's `park`, the programs' `_lower`, the replica's runner). Emptying their
    attributes breaks them, so that everything they held is freed by reference counting at once,
    not left to a full pass of the cycle collector (which walks every object of the process: 0.25 s
    in a bare one, 0.5-1 s beside torch and a few models)."""
    engine.shutdown()
    runners = [engine.runner] + ([engine.spec.model.runner] if engine.spec is not None and engine.spec.model else [])
    for runner in runners:  # the model's, and a draft model's
        for array in jax.tree.leaves((runner.params, runner.kv_cache)):
            if isinstance(array, jax.Array) and not array.is_deleted():
                array.delete()
        if runner.adapters is not None:
            runner.adapters.delete()
        runner.params = runner.kv_cache = None
    for part in runners:
        vars(part).clear()
    intake = {name: getattr(engine, name) for name in engine.SURVIVES_SHUTDOWN}
    vars(engine).clear()
    vars(engine).update(intake)


def release_host_memory() -> None:
    """Hand the memory a shut-down engine freed back to the operating system.

    The engine's runner and programs sit in reference cycles (bound methods and closures over the
    runner), so they are freed by the cycle collector, not when shutdown drops them. And on the CPU
    the weights, the KV cache and the host arrays of loading are malloc'ed by XLA and numpy from
    several threads: glibc keeps what those threads free in per-thread arenas, below a moving mmap
    threshold, and returns little of it, so RSS grew by tens of MB for every LLM made and shut down
    in one process (hundreds with SmolLM2), freed memory no later LLM reused. malloc_trim(0) returns
    the free pages of every arena (glibc only; elsewhere this is a no-op).

    `dismantle` breaks the engine's own cycles, so the young generations' collection here is enough
    for what is left of them (a full one would walk every object of the process).
    """
    gc.collect(1)
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
