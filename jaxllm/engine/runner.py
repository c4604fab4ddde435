"""ModelRunner: owns the weights, the KV cache and the token pages on the device, and runs the programs.

The scheduler hands it a list of (sequence, token count); it packs them into a `BatchMetadata`
padded to a bucket (engine/buckets.py) and dispatches, without waiting:
  a forward program (models/step.py:forward_step; KV cache and token pages donated), then
  a sampler program on its last-token logits, in the batch's sampling flavor, and
  a head program on its hidden states when a sequence wants prompt log-probabilities or context
  logits;
or one multi-step decode program (K decodes, sampling inside). `PendingStep.result()` reads the
host arrays. Every program is compiled (or loaded from the persistent cache) before the engine
serves (`precompile`, engine/executables.py), so a step never waits for a compilation.

A program's host inputs travel as one uint32 buffer per device, split inside the program with a
static layout derived from the program's key (`host_inputs`): transferred one by one, ~15 small
arrays took about 1 ms of every TP=2 dispatch on 2 x H200. The input token ids travel apart, so a
follow-on dispatch (the overlap scheduler) can take them from the last dispatch's samples on the
device.

Adapters (an engine made with LoRA or prompt adapters enabled): a step in which some token has a
LoRA adapter or is a prompt adapter's virtual token runs the `adapters` twin of its forward
program, which also reads the adapter bank and a per-token LoRA slot (jaxllm/adapters/bank.py,
jaxllm/layers/adapters.py); every other step runs the plain one, at the plain cost.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import sharding as sharding_lib
from jaxllm.adapters.bank import AdapterBank
from jaxllm.config import ModelConfig
from jaxllm.engine.buckets import (CPU_MULTI_STEP_FLAVORS, CPU_MULTI_STEP_MAX_ROWS, GPU_MIN_DECODE_ROWS,
                                   MULTI_STEP_FLAVORS, MULTI_STEP_FULL_MAX_ROWS, NO_TRITON_GEMM_OPTIONS,
                                   ONE_GRAPH_MAX_ROWS, ONE_GRAPH_OPTIONS, TRITON_GEMM_MAX_ROWS, Buckets,
                                   ForwardShape, HeadShape, SamplerShape)  # fmt: skip
from jaxllm.engine.executables import CompileCache, Programs
from jaxllm.layers import sampling as sampling_lib
from jaxllm.layers.adapters import AdapterInputs
from jaxllm.models.batch import BatchMetadata, build_batch
from jaxllm.models.step import NEXT_TOKENS, forward_step, head_step, multi_step, sample_step
from jaxllm.models.transformer import init_kv_cache
from jaxllm.sampling_params import MAX_LOGPROBS

logger = logging.getLogger(__name__)

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


@dataclasses.dataclass
class StepRequest:
    """One scheduled sequence, as the runner needs it."""

    token_ids: list[int]  # tokens computed this step
    start: int  # position of the first of them
    block_table: list[int]
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    counter: int = 0
    num_logprobs: int = 0
    bias_slot: int = 0  # the device row of its bias (embedding bias and banned single tokens; 0: none)
    banned_tokens: list[int] | None = None  # tokens banned this step only (at most sampling.BAN_WIDTH)
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    prompt_len: int = 0  # KV positions of the prompt (virtual tokens included): the penalties' split
    first_position: int = 0  # the first position holding a real token (after virtual ones)
    prompt_logprobs_next: list[int] | None = None  # next tokens of this chunk, for prompt_logprobs
    want_all_logits: bool = False  # return logits of every token of this chunk (context logits)
    want_last_logits: bool = False  # return the last token's logits (generation logits, processors)
    lora_slot: int = 0  # device slot of the sequence's LoRA adapter (0: none)
    prompt_adapter_slot: int = 0  # device slot of its prompt adapter (0: none); maps its virtual tokens

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def needs_full(self) -> bool:
        """Whether sampling this row needs more than the "plain" flavor."""
        truncates = self.temperature > 0 and (self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0)
        return truncates or self.num_logprobs > 0 or self.bias_slot != 0 or bool(self.banned_tokens)


def sampling_flavor(requests: list[StepRequest]) -> str:
    """The cheapest sampling flavor (engine/buckets.py) that serves every row."""
    if any(r.penalized for r in requests):
        return "penalties"
    return "full" if any(r.needs_full for r in requests) else "plain"


class ModelRunner:
    def __init__(self, cfg: ModelConfig, params: dict, config: RunnerConfig, mesh=None, channel=None,
                 adapters: AdapterBank | None = None, cache_dir=None):  # fmt: skip
        self.cfg = cfg
        self.params = params
        self.config = config
        self.dtype = params["embed"].dtype
        self.kv_dtype = config.kv_dtype or self.dtype
        self.mesh = mesh  # a tensor-parallel mesh (jaxllm/sharding.py), or None for one device
        self.channel = channel  # multi-process runs: the leader broadcasts each step (jaxllm/distributed.py)
        self.num_dispatches = 0  # steps dispatched (a follower counts the leader's), numbering PendingStep
        self._last_out: dict | None = None  # a follower's: the outputs of its last dispatch, a multi-step decode
        self.adapters = adapters  # the LoRA bank / prompt table, or None (no adapter programs)
        on_gpu = self._devices()[0].platform == "gpu"
        self.buckets = Buckets(
            max_num_tokens=config.max_num_tokens, max_batch_size=config.max_batch_size,
            max_seq_len=config.max_seq_len, page_size=config.page_size, backend=config.backend,
            min_decode_rows=config.min_decode_rows or (GPU_MIN_DECODE_ROWS if on_gpu else 1),
            decode_steps=config.decode_steps,
            multi_step_max_rows=config.multi_step_max_rows or (None if on_gpu else CPU_MULTI_STEP_MAX_ROWS),
            multi_step_flavors=MULTI_STEP_FLAVORS if on_gpu else CPU_MULTI_STEP_FLAVORS,
            multi_step_full_max_rows=MULTI_STEP_FULL_MAX_ROWS if on_gpu else None,
            adapters=adapters is not None,
        )  # fmt: skip
        # Abstract until `allocate()`: the programs need only their shapes, and on a GPU compiling them
        # (autotuning) needs the memory the cache would take.
        self.kv_cache, self.token_pages = self._new_state(abstract=True)
        self.bias_table = self._replicate(np.zeros((BIAS_SLOTS + 1, cfg.vocab_size), np.float32))
        self._write_bias_row = jax.jit(lambda table, row, slot: table.at[slot].set(row), donate_argnums=(0,))
        self._lock = threading.Lock()
        self._cache_dir = cache_dir
        self.reset_programs()
        self._gather = jax.jit(_gather_pages)
        self._scatter = jax.jit(_scatter_pages, donate_argnums=(0, 1))

    def reset_programs(self) -> None:
        """Drop every program (after a change of `config` or `buckets`: their cache key changes too)."""
        cache = CompileCache(self._cache_dir) if self._cache_dir is not None else None
        self.programs = Programs(self._lower, self._trees, self.compiler_options, self._devices(), self._description(),
                                 cache)  # fmt: skip

    # ---- buckets (engine/buckets.py) -------------------------------------------------------------
    @property
    def seq_buckets(self) -> list[int]:
        return self.buckets.seq_buckets

    @property
    def token_buckets(self) -> list[int]:
        return self.buckets.token_buckets

    @property
    def page_buckets(self) -> list[int]:
        return self.buckets.page_buckets

    def bucket_shapes(self) -> list:
        """Every program this engine can ask for."""
        return self.buckets.all_shapes()

    def multi_step_serves(self, requests: list[StepRequest]) -> bool:
        """Whether a multi-step decode program serves these requests (their flavor is compiled)."""
        rows = self.buckets.multi_step_rows(sampling_flavor(requests))
        return bool(rows) and len(requests) <= rows[-1]

    @property
    def executables(self) -> dict:
        return self.programs.executables

    @property
    def num_compilations(self) -> int:
        """Programs this engine compiled (not those loaded from a cache or a saved engine)."""
        return self.programs.num_compiled

    @property
    def compile_seconds(self) -> float:
        return self.programs.compile_seconds

    # ---- device state --------------------------------------------------------------------------
    def _devices(self) -> list:
        """The devices the programs run on, in the order the weights' sharding lists them."""
        return list(self.params["embed"].sharding._device_assignment)

    def _new_state(self, abstract: bool = False):
        """A zeroed KV cache and token pages ([num_pages, page_size] int32), or their
        ShapeDtypeStructs with `abstract`."""
        num_pages, page_size = self.config.num_pages, self.config.page_size

        def make():
            return (init_kv_cache(self.cfg, num_pages, page_size, self.kv_dtype),
                    jnp.zeros((num_pages, page_size), jnp.int32))  # fmt: skip

        if self.mesh is None:
            device = jax.sharding.SingleDeviceSharding(self._devices()[0])
            shardings = jax.tree.map(lambda _: device, jax.eval_shape(make))
        else:  # created in place, each device holding only its KV heads
            pages, replicated = sharding_lib.kv_cache_sharding(self.mesh), sharding_lib.replicated(self.mesh)
            shardings = ([(pages, pages)] * self.cfg.num_layers, replicated)
        if abstract:
            return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                jax.eval_shape(make), shardings)  # fmt: skip
        return jax.jit(make, out_shardings=shardings)()

    def allocate(self) -> None:
        """Put the KV cache and token pages on the devices (once the programs are made)."""
        if isinstance(self.token_pages, jax.ShapeDtypeStruct):
            self.kv_cache, self.token_pages = self._new_state()

    def _input_sharding(self):
        """Where a step's host inputs live: replicated over the mesh, or on the one device."""
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(self._devices()[0])
        return sharding_lib.replicated(self.mesh)

    def _replicate(self, array: np.ndarray) -> jax.Array:
        """A host array on the step's devices (every process passes the same values)."""
        if self.channel is not None:
            return sharding_lib.place_global(np.asarray(array), self._input_sharding())
        return jax.device_put(array, self._input_sharding())

    def reset_cache(self) -> None:
        """Drop and rebuild the KV cache (after a failed step left the donated buffers invalid)."""
        if self.channel is not None:
            self.channel.send({"kind": "reset"})
        self.kv_cache, self.token_pages = self._new_state()

    def close(self) -> None:
        """Leader of a multi-process run: release the followers."""
        if self.channel is not None:
            self.channel.send({"kind": "stop"})
            self.channel = None

    def follow(self) -> None:
        """Follower of a multi-process run: execute the leader's steps until it stops."""
        while True:
            header, arrays = self.channel.recv()
            kind = header["kind"]
            if kind == "stop":
                return
            if kind == "reset":
                self.kv_cache, self.token_pages = self._new_state()
            elif kind == "adapter":
                self._write_adapter(header["adapter"], header["slot"], arrays)
            elif kind == "bias":
                self.bias_table = self._write_bias_row(self.bias_table, self._replicate(arrays[0]),
                                                       np.int32(header["slot"]))  # fmt: skip
            elif kind == "precompile":
                from jaxllm.engine.buckets import shape_from_json

                self.programs.prepare([shape_from_json(s) for s in header["shapes"]], progress=False)
            elif kind == "step":
                self._follow_step(header, arrays)
            else:
                raise RuntimeError(f"unexpected message from the leader: {kind!r}")

    def _follow_step(self, header: dict, arrays: list) -> None:
        after = header.get("after")
        tokens = None
        if after is not None:  # a follow-on: its input tokens are the last dispatch's samples on the devices
            if self._last_out is None or after != self.num_dispatches:
                kind = "not a multi-step decode" if self._last_out is None else "a multi-step decode"
                raise RuntimeError(f"the leader's step follows multi-step decode {after}; this process's last "
                                   f"dispatch is {self.num_dispatches}, {kind}")  # fmt: skip
            tokens = self._last_out[NEXT_TOKENS]
        plan = _StepPlan.from_json(header["plan"])
        out = self._run(plan, arrays, tokens)
        self.num_dispatches += 1
        self._last_out = out if plan.forward.decode_steps > 1 else None

    # ---- adapter slots and bias rows -------------------------------------------------------------
    def write_lora(self, slot: int, adapter) -> None:
        """Put a LoRA adapter (adapters.lora.LoraAdapter) into device slot `slot` (every process)."""
        values = self.adapters.lora_values(adapter)
        if self.channel is not None:
            self.channel.send({"kind": "adapter", "adapter": "lora", "slot": slot}, jax.tree.leaves(values))
        self.adapters.write_lora(slot, values)

    def write_prompt_adapter(self, slot: int, adapter) -> None:
        """Put a prompt adapter (adapters.prompt.PromptAdapter) into device slot `slot` (every process)."""
        rows = self.adapters.prompt_values(adapter)
        if self.channel is not None:
            self.channel.send({"kind": "adapter", "adapter": "prompt", "slot": slot}, [rows])
        self.adapters.write_prompt_adapter(slot, rows)

    def _write_adapter(self, kind: str, slot: int, arrays: list) -> None:
        """Follower side of write_lora / write_prompt_adapter."""
        if kind == "lora":
            self.adapters.write_lora(slot, jax.tree.unflatten(jax.tree.structure(self.adapters.lora), arrays))
        else:
            self.adapters.write_prompt_adapter(slot, arrays[0])

    def write_bias(self, slot: int, row) -> None:
        """Put a bias row ([V] float32: embedding bias, -inf at banned tokens) into slot 1..BIAS_SLOTS."""
        row = np.asarray(row, np.float32).reshape(self.cfg.vocab_size)
        if self.channel is not None:
            self.channel.send({"kind": "bias", "slot": slot}, [row])
        with self._lock:
            self.bias_table = self._write_bias_row(self.bias_table, self._replicate(row), np.int32(slot))

    def warm_up(self) -> None:
        """Compile the small writers a request can need (bias rows, adapter slots) by writing what
        their slots already hold (zeros)."""
        zeros = np.zeros(self.cfg.vocab_size, np.float32)
        self.bias_table = self._write_bias_row(self.bias_table, self._replicate(zeros), np.int32(0))
        if self.adapters is not None:
            self.adapters.warm_up()

    # ---- programs ----------------------------------------------------------------------------------
    def precompile(self, shapes: list | None = None, progress: bool = True, threads: int | None = None) -> None:
        """Make `shapes` (default: every program this engine can ask for) before serving: from the
        persistent cache, or compiled, several at once (engine/executables.py)."""
        todo = [s for s in dict.fromkeys(shapes or self.bucket_shapes()) if s not in self.programs]
        if self.channel is not None and todo:  # the followers make the same programs meanwhile
            self.channel.send({"kind": "precompile", "shapes": [s.to_json() for s in todo]})
        self.programs.prepare(todo, progress=progress, threads=threads)

    def executable(self, shape):
        return self.programs.get(shape)

    def save_executables(self, directory) -> int:
        return self.programs.save(directory)

    def load_executables(self, directory) -> int:
        return self.programs.load_saved(directory)

    def compiler_options(self, shape) -> dict | None:
        """XLA options the program of `shape` is compiled with (None: XLA's defaults). On GPUs:
        NO_TRITON_GEMM_OPTIONS unless it is a forward program of at most TRITON_GEMM_MAX_ROWS tokens;
        ONE_GRAPH_OPTIONS for a multi-step decode of at most ONE_GRAPH_MAX_ROWS rows where
        `one_graph_decode` says (None: several GPUs)."""
        options = {}
        forward = isinstance(shape, ForwardShape)
        if self._devices()[0].platform == "gpu" and not (forward and shape.num_tokens <= TRITON_GEMM_MAX_ROWS):
            options.update(NO_TRITON_GEMM_OPTIONS)
        if forward and self._one_graph_decode() and shape.decode_steps > 1 and shape.num_seqs <= ONE_GRAPH_MAX_ROWS:
            options.update(ONE_GRAPH_OPTIONS)
        return options or None

    def _one_graph_decode(self) -> bool:
        if self.config.one_graph_decode is not None:
            return self.config.one_graph_decode
        devices = self._devices()
        return len(devices) > 1 and devices[0].platform == "gpu"

    @property
    def _shard_logits(self) -> bool:
        return self.mesh is not None and self.config.vocab_parallel_sampling

    def _description(self) -> dict:
        """What this engine's programs depend on (with executables.environment_description)."""
        devices = self._devices()

        def describe(tree):
            return jax.tree.map(lambda a: [list(a.shape), jnp.dtype(a.dtype).name, str(a.sharding)], tree)

        bank = self.adapters.arrays() if self.adapters is not None else None
        return {"devices": [[d.platform, d.device_kind, d.id] for d in devices],
                "model": dataclasses.asdict(self.cfg), "config": dataclasses.asdict(self.config),
                "buckets": dataclasses.asdict(self.buckets), "kv_dtype": jnp.dtype(self.kv_dtype).name,
                "params": describe(self.params), "kv_cache": describe(self.kv_cache[0]),
                "token_pages": describe(self.token_pages), "bias_table": describe(self.bias_table),
                "adapters": describe(bank), "mesh": None if self.mesh is None else dict(self.mesh.shape),
                "one_graph": self._one_graph_decode(), "max_logprobs": MAX_LOGPROBS,
                "ban_width": sampling_lib.BAN_WIDTH}  # fmt: skip

    def host_inputs(self, shape):
        """ShapeDtypeStructs of the host inputs of `shape`'s program (what `pack_host_inputs` packs):
        forward programs (batch[, sampling of a multi-step decode][, per-token LoRA slots]); samplers
        (sampling,); heads (next_tokens,)."""
        i32 = jnp.int32

        def sds(dims, dtype):
            return jax.ShapeDtypeStruct(dims, dtype)

        if isinstance(shape, HeadShape):
            return (sds((shape.num_tokens,), i32),)
        if isinstance(shape, SamplerShape):
            return (_sampling_spec(shape.num_seqs, shape.flavor, shape.pages_per_seq, sds),)
        T, B, P = shape.num_tokens, shape.num_seqs, shape.pages_per_seq
        batch = BatchMetadata(sds((T,), i32), sds((T,), i32), sds((T,), i32), sds((T,), i32), sds((B + 1,), i32),
                              sds((B,), i32), sds((B, P), i32), sds((B,), i32), shape.max_query_len)  # fmt: skip
        host: tuple = (batch,)
        if shape.decode_steps > 1:
            host += (_sampling_spec(B, shape.sampling, 0, sds),)
        if shape.adapters and self._uses_lora:
            host += (sds((T,), i32),)
        return host

    @property
    def _uses_lora(self) -> bool:
        return self.adapters is not None and self.adapters.lora is not None

    def _program(self, shape):
        """The jitted function of `shape` (static: its host-input layout and switches)."""
        layout = host_layout(self.host_inputs(shape))
        cfg, mesh, backend = self.cfg, self.mesh, self.config.backend
        if isinstance(shape, HeadShape):
            return jax.jit(functools.partial(_head_program, layout=layout, cfg=cfg, mesh=mesh,
                                             all_logits=shape.all_logits))  # fmt: skip
        if isinstance(shape, SamplerShape):
            return jax.jit(functools.partial(_sampler_program, layout=layout, vocab_size=cfg.vocab_size, mesh=mesh,
                                             vocab_split=self._shard_logits))  # fmt: skip
        return jax.jit(functools.partial(_forward_program, layout=layout, cfg=cfg, backend=backend, mesh=mesh,
                                         shard_logits=self._shard_logits, steps=shape.decode_steps,
                                         lora=shape.adapters and self._uses_lora),
                       donate_argnums=(1, 2))  # fmt: skip

    def _abstract_args(self, shape) -> tuple:
        """The arguments `shape`'s program is lowered with (device state as it is, the rest abstract)."""
        sharding = self._input_sharding()
        _, size = host_layout(self.host_inputs(shape), with_size=True)
        flat = jax.ShapeDtypeStruct((size,), jnp.uint32, sharding=sharding)
        if isinstance(shape, HeadShape):
            hidden = jax.ShapeDtypeStruct((shape.num_tokens, self.cfg.hidden_size), self.dtype, sharding=sharding)
            return (self.params, hidden, flat)
        if isinstance(shape, SamplerShape):
            return (self._logits_spec(shape.num_seqs), flat, self.bias_table,
                    self.token_pages if shape.flavor == "penalties" else None)  # fmt: skip
        tokens = jax.ShapeDtypeStruct((shape.num_tokens,), jnp.int32, sharding=sharding)
        bank = self.adapters.bank_arrays() if shape.adapters else None
        return (self.params, self.kv_cache, self.token_pages, flat, tokens, bank)

    def _logits_spec(self, rows: int) -> jax.ShapeDtypeStruct:
        """A forward program's last-token logits: [B, V'] split over the vocabulary under TP, else [B, V]."""
        if self._shard_logits:
            spec = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, sharding_lib.TP_AXIS))
            return jax.ShapeDtypeStruct((rows, self.cfg.param_vocab_size), jnp.float32, sharding=spec)
        return jax.ShapeDtypeStruct((rows, self.cfg.vocab_size), jnp.float32, sharding=self._input_sharding())

    def _lower(self, shape):
        return self._program(shape).lower(*self._abstract_args(shape))

    def _trees(self, shape, out_keys: list[str]):
        """(in_tree, out_tree) of `shape`'s program, for deserializing it (nothing is traced)."""
        args = self._abstract_args(shape)
        in_tree = jax.tree.structure((args, {}))
        outs = {k: 0 for k in out_keys}
        if isinstance(shape, ForwardShape):
            out_tree = jax.tree.structure((outs, self.kv_cache, self.token_pages))
        else:
            out_tree = jax.tree.structure(outs)
        return in_tree, out_tree

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

        after: a multi-step decode still running whose requests these are, in the same order, one
        token each: their input tokens are its last step's samples, read on the device (the host
        does not know them yet; `requests[i].token_ids` only says there is one). The overlap
        scheduler (engine.py) starts the next dispatch this way before reading the current one.
        """
        if after is not None and (after.decode_steps < 2 or after.num_requests != len(requests)
                                  or any(len(r.token_ids) != 1 for r in requests)):  # fmt: skip
            raise ValueError("a step can follow only a multi-step decode of the same requests, one token each")
        plan, arrays = self._plan(requests, decode_steps)
        with self._lock:
            if self.channel is not None:  # the followers replay it: the same inputs, the same follow-on
                self.channel.send({"kind": "step", "plan": plan.to_json(), "after": after and after.index}, arrays)
            out = self._run(plan, arrays, after.out[NEXT_TOKENS] if after is not None else None)
            self.num_dispatches += 1
        fetch = [k for k in out if k not in (NEXT_TOKENS, "logits", "hidden")]
        if plan.want_last_logits:
            fetch.append("logits")
        return PendingStep(out, len(requests), decode_steps, self.num_dispatches, fetch, self.cfg.vocab_size)

    def _plan(self, requests: list[StepRequest], decode_steps: int) -> tuple[_StepPlan, list[np.ndarray]]:
        """The programs of a step and their packed host inputs."""
        uses_adapters = self.adapters is not None and any(
            r.lora_slot or (r.prompt_adapter_slot and r.token_ids[0] >= self.cfg.vocab_size) for r in requests
        )
        flavor = sampling_flavor(requests)
        if decode_steps > 1:
            if flavor == "penalties" or any(r.bias_slot or r.banned_tokens or r.want_last_logits
                                            or r.prompt_logprobs_next is not None or r.want_all_logits
                                            for r in requests):  # fmt: skip
                raise ValueError("decode_steps > 1 serves no penalties, bias, bans or logits")
        forward = self.buckets.forward_shape([len(r.token_ids) for r in requests],
                                             max(len(r.block_table) for r in requests), uses_adapters, decode_steps,
                                             flavor if decode_steps > 1 else "")  # fmt: skip
        T, B, P = forward.num_tokens, forward.num_seqs, forward.pages_per_seq
        token_ids = [self._device_token_ids(r) for r in requests] if self.adapters is not None else None
        batch = build_batch(token_ids or [r.token_ids for r in requests], [r.start for r in requests],
                            [r.block_table for r in requests], self.config.page_size, num_tokens=T, num_seqs=B,
                            pages_per_seq=P, max_query_len=forward.max_query_len)  # fmt: skip
        host: tuple = (batch,)
        sampler = head = None
        if decode_steps > 1:
            host += (self._sampling_batch(requests, B, forward.sampling),)
        if forward.adapters and self._uses_lora:
            lora_slots = np.zeros(T, np.int32)  # [T]: each token's LoRA slot, 0 for padding
            offset = 0
            for r in requests:
                lora_slots[offset : offset + len(r.token_ids)] = r.lora_slot
                offset += len(r.token_ids)
            host += (lora_slots,)
        arrays = [pack_host_inputs(host), batch.token_ids]
        if decode_steps == 1:
            sampler = self.buckets.sampler_shape(B, flavor, P)
            sampling = self._sampling_batch(requests, sampler.num_seqs, flavor, batch, sampler.pages_per_seq)
            arrays.append(pack_host_inputs((sampling,)))
            want_prompt = any(r.prompt_logprobs_next is not None for r in requests)
            want_all = any(r.want_all_logits for r in requests)
            if want_prompt or want_all:
                head = HeadShape(T, want_all)
                next_tokens = np.zeros(T, np.int32)
                offset = 0
                for r in requests:
                    if r.prompt_logprobs_next is not None:
                        next_tokens[offset : offset + len(r.prompt_logprobs_next)] = r.prompt_logprobs_next
                    offset += len(r.token_ids)
                arrays.append(pack_host_inputs((next_tokens,)))
        plan = _StepPlan(forward, sampler, head, any(r.want_last_logits for r in requests))
        return plan, arrays

    def _run(self, plan: _StepPlan, arrays: list[np.ndarray], tokens: jax.Array | None) -> dict:
        """Dispatch a step's programs on its host inputs (the input tokens from `tokens` when given,
        a device array); returns the device outputs."""
        flat, token_ids = self._replicate(arrays[0]), tokens
        if token_ids is None:
            token_ids = self._replicate(arrays[1])
        elif self.mesh is not None:
            token_ids = jax.device_put(token_ids, self._input_sharding())
        bank = self.adapters.bank_arrays() if plan.forward.adapters else None
        exe = self.programs.get(plan.forward)
        out, self.kv_cache, self.token_pages = exe(self.params, self.kv_cache, self.token_pages, flat, token_ids, bank)
        if plan.sampler is None:
            return out
        pages = self.token_pages if plan.sampler.flavor == "penalties" else None
        sampled = self.programs.get(plan.sampler)(out["logits"], self._replicate(arrays[2]), self.bias_table, pages)
        result = {**sampled, "logits": out["logits"]}
        if plan.head is not None:
            result.update(self.programs.get(plan.head)(self.params, out["hidden"], self._replicate(arrays[3])))
        return result

    def resample(self, logits: np.ndarray, requests: list[StepRequest]) -> dict[str, np.ndarray]:
        """Sample rows of host logits ([n, V], edited by logits processors) with their requests'
        parameters: the sampler program of their flavor, on the devices."""
        n = len(requests)
        flavor = sampling_flavor(requests)
        pages = max(len(r.block_table) for r in requests)
        shape = self.buckets.sampler_shape(n, flavor, pages)
        spec = self._logits_spec(shape.num_seqs)
        padded = np.zeros(spec.shape, np.float32)
        padded[:n, : logits.shape[1]] = logits
        padded[:, self.cfg.vocab_size :] = -np.inf
        batch = None
        if flavor == "penalties":
            batch = build_batch([r.token_ids for r in requests], [r.start for r in requests],
                                [r.block_table for r in requests], self.config.page_size,
                                pages_per_seq=shape.pages_per_seq)  # fmt: skip
        sampling = self._sampling_batch(requests, shape.num_seqs, flavor, batch, shape.pages_per_seq)
        with self._lock:
            placed = jax.device_put(padded, spec.sharding) if self.channel is None else sharding_lib.place_global(
                padded, spec.sharding)  # fmt: skip
            pages_arg = self.token_pages if flavor == "penalties" else None
            out = self.programs.get(shape)(placed, self._replicate(pack_host_inputs((sampling,))), self.bias_table,
                                           pages_arg)  # fmt: skip
        return {k: v[:n] for k, v in jax.device_get(out).items()}

    def _sampling_batch(self, requests: list[StepRequest], B: int, flavor: str, batch: BatchMetadata | None = None,
                        pages: int = 0) -> sampling_lib.SamplingBatch:  # fmt: skip
        """The host SamplingBatch of `requests` in `flavor`, padded to B rows (`batch`: the step's, for
        the block tables and lengths the "penalties" flavor reads, its tables padded to `pages`)."""
        n = len(requests)

        def col(name, dtype, fill):
            arr = np.full(B, fill, dtype)
            arr[:n] = [getattr(r, name) for r in requests]
            return arr

        seeds = np.zeros((B, 2), np.uint32)
        for i, r in enumerate(requests):
            seeds[i] = (r.seed >> 32) & 0xFFFFFFFF, r.seed & 0xFFFFFFFF
        common = dict(temperature=col("temperature", np.float32, 0.0), seeds=seeds,
                      counters=col("counter", np.int32, 0))
        if flavor == "plain":
            return sampling_lib.SamplingBatch(**common)
        banned = np.full((B, sampling_lib.BAN_WIDTH), -1, np.int32)
        for i, r in enumerate(requests):
            if r.banned_tokens:
                banned[i, : len(r.banned_tokens)] = r.banned_tokens[: sampling_lib.BAN_WIDTH]
        full = dict(common, top_k=col("top_k", np.int32, 0), top_p=col("top_p", np.float32, 1.0),
                    min_p=col("min_p", np.float32, 0.0), bias_slots=col("bias_slot", np.int32, 0),
                    banned_tokens=banned, num_logprobs=MAX_LOGPROBS)  # fmt: skip
        if flavor == "full":
            return sampling_lib.SamplingBatch(**full, flavor="full")
        tables = np.zeros((B, pages), np.int32)
        rows, cols = min(B, batch.block_tables.shape[0]), min(pages, batch.block_tables.shape[1])
        tables[:rows, :cols] = batch.block_tables[:rows, :cols]
        seq_lens = np.zeros(B, np.int32)
        seq_lens[:n] = batch.seq_lens[:n]
        return sampling_lib.SamplingBatch(
            **full, flavor="penalties", repetition_penalty=col("repetition_penalty", np.float32, 1.0),
            presence_penalty=col("presence_penalty", np.float32, 0.0),
            frequency_penalty=col("frequency_penalty", np.float32, 0.0), block_tables=tables, seq_lens=seq_lens,
            prompt_lens=col("prompt_len", np.int32, 0), first_positions=col("first_position", np.int32, 0),
        )  # fmt: skip

    def _device_token_ids(self, r: StepRequest) -> list[int]:
        """A request's tokens as the device reads them: virtual token i of a prompt adapter (host id
        vocab_size + i) becomes the id of its row in the slot's part of the prompt table."""
        vocab = self.cfg.vocab_size
        if r.token_ids[0] < vocab:  # virtual tokens lead a sequence: a chunk without them starts with a real one
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

    def gather_pages(self, pages: list[int]) -> list[jax.Array]:
        """Copies of the pages `pages` of every layer: [k0, v0, k1, v1, ...], each
        [num_kv_heads, len(pages), page_size, head_dim] on this engine's devices."""
        if self.channel is not None:
            raise RuntimeError("moving KV pages is not supported in a multi-process LLM")
        with self._lock:
            out = self._gather(self.kv_cache, self._replicate(self._page_ids(pages)))
        return [a[:, : len(pages)] for a in out]

    def scatter_pages(self, pages: list[int], values: list, token_ids: list[int] | None = None) -> None:
        """Write `values` ([k0, v0, ...], each [num_kv_heads, len(pages), page_size, head_dim], numpy
        or arrays on any device) into the pages `pages` of every layer, and `token_ids` (the tokens
        at their positions, in order) into the same token pages."""
        if self.channel is not None:
            raise RuntimeError("moving KV pages is not supported in a multi-process LLM")
        ids = self._page_ids(pages)
        pad = len(ids) - len(pages)
        sharding = (sharding_lib.kv_cache_sharding(self.mesh) if self.mesh is not None
                    else jax.sharding.SingleDeviceSharding(self._devices()[0]))  # fmt: skip
        placed = []
        for v in values:
            v = jax.device_put(v, sharding).astype(self.kv_dtype)
            placed.append(jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else v)
        rows = np.zeros((len(ids), self.config.page_size), np.int32)
        if token_ids is not None:
            flat = rows.reshape(-1)
            flat[: len(token_ids)] = token_ids
        with self._lock:
            self.kv_cache, self.token_pages = self._scatter(self.kv_cache, self.token_pages, self._replicate(ids),
                                                            placed, self._replicate(rows))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _StepPlan:
    """The programs one dispatch runs (the followers of a multi-process run replay it)."""

    forward: ForwardShape
    sampler: SamplerShape | None = None
    head: HeadShape | None = None
    want_last_logits: bool = False

    def to_json(self) -> dict:
        return {"forward": self.forward.to_json(), "sampler": self.sampler and self.sampler.to_json(),
                "head": self.head and self.head.to_json(), "want_last_logits": self.want_last_logits}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict) -> "_StepPlan":
        from jaxllm.engine.buckets import shape_from_json

        return cls(shape_from_json(data["forward"]), data["sampler"] and shape_from_json(data["sampler"]),
                   data["head"] and shape_from_json(data["head"]), data["want_last_logits"])  # fmt: skip


