"""ModelRunner: owns the weights, the KV cache and the token pages on the device, and runs the programs.

The scheduler hands it a list of `StepRequest`s; engine/step_inputs.py packs them into a
`BatchMetadata` padded to a bucket (engine/buckets.py), and the runner dispatches, without waiting:
  a forward program (models/step.py:forward_step; KV cache and token pages donated), then
  a sampler program on its last-token logits, in the batch's sampling flavor, and
  a head program on its hidden states when a sequence wants prompt log-probabilities or context
  logits;
or one multi-step decode program (K decodes, sampling inside). `PendingStep.result()` reads the
host arrays. Every program (engine/programs.py) is compiled or loaded from the persistent cache
before the engine serves (`precompile`, engine/executables.py), so a step never waits for one.

Every call that touches the devices goes through a `Replica` (jaxllm/distributed.py): in a run of
several processes the followers replay it by name, with the same arguments, so the runner has no
leader or follower branches. A step that uses adapters runs the `adapters` twin of its forward
program (engine/step_inputs.py:plan_step).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import guided as guided_lib
from jaxllm import sharding as sharding_lib
from jaxllm.adapters.bank import AdapterBank
from jaxllm.config import ModelConfig
from jaxllm.distributed import Replica
from jaxllm.engine import programs as programs_lib
from jaxllm.engine.buckets import ForwardShape, compiler_options, engine_buckets, shape_from_json
from jaxllm.engine.executables import CompileCache, Programs
from jaxllm.engine.step_inputs import (StepPlan, StepRequest, abstract_host_inputs, plan_step, resample_inputs,
                                       sampler_arrays, sampling_flavor)  # fmt: skip
from jaxllm.layers.attention import as_kv_values, kv_storage_dtype, to_kv_dtype
from jaxllm.models.params import abstract_of, is_spec, kv_cache_specs, zeros_of
from jaxllm.models.step import NEXT_TOKENS

__all__ = ["BIAS_SLOTS", "ModelRunner", "PendingStep", "RunnerConfig", "StepRequest", "sampling_flavor"]


# Distinct bias rows (embedding bias plus banned single tokens) the device holds at once; requests
# with the same row share its slot, and a request whose row finds no free slot waits to be admitted.
BIAS_SLOTS = 16


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    max_num_tokens: int
    max_batch_size: int
    max_seq_len: int
    page_size: int
    num_pages: int
    backend: str = "xla"
    kv_dtype: Any = None  # None: the weights' dtype
    decode_steps: int = 1  # K of the multi-step decode programs (1: none)
    vocab_parallel_sampling: bool = True  # under TP, the "plain" flavor samples vocabulary-split logits
    min_decode_rows: int | None = None  # the smallest decode bucket; None: GPU_MIN_DECODE_ROWS on GPUs, else 1
    # The widest multi-step decode; None: max_batch_size on GPUs, CPU_MULTI_STEP_MAX_ROWS on the CPU.
    multi_step_max_rows: int | None = None
    # Small multi-step decodes compiled as one CUDA graph (ONE_GRAPH_OPTIONS); None: under tensor
    # parallelism on GPUs.
    one_graph_decode: bool | None = None
    # The decode buckets up to their largest (LLM(cuda_graph_config=CudaGraphConfig(batch_sizes=...)));
    # None: powers of two (engine/buckets.py decode_buckets).
    decode_batch_sizes: tuple[int, ...] | None = None
    # False (LLM(cuda_graph_config=None)): programs are compiled without XLA command buffers (CUDA graphs).
    command_buffers: bool = True
    # Guided decoding (LLM(guided_decoding_backend=...)): the sampler programs' guided twins.
    guided: bool = False


class ModelRunner:
    """The device side of an engine.

    Args:
      cfg: the engine's model config (tensor-parallel padding applied).
      params: the weights (abstract until the LLM loads them; the programs need only their shapes).
      config: limits, page layout, backend and program switches.
      mesh: a tensor-parallel mesh (jaxllm/sharding.py), or None for one device.
      channel: in a run of several processes, the leader -> follower channel (jaxllm/distributed.py).
      adapters: the LoRA bank / prompt table, or None (no adapter programs).
      cache_dir: the persistent program cache, or None.
    """

    def __init__(self, cfg: ModelConfig, params: dict, config: RunnerConfig, mesh=None, channel=None,
                 adapters: AdapterBank | None = None, cache_dir=None):  # fmt: skip
        self.cfg = cfg
        self.params = params
        self.config = config
        self.dtype = params["embed"].dtype
        self.kv_dtype = config.kv_dtype or self.dtype
        self.kv_storage_dtype = kv_storage_dtype(self.kv_dtype)  # what the cache arrays hold
        self.mesh = mesh
        self._replica = Replica(self, channel)
        self.num_dispatches = 0  # steps dispatched (a follower counts the leader's), numbering PendingStep
        self.adapters = adapters
        self.buckets = engine_buckets(config, self._devices()[0].platform == "gpu", adapters is not None)
        # Abstract until `allocate()`: the programs need only their shapes, and on a GPU compiling them
        # (autotuning) needs the memory the cache would take.
        self.kv_cache, self.token_pages = self._new_state(abstract=True)
        self.bias_table = self._replicate(np.zeros((BIAS_SLOTS + 1, cfg.vocab_size), np.float32))
        # The last sampling dispatch's samples, [max_rows] (programs.merge_tokens reads them), and its number.
        self._prev = self._replicate(np.zeros((self.buckets.max_rows,), np.int32))
        self._prev_index = 0
        self._deferred_logits = None  # a step's logits while its sampler waits (ModelRunner.sample)
        self._write_bias_row = jax.jit(lambda table, row, slot: table.at[slot].set(row), donate_argnums=(0,))
        self._lock = threading.Lock()
        self._cache_dir = cache_dir
        self.reset_programs()
        self._gather = jax.jit(_gather_pages)
        self._scatter = jax.jit(_scatter_pages, donate_argnums=(0, 1))
        self._copy = jax.jit(_copy_pages, donate_argnums=(0, 1))
        self._copies: list[tuple[int, int]] = []  # (source, target) page copies not yet enqueued

    def reset_programs(self) -> None:
        """Drop every program (after a change of `config` or `buckets`: their cache key changes too)."""
        cache = CompileCache(self._cache_dir) if self._cache_dir is not None else None
        self.programs = Programs(self._lower, self._trees, self.compiler_options, self._devices(),
                                 programs_lib.engine_description(self), cache)  # fmt: skip

    # ---- buckets (engine/buckets.py) -------------------------------------------------------------
    seq_buckets = property(lambda self: self.buckets.seq_buckets)
    token_buckets = property(lambda self: self.buckets.token_buckets)
    page_buckets = property(lambda self: self.buckets.page_buckets)

    def bucket_shapes(self) -> list:
        """Every program this engine can ask for."""
        return self.buckets.all_shapes()

    def multi_step_serves(self, requests: list[StepRequest]) -> bool:
        """Whether a multi-step decode program serves these requests (their flavor is compiled)."""
        rows = self.buckets.multi_step_rows(sampling_flavor(requests))
        return bool(rows) and len(requests) <= rows[-1]

    # ---- device state ----------------------------------------------------------------------------
    def _devices(self) -> list:
        """The devices the programs run on, in the order the weights' sharding lists them."""
        return list(self.params["embed"].sharding._device_assignment)

    def _new_state(self, abstract: bool = False):
        """A zeroed KV cache and token pages (models/params.py:kv_cache_specs), or their
        ShapeDtypeStructs with `abstract`; each device holds only its KV heads."""
        specs = kv_cache_specs(self.cfg, self.config.num_pages, self.config.page_size)
        if self.mesh is None:
            device = jax.sharding.SingleDeviceSharding(self._devices()[0])
            shardings = jax.tree.map(lambda _: device, specs, is_leaf=is_spec)
        else:
            shardings = sharding_lib.shardings_of(specs, self.mesh)
        if abstract:
            return abstract_of(specs, self.kv_storage_dtype, shardings)
        return jax.jit(lambda: zeros_of(specs, self.kv_storage_dtype), out_shardings=shardings)()

    def allocate(self) -> None:
        """Put the KV cache and token pages on the devices (once the programs are made)."""
        if isinstance(self.token_pages, jax.ShapeDtypeStruct):
            self.kv_cache, self.token_pages = self._new_state()

    def input_sharding(self):
        """Where a step's host inputs live: replicated over the mesh, or on the one device."""
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(self._devices()[0])
        return sharding_lib.replicated(self.mesh)

    def _replicate(self, array: np.ndarray) -> jax.Array:
        """A host array on the step's devices (every process passes the same values)."""
        return sharding_lib.place(array, self.input_sharding())

    def reset_cache(self) -> None:
        """Drop and rebuild the KV cache (after a failed step left the donated buffers invalid)."""
        self._replica.call("_reset_state")

    def _reset_state(self) -> None:
        self.kv_cache, self.token_pages = self._new_state()
        self._deferred_logits = None

    def close(self) -> None:
        """Leader of a multi-process run: release the followers."""
        self._replica.stop()

    def follow(self) -> None:
        """Follower of a multi-process run: replay the leader's calls until it stops."""
        self._replica.follow()

    # ---- adapter slots and bias rows -------------------------------------------------------------
    def write_lora(self, slot: int, adapter) -> None:
        """Put a LoRA adapter (adapters.lora.LoraAdapter) into device slot `slot` (every process)."""
        self._replica.call("_write_lora", slot, self.adapters.lora_values(adapter))

    def _write_lora(self, slot: int, values: list[dict]) -> None:
        self.adapters.write_lora(slot, values)

    def write_prompt_adapter(self, slot: int, adapter) -> None:
        """Put a prompt adapter (adapters.prompt.PromptAdapter) into device slot `slot` (every process)."""
        self._replica.call("_write_prompt_adapter", slot, self.adapters.prompt_values(adapter))

    def _write_prompt_adapter(self, slot: int, rows: np.ndarray) -> None:
        self.adapters.write_prompt_adapter(slot, rows)

    def write_bias(self, slot: int, row) -> None:
        """Put a bias row ([V] float32: embedding bias, -inf at banned tokens) into slot 1..BIAS_SLOTS."""
        self._replica.call("_write_bias", slot, np.asarray(row, np.float32).reshape(self.cfg.vocab_size))

    def _write_bias(self, slot: int, row: np.ndarray) -> None:
        with self._lock:
            self.bias_table = self._write_bias_row(self.bias_table, self._replicate(row), np.int32(slot))

    def warm_up(self) -> None:
        """Compile the small writers a request can need (bias rows, adapter slots) by writing what
        their slots already hold (zeros)."""
        zeros = np.zeros(self.cfg.vocab_size, np.float32)
        self.bias_table = self._write_bias_row(self.bias_table, self._replicate(zeros), np.int32(0))
        if self.adapters is not None:
            self.adapters.warm_up()

    # ---- programs (engine/programs.py, engine/executables.py) ------------------------------------
    executables = property(lambda self: self.programs.executables)
    num_compilations = property(lambda self: self.programs.num_compiled, doc="Programs compiled (not loaded).")
    compile_seconds = property(lambda self: self.programs.compile_seconds)

    def precompile(self, shapes: list | None = None, progress: bool = True, threads: int | None = None) -> None:
        """Make `shapes` (default: every program this engine can ask for) before serving: from the
        persistent cache, or compiled, several at once (the followers make the same meanwhile)."""
        todo = [s for s in dict.fromkeys(shapes or self.bucket_shapes()) if s not in self.programs]
        if todo:
            self._replica.call("_prepare", [s.to_json() for s in todo], progress, threads)

    def _prepare(self, shapes: list[dict], progress: bool, threads: int | None) -> None:
        self.programs.prepare([shape_from_json(s) for s in shapes], progress=progress, threads=threads)

    def save_executables(self, directory) -> int:
        return self.programs.save(directory)

    def load_executables(self, directory) -> int:
        return self.programs.load_saved(directory)

    def compiler_options(self, shape) -> dict | None:
        """XLA options the program of `shape` is compiled with (engine/buckets.py:compiler_options)."""
        return compiler_options(shape, self._devices()[0].platform == "gpu", self.one_graph_decode(),
                                self.config.command_buffers, self.cfg.quant_algo is not None)  # fmt: skip

    def one_graph_decode(self) -> bool:
        if self.config.one_graph_decode is not None:
            return self.config.one_graph_decode
        devices = self._devices()
        return len(devices) > 1 and devices[0].platform == "gpu"

    @property
    def shard_logits(self) -> bool:
        return self.mesh is not None and self.config.vocab_parallel_sampling

    @property
    def uses_lora(self) -> bool:
        return self.adapters is not None and self.adapters.lora is not None

    def host_inputs(self, shape) -> tuple:
        """ShapeDtypeStructs of the host inputs of `shape`'s program (engine/step_inputs.py)."""
        return abstract_host_inputs(shape, self.config.page_size, self.uses_lora, self.bitmask_words)

    @property
    def bitmask_words(self) -> int:
        """int32 words of a row's token bitmask (guided decoding)."""
        return guided_lib.bitmask_words(self.cfg.vocab_size)

    def _lower(self, shape):
        return programs_lib.lower(self, shape)

    def _trees(self, shape, out_keys: list[str]):
        return programs_lib.trees(self, shape, out_keys)

    # ---- one step ----------------------------------------------------------------------------------
    def run(self, requests: list[StepRequest], decode_steps: int = 1) -> dict[str, np.ndarray]:
        """Run one step and wait for it: `dispatch(...).result()`."""
        return self.dispatch(requests, decode_steps).result()

    def dispatch(self, requests: list[StepRequest], decode_steps: int = 1,
                 after: PendingStep | None = None) -> PendingStep:  # fmt: skip
        """Start one step on the devices and return without waiting for it; `.result()` gives the
        host arrays with a row per request (padding rows cut off).

        Keys: tokens, logprob, rank, (top_ids, top_logprobs), and when asked for:
        prompt_logprob / prompt_rank / prompt_top_ids / prompt_top_logprobs per packed token,
        all_logits [tokens, V], last_logits [requests, V].

        decode_steps=K > 1 (decode-only requests, no logits wanted back): K decodes in one dispatch,
        each feeding its sampled tokens to the next; every key then has a leading axis [K, ...]
        (step k's rows). The block tables must hold the pages of the tokens the caller keeps.

        after: the dispatch whose samples some of these rows read as their input tokens (the
        overlap scheduler, engine.py, schedules a step before the last one's tokens are read): a
        row's token -1 - i is that dispatch's sample of its row i, read on the device (multi-step:
        its last step's). It must be the last dispatch that sampled.
        """
        uses_adapters = self.adapters is not None and any(
            r.lora_slot or (r.prompt_adapter_slot and r.token_ids[0] >= self.cfg.vocab_size) for r in requests
        )
        token_ids = [self._device_token_ids(r) for r in requests]
        plan, arrays, batch = plan_step(requests, decode_steps, self.buckets, self.config.page_size, token_ids,
                                        uses_adapters, self.uses_lora, self.bitmask_words)  # fmt: skip
        with self._lock:  # the followers replay it: the same inputs, the same samples read
            self._flush_copies()
            out = self._replica.call("_dispatch", plan.to_json(), arrays, after.index if after is not None else None)
        pending = PendingStep(out, len(requests), decode_steps, self.num_dispatches, None, self.cfg.vocab_size,
                              plan.forward, sum(map(len, token_ids)))  # fmt: skip
        if plan.deferred:
            pending.deferred = (plan, batch)
        else:
            pending.fetch = self._fetch(plan, out)
        return pending

    def sample(self, pending: PendingStep, requests: list[StepRequest]) -> None:
        """Dispatch the sampler of `pending`, a step whose rows' bitmasks were pending at its
        dispatch (guided rows of a step dispatched ahead of the last one's read: engine.py), with
        `requests` (its rows) now filled in. Nothing may be dispatched between the two."""
        plan, batch = pending.deferred
        arrays = sampler_arrays(plan, requests, batch, self.bitmask_words)
        with self._lock:
            out = self._replica.call("_sample", plan.to_json(), arrays, pending.index)
        pending.out.update(out)
        pending.deferred = None
        pending.fetch = self._fetch(plan, pending.out)

    @staticmethod
    def _fetch(plan: StepPlan, out: dict) -> list[str]:
        """The keys of a step's outputs its read takes to the host."""
        fetch = [k for k in out if k not in (NEXT_TOKENS, "logits", "hidden")]
        if plan.want_last_logits:
            fetch.append("logits")
        return fetch

    def _dispatch(self, plan: dict, arrays: list[np.ndarray], after: int | None) -> dict:
        """Run a step's programs (`plan`: a StepPlan's JSON) on its packed host inputs; with `after`,
        the number of the dispatch whose samples its negative token ids read, which must be this
        process's last sampling dispatch."""
        if after is not None and after != self._prev_index:
            raise RuntimeError(f"the step reads the samples of dispatch {after}; this process's last sampling "
                               f"dispatch is {self._prev_index}")  # fmt: skip
        out = self._run(StepPlan.from_json(plan), arrays)
        self.num_dispatches += 1
        if NEXT_TOKENS in out:
            self._prev, self._prev_index = out[NEXT_TOKENS], self.num_dispatches
        return out

    def _sample(self, plan: dict, arrays: list[np.ndarray], index: int) -> dict:
        """The deferred sampler of dispatch `index` (which must be this process's last) on its
        logits, kept since; its samples become the ones the next step may read."""
        if index != self.num_dispatches or self._deferred_logits is None:
            raise RuntimeError(f"the deferred sampler of dispatch {index} runs after dispatch {self.num_dispatches}")
        logits, self._deferred_logits = self._deferred_logits, None
        out = self._sampler(StepPlan.from_json(plan), logits, arrays[0])
        self._prev, self._prev_index = out[NEXT_TOKENS], index
        return out

    def _run(self, plan: StepPlan, arrays: list[np.ndarray]) -> dict:
        """Dispatch a step's programs on its host inputs; returns the device outputs."""
        flat, token_ids = self._replicate(arrays[0]), self._replicate(arrays[1])
        bank = self.adapters.bank_arrays() if plan.forward.adapters else None
        exe = self.programs.get(plan.forward)
        out, self.kv_cache, self.token_pages = exe(self.params, self.kv_cache, self.token_pages, flat, token_ids,
                                                   self._prev, bank)  # fmt: skip
        if plan.sampler is None:
            return out
        if plan.deferred:  # ModelRunner.sample runs the sampler later
            self._deferred_logits = out["logits"]
            return {"logits": out["logits"]}
        result = self._sampler(plan, out["logits"], arrays[2])
        if plan.head is not None:
            result.update(self.programs.get(plan.head)(self.params, out["hidden"], self._replicate(arrays[3])))
        return result

    def _sampler(self, plan: StepPlan, logits: jax.Array, packed: np.ndarray) -> dict:
        """The step's sampler program on its logits ({samples..., "logits"})."""
        pages = self.token_pages if plan.sampler.flavor == "penalties" else None
        sampled = self.programs.get(plan.sampler)(logits, self._replicate(packed), self.bias_table, pages)
        return {**sampled, "logits": logits}

    def resample(self, logits: np.ndarray, requests: list[StepRequest]) -> dict[str, np.ndarray]:
        """Sample rows of host logits ([n, V], edited by logits processors) with their requests'
        parameters: the sampler program of their flavor, on the devices."""
        n = len(requests)
        shape = self.buckets.sampler_shape(n, sampling_flavor(requests), max(len(r.block_table) for r in requests),
                                           any(r.token_bitmask is not None for r in requests))  # fmt: skip
        spec = programs_lib.logits_spec(self, shape.num_seqs)
        padded = np.zeros(spec.shape, np.float32)  # [B, V] (V' under TP: padding columns -inf)
        padded[:n, : logits.shape[1]] = logits
        padded[:, self.cfg.vocab_size :] = -np.inf
        packed = resample_inputs(shape, requests, self.config.page_size, self.bitmask_words)
        with self._lock:
            pages = self.token_pages if shape.flavor == "penalties" else None
            out = self.programs.get(shape)(sharding_lib.place(padded, spec.sharding), self._replicate(packed),
                                           self.bias_table, pages)  # fmt: skip
        return {k: v[:n] for k, v in jax.device_get(out).items() if k != NEXT_TOKENS}

    def _device_token_ids(self, r: StepRequest) -> list[int]:
        """A request's tokens as the device reads them: virtual token i of a prompt adapter (host id
        vocab_size + i) becomes the id of its row in the slot's part of the prompt table."""
        vocab = self.cfg.vocab_size
        if self.adapters is None or r.token_ids[0] < vocab:  # virtual tokens lead a sequence
            return r.token_ids
        if not r.prompt_adapter_slot:
            raise RuntimeError(f"virtual token {r.token_ids[0]} in a step of a sequence without a prompt adapter slot")
        return [self.adapters.virtual_token_id(r.prompt_adapter_slot, t - vocab) if t >= vocab else t
                for t in r.token_ids]  # fmt: skip

    # ---- KV pages in and out (disaggregated serving, jaxllm/engine/kv_transfer.py) -----------------
    def _page_ids(self, pages: list[int]) -> np.ndarray:
        """Page ids padded with the null page to a power of two (few compiled shapes)."""
        ids = np.zeros(1 << max(0, len(pages) - 1).bit_length(), np.int32)
        ids[: len(pages)] = pages
        return ids

    def copy_page(self, source: int, target: int) -> None:
        """Copy page `source` of every layer, and its token page, into page `target` (partial
        reuse, engine/block_manager.py): queued, and enqueued on the devices in batches of
        COPY_BATCH pairs before the next dispatch, gather or scatter, so that an admission step's
        copies cost a few dispatches, not a gather and a scatter of every layer per sequence."""
        self._copies.append((source, target))

    def prepare_copies(self) -> None:
        """Compile the page-copy program now: page 0 (the padding page, never read) onto itself."""
        self.copy_page(0, 0)
        with self._lock:
            self._flush_copies()

    def _flush_copies(self) -> None:
        """Enqueue the queued page copies (the caller holds the lock). Padding pairs copy the null
        page onto itself."""
        while self._copies:
            batch, self._copies = self._copies[:COPY_BATCH], self._copies[COPY_BATCH:]
            pairs = np.zeros((2, COPY_BATCH), np.int32)
            pairs[:, : len(batch)] = np.array(batch, np.int32).T
            self.kv_cache, self.token_pages = self._copy(self.kv_cache, self.token_pages, self._replicate(pairs))

    def gather_pages(self, pages: list[int]) -> list[jax.Array]:
        """Copies of the pages `pages` of every layer: [k0, v0, k1, v1, ...], each
        [num_kv_heads, len(pages), page_size, head_dim] on this engine's devices."""
        if self._replica.multi_process:
            raise RuntimeError("moving KV pages is not supported in a multi-process LLM")
        with self._lock:
            self._flush_copies()
            out = self._gather(self.kv_cache, self._replicate(self._page_ids(pages)))
        return [as_kv_values(a[:, : len(pages)]) for a in out]

    def scatter_pages(self, pages: list[int], values: list, token_ids: list[int] | None = None) -> None:
        """Write `values` ([k0, v0, ...], each [num_kv_heads, len(pages), page_size, head_dim], numpy
        or arrays on any device) into the pages `pages` of every layer, and `token_ids` (the tokens
        at their positions, in order) into the same token pages."""
        if self._replica.multi_process:
            raise RuntimeError("moving KV pages is not supported in a multi-process LLM")
        ids = self._page_ids(pages)
        pad = len(ids) - len(pages)
        sharding = self.kv_cache[0][0].sharding  # every layer's K and V pages: split by KV head under TP
        placed = []
        for v in values:
            v = to_kv_dtype(jax.device_put(v, sharding), self.kv_storage_dtype)
            placed.append(jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else v)
        rows = np.zeros((len(ids), self.config.page_size), np.int32)
        if token_ids is not None:
            flat = rows.reshape(-1)
            flat[: len(token_ids)] = token_ids
        with self._lock:
            self._flush_copies()
            self.kv_cache, self.token_pages = self._scatter(self.kv_cache, self.token_pages, self._replicate(ids),
                                                            placed, self._replicate(rows))  # fmt: skip


