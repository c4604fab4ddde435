"""The LLM class: TensorRT-LLM's `LLM` API over the jaxllm engine.

    llm = LLM(model="smollm2")
    out = llm.generate("What is machine learning?", SamplingParams(temperature=0.7, top_p=0.9, max_tokens=200))
    print(out.outputs[0].text)

`LLM.__init__` validates its arguments and has jaxllm/engine/builder.py resolve and load the
checkpoint, size the KV cache and start the engine thread. `generate` / `generate_async` validate
and tokenize every prompt and build its Request (jaxllm/inputs.py) before anything reaches the
engine, so a bad prompt raises in the caller and the engine keeps serving.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any, Callable, Optional

import jax
from tqdm.auto import tqdm

from jaxllm import distributed
from jaxllm import inputs as inputs_lib
from jaxllm import sharding as sharding_lib
from jaxllm import trtllm_args
from jaxllm.checkpoints import saved
from jaxllm.config import resolve_dtype
from jaxllm.disaggregated_params import ContextFetches, context_state
from jaxllm.engine.builder import EXECUTABLES_DIR, EngineBuilder, dismantle, release_host_memory
from jaxllm.engine.engine import Engine, EngineShutdown
from jaxllm.engine.sequence import Request
from jaxllm.inputs import PreprocessedInputs, RequestFactory, request_extras
from jaxllm.llm_args import EngineArgs, resolve_backend
from jaxllm.models.params import flatten_paths, is_fused, unflatten_paths, unfuse_params
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import SamplingParams

logger = logging.getLogger("jaxllm")

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


def _jsonable(kwargs: dict) -> dict:
    """Engine arguments as plain JSON values (for the followers of a multi-process run)."""
    out = {}
    for key, value in kwargs.items():
        out[key] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    json.dumps(out)  # raises TypeError for anything that cannot travel
    return out


def _process_local(devices: Optional[list]) -> bool:
    """Whether `devices` are given and all belong to this process."""
    return devices is not None and all(d.process_index == jax.process_index() for d in devices)


def _mesh(devices: Optional[list], tensor_parallel_size: int):
    """The devices' mesh (None: one device, the default one)."""
    if devices is not None and (not isinstance(devices, (list, tuple)) or len(devices) != tensor_parallel_size
                                or not all(isinstance(d, jax.Device) for d in devices)):  # fmt: skip
        raise ValueError(f"devices={devices!r} is invalid; allowed: None or a list of "
                         f"tensor_parallel_size={tensor_parallel_size} jax devices")  # fmt: skip
    use_mesh = tensor_parallel_size != 1 or devices is not None
    return sharding_lib.make_mesh(tensor_parallel_size, devices) if use_mesh else None


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
        batched_logits_processor: Optional[Callable] = None,
        _follower_channel: Any = None,
        _precompile_only: Any = None,
        **kwargs: Any,
    ):
        """Load a model and start its engine.

        Beyond TensorRT-LLM's arguments: `devices`, the JAX devices to run on (default: the first
        `tensor_parallel_size` of jax.devices()), e.g. to place two LLMs on two GPUs of one process.
        In a multi-process run, devices all of this process's make an engine of this process alone
        (data parallelism: jaxllm/batch/); otherwise the engine spans every process's devices.
        Engine arguments (`**kwargs`) are listed in jaxllm/llm_args.py; TensorRT-LLM's others (and a
        few of vLLM's) are mapped in jaxllm/trtllm_args.py (docs/COMPATIBILITY.md).
        `batched_logits_processor`: TensorRT-LLM's, called once per step with the logits of the
        requests whose SamplingParams set apply_batched_logits_processor (engine/logits_processors.py).
        """
        if batched_logits_processor is not None and not callable(batched_logits_processor):
            raise TypeError(f"batched_logits_processor must be callable (a BatchedLogitsProcessor) or None, got "
                            f"{batched_logits_processor!r:.100}")  # fmt: skip
        backend = trtllm_args.attention_backend(backend, kwargs.pop("attn_backend", None))  # TensorRT-LLM's name
        self._shutdown_lock = threading.Lock()
        self._engine: Engine | None = None
        self._fetches = ContextFetches(self._shutdown_lock)  # generation_only requests fetching their pages
        self.llm_id = uuid.uuid4().hex
        self.disaggregated_params = None
        self.workspace = None
        # Multi-process runs (jaxllm/launch.py): the leader tells the followers what to build.
        self._channel = _follower_channel
        if _follower_channel is None and distributed.initialize_from_env() and not _process_local(devices):
            self._channel = self._lead_followers(model, dtype, tensor_parallel_size, revision, backend, devices, kwargs)
        self.mesh, self.tensor_parallel_size = _mesh(devices, tensor_parallel_size), tensor_parallel_size
        if not isinstance(skip_tokenizer_init, bool):
            raise TypeError(f"skip_tokenizer_init must be a bool, got {skip_tokenizer_init!r}")
        resolve_dtype(dtype)  # validate the name before loading anything
        started = time.perf_counter()
        platform = (list(self.mesh.devices.flat)[0] if self.mesh is not None else jax.devices()[0]).platform
        resolve_backend(backend, platform)  # validate names before loading anything
        EngineArgs.from_kwargs(kwargs)
        builder = EngineBuilder(model, revision, dtype, backend, kwargs, mesh=self.mesh, platform=platform,
                                tensor_parallel_size=tensor_parallel_size, channel=self._channel, llm_id=self.llm_id,
                                precompile_only=_precompile_only)  # fmt: skip
        self.model_name = str(model)
        self.resolved, self.config, self.dtype, self.args = builder.resolved, builder.config, builder.dtype, builder.args
        self.backend_name, self.backend, self.compile_cache_dir = builder.backend_name, builder.backend, \
            builder.compile_cache_dir  # fmt: skip
        self.tp_plan, self.engine_config = builder.tp_plan, builder.engine_config
        self.params = self.tokenizer = None
        engine = builder.build(tokenizer, tokenizer_revision, trust_remote_code, tokenizer_mode, skip_tokenizer_init)
        self.tokenizer, self.params, self.max_seq_len = builder.tokenizer, builder.params, builder.max_seq_len
        self._lora_cache, self._prompt_cache = builder.lora_cache, builder.prompt_cache
        if engine is None:  # a follower process, whose leader has shut down
            return
        self._engine, self._kv_fingerprint = engine, builder.kv_fingerprint
        engine.batched_logits_processor = batched_logits_processor
        guided = None
        if self.args.guided_decoding_backend is not None:
            from jaxllm.guided import GuidedDecoder

            guided = GuidedDecoder(self.args.guided_decoding_backend, self.tokenizer, self.config.vocab_size)
        self._requests = RequestFactory(self.config, self.tokenizer, self.max_seq_len, self.args.max_input_len,
                                        self.args.max_batch_size, self._lora_cache, self._prompt_cache,
                                        unchunked_max_num_tokens=None if self.args.enable_chunked_prefill
                                        else self.args.max_num_tokens,
                                        batched_logits_processor=batched_logits_processor is not None,
                                        max_logprobs=self.args.max_logprobs, guided=guided,
                                        max_beam_width=self.args.max_beam_width)  # fmt: skip
        _register_live(self)
        self.load_seconds = time.perf_counter() - started
        logger.info("ready in %.1f s", self.load_seconds)

    def _lead_followers(self, model, dtype, tensor_parallel_size: int, revision, backend, devices, kwargs: dict):
        """(the leader of a multi-process run) The step channel, once it has sent the followers the
        arguments of the LLM they build alongside this one."""
        if devices is not None:
            raise ValueError("devices= cannot be given in a multi-process run: the mesh spans every process")
        if tensor_parallel_size != jax.device_count():
            raise ValueError(
                f"tensor_parallel_size={tensor_parallel_size} must equal the {jax.device_count()} devices of "
                f"the {jax.process_count()} processes in a multi-process run"
            )
        channel = distributed.StepChannel()
        channel.send({"kind": "construct", "kwargs": {
            "model": str(model), "dtype": dtype if isinstance(dtype, str) else jax.numpy.dtype(dtype).name,
            "tensor_parallel_size": tensor_parallel_size, "revision": revision, "backend": backend,
            "skip_tokenizer_init": True, **_jsonable(kwargs)}})  # fmt: skip
        return channel

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
        inputs=None,
        sampling_params=None,
        use_tqdm: bool = True,
        lora_request=None,
        prompt_adapter_request=None,
        kv_cache_retention_config=None,
        disaggregated_params=None,
        scheduling_params=None,
        cache_salt=None,
        prompt_token_ids=None,
    ):
        """Generate for one prompt (returns a RequestOutput) or a batch (a list, in input order).

        `prompt_token_ids` (vLLM's older keyword): the prompts as token ids, `inputs` then None or
        their texts.

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
        inputs = inputs_lib.with_prompt_token_ids(inputs, prompt_token_ids)
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

    def chat(
        self,
        messages,
        sampling_params=None,
        use_tqdm: bool = True,
        lora_request=None,
        chat_template: Optional[str] = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: Optional[list] = None,
        chat_template_kwargs: Optional[dict] = None,
        **generate_kwargs,
    ):
        """Generate the next message of one conversation (returns a RequestOutput) or of a list of
        them (a list, in order), as vLLM's `LLM.chat`.

        A conversation is a list of {"role": ..., "content": ...} messages (content a string or a
        list of {"type": "text", "text": ...} parts), rendered with the model's chat template or
        `chat_template`; `chat_template_kwargs` go to the template. The other arguments are
        `generate`'s (`generate_kwargs`: prompt_adapter_request, scheduling_params, cache_salt, ...).
        """
        from jaxllm import chat as chat_lib

        single = chat_lib.is_conversation(messages)
        conversations = [messages] if single else list(messages) if isinstance(messages, (list, tuple)) else None
        if not conversations:
            raise ValueError(f"messages must be a conversation (a list of message dicts) or a non-empty list of "
                             f"them, got {messages!r:.100}")  # fmt: skip
        prompts = []
        for i, conversation in enumerate(conversations):
            try:
                prompts.append(chat_lib.render(self.tokenizer, conversation, chat_template, add_generation_prompt,
                                               continue_final_message, tools, chat_template_kwargs))  # fmt: skip
            except ValueError as e:
                raise ValueError(str(e) if single else f"conversation {i}: {e}") from None
        outputs = self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request,
                                **generate_kwargs)  # fmt: skip
        return outputs[0] if single else outputs

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

    # ---- stats, saving, lifetime -------------------------------------------------------------
    def get_stats(self, timeout: float = 2.0) -> list[dict]:
        """Per-iteration statistics collected since the last call (TensorRT-LLM's keys)."""
        engine = self._check_open()
        return _poll(engine, engine.stats, timeout)

    async def get_stats_async(self, timeout: float = 2.0):
        """Async iterator over the per-iteration statistics (TensorRT-LLM's get_stats_async)."""
        import asyncio

        for item in await asyncio.to_thread(self.get_stats, timeout):
            yield item

    def get_kv_cache_events(self, timeout: float = 2.0) -> list[dict]:
        """KV cache events recorded since the last call (TensorRT-LLM's; needs
        kv_cache_config.event_buffer_max_size > 0, else always []); waits up to `timeout` seconds
        for one while the engine has work. The format is in jaxllm/engine/kv_events.py."""
        engine = self._check_open()
        buffer = engine.block_manager.events
        return [] if buffer is None else _poll(engine, buffer.take, timeout)

    async def get_kv_cache_events_async(self, timeout: float = 2.0):
        """Async iterator over the KV cache events (TensorRT-LLM's get_kv_cache_events_async)."""
        import asyncio

        for item in await asyncio.to_thread(self.get_kv_cache_events, timeout):
            yield item

    def save(self, engine_dir: str | Path) -> None:
        """Save weights (orbax), config, tokenizer and engine arguments; `LLM(model=engine_dir)` reloads it."""
        path = Path(engine_dir)
        path.mkdir(parents=True, exist_ok=True)
        engine = self._check_open()
        params = engine.runner.params
        if is_fused(params):  # the checkpoint's separate projections (models/params.py)
            params = unfuse_params(params, self.engine_config)
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
        dismantle(engine)
        self.params = None
        del engine  # (the last reference: the engine's memory is freed by the collection below)
        release_host_memory()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self):
        try:
            self.shutdown()
        except Exception:
            pass


def _poll(engine: Engine, take, timeout: float | None) -> list:
    """`take()`'s items; while there are none and the engine has work, taken again until `timeout`
    seconds have passed (get_stats / get_kv_cache_events)."""
    deadline = time.monotonic() + (timeout or 0)
    items = take()
    while not items and time.monotonic() < deadline and engine.scheduler.has_work():
        time.sleep(0.01)
        items = take()
    return items