def _sampling_spec(B: int, flavor: str, pages: int, sds) -> sampling_lib.SamplingBatch:
    """The abstract SamplingBatch of B rows in `flavor` (block tables of `pages` for "penalties")."""
    i32, f32 = jnp.int32, jnp.float32
    common = dict(temperature=sds((B,), f32), seeds=sds((B, 2), jnp.uint32), counters=sds((B,), i32))
    if flavor == "plain":
        return sampling_lib.SamplingBatch(**common)
    full = dict(common, top_k=sds((B,), i32), top_p=sds((B,), f32), min_p=sds((B,), f32), bias_slots=sds((B,), i32),
                banned_tokens=sds((B, sampling_lib.BAN_WIDTH), i32), num_logprobs=MAX_LOGPROBS)  # fmt: skip
    if flavor == "full":
        return sampling_lib.SamplingBatch(**full, flavor="full")
    return sampling_lib.SamplingBatch(
        **full, flavor="penalties", repetition_penalty=sds((B,), f32), presence_penalty=sds((B,), f32),
        frequency_penalty=sds((B,), f32), block_tables=sds((B, pages), i32), seq_lens=sds((B,), i32),
        prompt_lens=sds((B,), i32), first_positions=sds((B,), i32),
    )  # fmt: skip


# ---- the programs (jitted per key by ModelRunner._program) ---------------------------------------------
def _forward_program(params, kv_cache, token_pages, flat, token_ids, bank, *, layout, cfg, backend, mesh,
                     shard_logits, steps, lora):  # fmt: skip
    host = unpack_host_inputs(flat, layout)
    batch = dataclasses.replace(host[0], token_ids=token_ids)
    adapters = None
    if bank is not None:
        lora_bank, prompt_table = bank
        adapters = AdapterInputs(lora=lora_bank, lora_slots=host[-1] if lora else None, prompt_table=prompt_table)
    if steps > 1:
        return multi_step(params, kv_cache, token_pages, batch, host[1], adapters, cfg=cfg, backend=backend, mesh=mesh,
                          steps=steps, shard_logits=shard_logits)  # fmt: skip
    return forward_step(params, kv_cache, token_pages, batch, adapters, cfg=cfg, backend=backend, mesh=mesh,
                        shard_logits=shard_logits)  # fmt: skip