@dataclasses.dataclass
class PendingStep:
    """A dispatched step: its outputs on the devices until `result()` reads them."""

    out: dict  # device arrays: [B, ...], or [steps, B, ...] for a multi-step decode
    num_requests: int
    decode_steps: int
    index: int = 0  # its number among the runner's dispatches (ModelRunner.num_dispatches), from 1
    fetch: list[str] | None = None  # the keys result() reads (None: all but NEXT_TOKENS)
    vocab_size: int = 0  # logits are cut to it (tensor parallelism pads the vocabulary)
    shape: ForwardShape | None = None  # its forward program's bucket
    num_tokens: int = 0  # the forward's tokens for the requests (per decode step): the rest is padding
    deferred: tuple | None = None  # (StepPlan, host batch) while its sampler waits (ModelRunner.sample)

    def result(self) -> dict[str, np.ndarray]:
        """Host arrays with a row per request (waits for the step)."""
        n = self.num_requests
        keys = self.fetch if self.fetch is not None else [k for k in self.out if k != NEXT_TOKENS]
        host = jax.device_get({k: self.out[k] for k in keys})
        if self.decode_steps > 1:
            return {k: v[:, :n] for k, v in host.items()}
        result = {}
        for k, v in host.items():
            if k.startswith(("prompt_", "all_")):
                result[k] = v  # per packed token; the caller slices by its offsets
            elif k == "logits":
                result["last_logits"] = v[:n, : self.vocab_size or None]
            else:
                result[k] = v[:n]
        return result