def _sampler_program(logits, flat, bias_table, token_pages, *, layout, vocab_size, mesh, vocab_split):
    (sampling,) = unpack_host_inputs(flat, layout)
    return sample_step(logits, sampling, bias_table, token_pages, vocab_size=vocab_size, mesh=mesh,
                       vocab_split=vocab_split)  # fmt: skip


def _head_program(params, hidden, flat, *, layout, cfg, mesh, all_logits):
    (next_tokens,) = unpack_host_inputs(flat, layout)
    return head_step(params, hidden, next_tokens, cfg=cfg, num_logprobs=MAX_LOGPROBS, all_logits=all_logits, mesh=mesh)


@dataclasses.dataclass
class PendingStep:
    """A dispatched step: its outputs on the devices until `result()` reads them."""

    out: dict  # device arrays: [B, ...], or [steps, B, ...] for a multi-step decode
    num_requests: int
    decode_steps: int
    index: int = 0  # its number among the runner's dispatches (ModelRunner.num_dispatches), from 1
    fetch: list[str] | None = None  # the keys result() reads (None: all but NEXT_TOKENS)
    vocab_size: int = 0  # logits are cut to it (tensor parallelism pads the vocabulary)

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


def host_layout(tree, with_size: bool = False):
    """The static layout `unpack_host_inputs` reads a packed `tree` of ShapeDtypeStructs with (and
    the buffer's size in uint32 words)."""
    leaves, treedef = jax.tree.flatten(tree)
    layout = (treedef, tuple((tuple(a.shape), jnp.dtype(a.dtype).name) for a in leaves))
    if not with_size:
        return layout
    return layout, sum(int(np.prod(shape, dtype=np.int64)) for shape, _ in layout[1])