def _gather_pages(kv_cache, pages):
    """pages: [n] -> [k0, v0, k1, v1, ...], each [K, n, S, d]."""
    return [x[:, pages] for layer in kv_cache for x in layer]


# Page copies per program (ModelRunner.copy_page): one compiled shape, made at start-up.
COPY_BATCH = 32


def _copy_pages(kv_cache, token_pages, pairs):
    """pairs: [2, n] (sources, targets): copy each source page of every layer, and its token page,
    into its target page. Every source is read before any target is written."""
    sources, targets = pairs[0], pairs[1]
    kv_cache = [(k.at[:, targets].set(k[:, sources]), v.at[:, targets].set(v[:, sources])) for k, v in kv_cache]
    return kv_cache, token_pages.at[targets].set(token_pages[sources])


def _scatter_pages(kv_cache, token_pages, pages, values, token_rows):
    """Write values ([k0, v0, ...], each [K, n, S, d]) into pages [n] of every layer, and token_rows
    [n, S] into the same token pages."""
    kv_cache = [(k.at[:, pages].set(values[2 * i]), v.at[:, pages].set(values[2 * i + 1]))
                for i, (k, v) in enumerate(kv_cache)]  # fmt: skip
    return kv_cache, token_pages.at[pages].set(token_rows)