def pack_host_inputs(tree) -> np.ndarray:
    """A step's host inputs (32-bit numpy leaves) as one uint32 buffer; `unpack_host_inputs` reads it
    back with the layout of the program's abstract inputs (the bits are copied, not converted)."""
    arrays = [np.ascontiguousarray(a) for a in jax.tree.leaves(tree)]
    for a in arrays:
        if a.dtype.itemsize != 4:
            raise TypeError(f"host inputs travel as 32-bit words; got a {a.dtype} leaf")
    return np.concatenate([a.view(np.uint32).ravel() for a in arrays] or [np.zeros(0, np.uint32)])


def unpack_host_inputs(flat: jax.Array, layout: tuple):
    """The tree `pack_host_inputs` packed, from its buffer (on the device, inside a jit)."""
    treedef, specs = layout
    leaves, offset = [], 0
    for shape, dtype in specs:
        size = int(np.prod(shape, dtype=np.int64))
        bits = jax.lax.slice(flat, (offset,), (offset + size,))
        leaves.append(jax.lax.bitcast_convert_type(bits, jnp.dtype(dtype)).reshape(shape))
        offset += size
    return jax.tree.unflatten(treedef, leaves)


def _gather_pages(kv_cache, pages):
    """pages: [n] -> [k0, v0, k1, v1, ...], each [K, n, S, d]."""
    return [x[:, pages] for layer in kv_cache for x in layer]


def _scatter_pages(kv_cache, token_pages, pages, values, token_rows):
    """Write values ([k0, v0, ...], each [K, n, S, d]) into pages [n] of every layer, and token_rows
    [n, S] into the same token pages."""
    kv_cache = [(k.at[:, pages].set(values[2 * i]), v.at[:, pages].set(values[2 * i + 1]))
                for i, (k, v) in enumerate(kv_cache)]  # fmt: skip
    return kv_cache, token_pages.at[pages].set(token_rows)
