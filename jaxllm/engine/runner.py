"""ModelRunner: owns the weights and the KV cache on the device, and the one jitted step.

The scheduler hands it a list of (sequence, token count); it packs them into a `BatchMetadata`
padded to a shape bucket, builds the `SamplingBatch`, runs `step` (forward + sampling, KV cache
donated) and returns host numpy results.

Shape buckets (each distinct bucket compiles once):
  decode-only steps: B = T in SEQ_BUCKETS (powers of two up to max_batch_size, from 2 on GPUs: see
                     GPU_MIN_DECODE_ROWS), max_query_len 1;
  mixed steps:       T in TOKEN_BUCKETS (powers of two from 16 up to max_num_tokens),
                     B = min(T, max_batch_size) (a mixed step's cost is its tokens, not its
                     sequence slots), max_query_len in QUERY_BUCKETS (capped at T);
  pages per sequence P: one bucket up to MIN_PAGE_BUCKET pages, powers of two above (attention
  loops stop at the batch's real length, so P only sizes the block tables).
So a plain engine compiles at most (len(SEQ_BUCKETS) + len(TOKEN_BUCKETS)) x len(page buckets)
step executables on the 'xla' backend (the Pallas backend adds query-length variants).
The 'xla' backend ignores max_query_len, so its mixed steps use Q = T (one bucket fewer); the
Pallas kernels size their grids by it.
Static sampling switches (logprobs count, truncation, penalties, bias, bans) and the logits mode
(last token, or every token for prompt_logprobs / context logits) also key compilations; requests
that use none of them share the plain variant.

Adapters (an engine made with LoRA or prompt adapters enabled): a step in which some token has a
LoRA adapter or is a prompt adapter's virtual token runs the `adapters` variant of its bucket,
which also reads the adapter bank and a per-token LoRA slot (jaxllm/adapters/bank.py,
jaxllm/layers/adapters.py); every other step runs the plain variant, at the plain cost. Engines
without adapters have no bank and compile exactly the plain variants.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.adapters.bank import AdapterBank
from jaxllm.config import ModelConfig
from jaxllm.layers import sampling as sampling_lib
from jaxllm.models.batch import NULL_PAGE, BatchMetadata, build_batch
from jaxllm import sharding as sharding_lib
from jaxllm.models.transformer import forward, init_kv_cache
from jaxllm.sampling_params import MAX_LOGPROBS

logger = logging.getLogger(__name__)


# Block tables are padded to at least this many pages: attention loops stop at the real lengths, so
# a wider table costs only its host-to-device copy, and fewer widths mean fewer compilations.
MIN_PAGE_BUCKET = 1024


# The smallest decode bucket on GPUs. With one row, XLA's GPU simplifier rewrites a product whose
# weight holds under 10M elements (K and V at any TP; every projection's per-GPU share at TP >= 2)
# into a multiply and a reduction, which streams the weight several times slower than a GEMM; with
# two rows each stays a GEMM. A batch-1 decode step therefore runs two rows there, the second an idle
# slot like any bucket's padding (benchmarks/RESULTS.md, "two rows").
GPU_MIN_DECODE_ROWS = 2

# A multi-step decode of a few rows under tensor parallelism on GPUs is bound by the host launching it:
# XLA splits each step into ~65 CUDA graphs at the all-reduces and the host takes ~65 us per all-reduce
# to launch the collective and the next graph, 4.2 ms a step against 3.1 ms of GPU work (Llama-3.1-8B
# shape, TP=2, 2 x H200). Compiled with these options the whole dispatch is one CUDA graph: all-reduces
# synchronous on the compute stream and recorded into it, the decode loop a conditional node
# (benchmarks/RESULTS.md, "one CUDA graph"). Not for single-step decodes or TP=1, which they slow down.
ONE_GRAPH_OPTIONS = {
    "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,COLLECTIVES,WHILE,CONDITIONAL",
    "xla_gpu_graph_min_graph_size": 1,
    "xla_gpu_disable_async_collectives": "ALLREDUCE",
    "xla_gpu_experimental_use_collective_kernels": "",  # NCCL's all-reduce, which command buffers can record
}
ONE_GRAPH_MAX_ROWS = 2  # the batch sizes it was measured at (batch 1 runs the two-row bucket)

# Key of a multi-step decode's output holding the next dispatch's input tokens (its last samples).
NEXT_TOKENS = "next_tokens"

# max_query_len buckets of mixed steps for the Pallas kernels (their grids scale with it): powers
# of four, so a few variants cover every chunk size.
QUERY_BUCKETS = [16, 64, 256, 1024, 4096, 16384]


def powers_of_two(low: int, high: int) -> list[int]:
    """[low, 2*low, ..., high] with `high` itself as the last bucket."""
    buckets, b = [], low
    while b < high:
        buckets.append(b)
        b *= 2
    buckets.append(high)
    return buckets


def decode_buckets(min_rows: int, max_batch_size: int) -> list[int]:
    """The decode-only steps' sequence buckets: powers of two from `min_rows` (GPU_MIN_DECODE_ROWS on
    GPUs, else 1) up to max_batch_size, and `min_rows` alone when max_batch_size is smaller."""
    return powers_of_two(min_rows, max(min_rows, max_batch_size))


def bucket_for(value: int, buckets: list[int]) -> int:
    for b in buckets:
        if value <= b:
            return b
    raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    max_num_tokens: int
    max_batch_size: int
    max_seq_len: int
    page_size: int
    num_pages: int
    backend: str = "xla"
    kv_dtype: Any = None  # None: the weights' dtype
    decode_steps: int = 1  # K of the multi-step decode variant (1: none); see `_multi_step`
    vocab_parallel_sampling: bool = True  # under TP, plain sampling reads vocabulary-split logits
    min_decode_rows: int | None = None  # the smallest decode bucket; None: GPU_MIN_DECODE_ROWS on GPUs, else 1
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
    logit_bias: np.ndarray | None = None
    penalty_tokens: list[int] | None = None
    penalty_counts: list[int] | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    banned_tokens: list[int] | None = None
    prompt_logprobs_next: list[int] | None = None  # next tokens of this chunk, for prompt_logprobs
    want_all_logits: bool = False  # return logits of every token of this chunk (context logits)
    want_last_logits: bool = False  # return the last token's logits (generation logits, processors)
    lora_slot: int = 0  # device slot of the sequence's LoRA adapter (0: none)
    prompt_adapter_slot: int = 0  # device slot of its prompt adapter (0: none); maps its virtual tokens


@dataclasses.dataclass(frozen=True)
class StepShape:
    """Everything that selects a compiled executable: the bucket and the static switches."""

    num_tokens: int  # T
    num_seqs: int  # B
    pages_per_seq: int  # P
    max_query_len: int  # Q
    logits_mode: str = "last"  # last | last+ | prompt | all
    num_logprobs: int = 0
    truncate: bool = False
    penalize: bool = False
    bias: bool = False
    banned_width: int = 0
    penalty_width: int = 0
    adapters: bool = False  # reads the adapter bank (some token has a LoRA adapter or is virtual)
    decode_steps: int = 1  # > 1: a decode-only step that runs this many decodes in one dispatch

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class ModelRunner:
    def __init__(self, cfg: ModelConfig, params: dict, config: RunnerConfig, mesh=None, channel=None,
                 adapters: AdapterBank | None = None):  # fmt: skip
        self.cfg = cfg
        self.params = params
        self.config = config
        self.dtype = params["embed"].dtype
        self.kv_dtype = config.kv_dtype or self.dtype
        self.mesh = mesh  # a tensor-parallel mesh (jaxllm/sharding.py), or None for one device
        self.channel = channel  # multi-process runs: the leader broadcasts each step (jaxllm/distributed.py)
        self.num_dispatches = 0  # steps dispatched (a follower counts the leader's), numbering PendingStep
        self._last_out: dict | None = None  # a follower's: the outputs of its last dispatch, a multi-step decode
        self.adapters = adapters  # the LoRA bank / prompt table, or None (no adapter variants)
        self.kv_cache = self._new_cache()
        self.executables: dict[StepShape, Any] = {}
        rows = config.min_decode_rows or (GPU_MIN_DECODE_ROWS if self._devices()[0].platform == "gpu" else 1)
        self.seq_buckets = decode_buckets(rows, config.max_batch_size)
        self.token_buckets = powers_of_two(min(16, config.max_num_tokens), config.max_num_tokens)
        max_pages = -(-config.max_seq_len // config.page_size)
        self.page_buckets = powers_of_two(min(max_pages, MIN_PAGE_BUCKET), max_pages)
        self.compile_seconds = 0.0  # wall time spent compiling steps
        self._lock = threading.Lock()
        self._build_step()
        self._gather = jax.jit(_gather_pages)
        self._scatter = jax.jit(_scatter_pages, donate_argnums=(0,))

    def _build_step(self) -> None:
        """(Re)make the jitted step from the config (executables compiled before are dropped)."""
        self._step = jax.jit(
            functools.partial(_step, cfg=self.cfg, backend=self.config.backend, mesh=self.mesh,
                              vocab_parallel=self.config.vocab_parallel_sampling),
            static_argnames=("logits_mode", "decode_steps"),
            donate_argnums=(1,),
        )  # fmt: skip
        self.executables.clear()

    def _new_cache(self):
        make = functools.partial(init_kv_cache, self.cfg, self.config.num_pages, self.config.page_size, self.kv_dtype)
        if self.mesh is None:
            return make()
        # Created in place, each device holding only its KV heads.
        pages = sharding_lib.kv_cache_sharding(self.mesh)
        return jax.jit(make, out_shardings=[(pages, pages)] * self.cfg.num_layers)()

    def _on_device(self, tree):
        """Host inputs of a step on the step's devices, replicated over the mesh (every process passes
        the same values).

        In one process the ~15 small arrays travel as one buffer per device (`pack_host_inputs`) and
        a small jitted `unpack_host_inputs` splits it there: transferred one by one, they took about
        1 ms of every TP=2 dispatch on 2 x H200 (15 copies per GPU, one after another).
        """
        sharding = self._input_sharding()
        if self.channel is not None:
            return jax.tree.map(lambda a: sharding_lib.place_global(np.asarray(a), sharding), tree)
        packed = pack_host_inputs(tree)
        if packed is None:  # a leaf that is not 32-bit: transferred as it is
            return jax.device_put(tree, sharding)
        flat, layout = packed
        return _unpack_jit(jax.device_put(flat, sharding), layout)

    def _input_sharding(self):
        """Where a step's inputs live: replicated over the mesh, or on the one device."""
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(self._devices()[0])
        return sharding_lib.replicated(self.mesh)

    def reset_cache(self) -> None:
        """Drop and rebuild the KV cache (after a failed step left the donated buffers invalid)."""
        if self.channel is not None:
            self.channel.send({"kind": "reset"})
        self.kv_cache = self._new_cache()

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
                self.kv_cache = self._new_cache()
                continue
            if kind == "adapter":
                self._write_adapter(header["adapter"], header["slot"], arrays)
                continue
            if kind == "precompile":
                self._compile_many([StepShape(**s) for s in header["shapes"]], progress=False)
                continue
            if kind != "step":
                raise RuntimeError(f"unexpected message from the leader: {kind!r}")
            shape = StepShape(**header["shape"])
            inputs = self._on_device(jax.tree.unflatten(jax.tree.structure(self.host_inputs(shape)), arrays))
            after = header.get("after")
            if after is not None:  # a follow-on: its input tokens are the last dispatch's samples on the devices
                if self._last_out is None or after != self.num_dispatches:
                    kind = "not a multi-step decode" if self._last_out is None else "a multi-step decode"
                    raise RuntimeError(f"the leader's step follows multi-step decode {after}; this process's last "
                                       f"dispatch is {self.num_dispatches}, {kind}")  # fmt: skip
                inputs = self._with_next_tokens(inputs, self._last_out)
            exe = self.executable(shape)
            out, self.kv_cache = exe(self.params, self.kv_cache, *self._step_args(inputs, shape))
            self.num_dispatches += 1
            self._last_out = out if shape.decode_steps > 1 else None

    # ---- adapter slots ---------------------------------------------------------------------------
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

    @property
    def num_compilations(self) -> int:
        return len(self.executables)

    # ---- compilation -------------------------------------------------------------------------
    @property
    def _uses_lora(self) -> bool:
        return self.adapters is not None and self.adapters.lora is not None

    def abstract_inputs(self, shape: StepShape) -> tuple:
        """The step's arguments after (params, kv_cache), abstract where they come from the host."""
        return self._step_args(self.host_inputs(shape), shape)

    def _step_args(self, host: tuple, shape: StepShape) -> tuple:
        """(batch, sampling, next_tokens[, lora_slots]) -> the step's arguments: the adapters variant
        adds the bank (device arrays as they are) with the per-token LoRA slots."""
        if not shape.adapters:
            return host
        lora_slots = host[3] if self._uses_lora else None
        return (*host[:3], self.adapters.step_inputs(lora_slots))

    def host_inputs(self, shape: StepShape):
        """ShapeDtypeStructs of what the host sends each step: (batch, sampling, next_tokens), and the
        per-token LoRA slots [T] for the adapters variant of a LoRA engine."""
        T, B, P = shape.num_tokens, shape.num_seqs, shape.pages_per_seq
        i32, f32 = jnp.int32, jnp.float32

        sharding = None if self.mesh is None else sharding_lib.replicated(self.mesh)

        def sds(dims, dtype):
            return jax.ShapeDtypeStruct(dims, dtype, sharding=sharding)

        batch = BatchMetadata(sds((T,), i32), sds((T,), i32), sds((T,), i32), sds((T,), i32), sds((B + 1,), i32),
                              sds((B,), i32), sds((B, P), i32), sds((B,), i32), shape.max_query_len)  # fmt: skip
        V = self.cfg.vocab_size
        pw, bw = shape.penalty_width, shape.banned_width
        sampling = sampling_lib.SamplingBatch(
            temperature=sds((B,), f32), top_k=sds((B,), i32), top_p=sds((B,), f32), min_p=sds((B,), f32),
            seeds=sds((B, 2), jnp.uint32), counters=sds((B,), i32),
            logit_bias=sds((B, V), f32) if shape.bias else None,
            penalty_tokens=sds((B, pw), i32) if shape.penalize else None,
            penalty_counts=sds((B, pw), i32) if shape.penalize else None,
            repetition_penalty=sds((B,), f32) if shape.penalize else None,
            presence_penalty=sds((B,), f32) if shape.penalize else None,
            frequency_penalty=sds((B,), f32) if shape.penalize else None,
            banned_tokens=sds((B, bw), i32) if bw else None,
            num_logprobs=shape.num_logprobs, truncate=shape.truncate, penalize=shape.penalize,
        )  # fmt: skip
        if shape.adapters and self._uses_lora:
            return batch, sampling, sds((T,), i32), sds((T,), i32)
        return batch, sampling, sds((T,), i32)

    def executable(self, shape: StepShape):
        """The compiled step for `shape`, compiling it on first use."""
        exe = self.executables.get(shape)
        if exe is None:
            started = time.perf_counter()
            exe = self.executables[shape] = self._compile(shape)
            self.compile_seconds += time.perf_counter() - started
        return exe

    def _compile(self, shape: StepShape):
        lowered = self._step.lower(self.params, self.kv_cache, *self.abstract_inputs(shape),
                                   logits_mode=shape.logits_mode, decode_steps=shape.decode_steps)  # fmt: skip
        options = self.compiler_options(shape)
        if options:
            try:
                return lowered.compile(compiler_options=options)
            except jax.errors.JaxRuntimeError as e:  # an XLA without one of the options: its defaults
                if "No such compile option" not in str(e):
                    raise
                logger.warning("compiling the %s step with XLA's defaults: %s", shape, e)
        return lowered.compile()

    def compiler_options(self, shape: StepShape) -> dict | None:
        """XLA options the step of `shape` is compiled with: ONE_GRAPH_OPTIONS for a multi-step decode
        of at most ONE_GRAPH_MAX_ROWS rows where `one_graph_decode` says (None: several GPUs)."""
        if self._one_graph_decode() and shape.decode_steps > 1 and shape.num_seqs <= ONE_GRAPH_MAX_ROWS:
            return dict(ONE_GRAPH_OPTIONS)
        return None

    def _one_graph_decode(self) -> bool:
        if self.config.one_graph_decode is not None:
            return self.config.one_graph_decode
        devices = self._devices()
        return len(devices) > 1 and devices[0].platform == "gpu"

    def bucket_shapes(self) -> list[StepShape]:
        """Every plain step shape this engine can take: decode buckets and mixed buckets (and their
        adapters variants when the engine serves adapters)."""
        shapes = []
        for adapters in (False, True) if self.adapters is not None else (False,):
            for P in self.page_buckets:
                for B in self.seq_buckets:
                    shapes.append(StepShape(B, B, P, 1, adapters=adapters))
                    if self.config.decode_steps > 1:
                        shapes.append(StepShape(B, B, P, 1, adapters=adapters, decode_steps=self.config.decode_steps))
                for T in self.token_buckets:
                    shapes.append(StepShape(T, min(T, self.config.max_batch_size), P, T, adapters=adapters))
        return shapes

    def precompile(self, shapes: list[StepShape] | None = None, progress: bool = True, threads: int | None = None) -> None:
        """Compile `shapes` (default: every plain bucket) ahead of time, several at once: XLA
        compiles outside the GIL, so threads divide the wall time by about the core count."""
        todo = [s for s in dict.fromkeys(shapes or self.bucket_shapes()) if s not in self.executables]
        if self.channel is not None and todo:  # the followers compile the same shapes meanwhile, not at first use
            self.channel.send({"kind": "precompile", "shapes": [s.to_json() for s in todo]})
        self._compile_many(todo, progress, threads)

    def _compile_many(self, todo: list[StepShape], progress: bool = True, threads: int | None = None) -> None:
        """Compile `todo` in this process only (a follower's side of `precompile`), several at once."""
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        threads = threads or max(1, min(len(todo), (os.cpu_count() or 2) // 2))

        def compile_one(shape: StepShape):
            return shape, self._compile(shape)

        started = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool, tqdm(total=len(todo), desc="compiling step buckets", unit="shape",
                                                       disable=not progress) as bar:  # fmt: skip
            for shape, exe in pool.map(compile_one, todo):
                self.executables[shape] = exe
                bar.update()
        self.compile_seconds += time.perf_counter() - started

    def _devices(self) -> list:
        """The devices the step runs on, in the order the weights' sharding lists them."""
        return list(self.params["embed"].sharding._device_assignment)

    def _executable_target(self) -> dict:
        """What a compiled step depends on beyond its StepShape: JAX, the devices, the KV cache's shape."""
        devices = self._devices()
        k_pages = self.kv_cache[0][0]
        return {"jax": jax.__version__, "platform": devices[0].platform, "device_kind": devices[0].device_kind,
                "devices": [d.id for d in devices], "kv_cache": [list(k_pages.shape), jnp.dtype(k_pages.dtype).name],
                "one_graph_decode": self._one_graph_decode()}  # fmt: skip

    def save_executables(self, directory) -> int:
        """Serialize the compiled steps into `directory` (with what they were compiled for); returns how
        many. A step the backend cannot serialize (XLA's CPU client refuses some sort comparators) is
        left out with a warning: a reloaded engine compiles it when it first needs it."""
        import json
        from pathlib import Path

        from jax.experimental.serialize_executable import serialize

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        index = {**self._executable_target(), "shapes": []}
        for i, (shape, exe) in enumerate(self.executables.items()):
            try:
                payload, _, out_tree = serialize(exe)
            except Exception as e:  # jax raises its runtime error type for unsupported executables
                logger.warning("step %s is not serializable here (%s); a reload compiles it", shape, e)
                continue
            (directory / f"step_{i}.bin").write_bytes(payload)
            index["shapes"].append({"file": f"step_{i}.bin", "shape": shape.to_json(), "out_keys": _out_keys(out_tree)})
        (directory / "index.json").write_text(json.dumps(index, indent=2))
        return len(index["shapes"])

    def load_executables(self, directory) -> int:
        """Load executables saved by save_executables, if they were built for this JAX and device."""
        import json
        from pathlib import Path

        from jax.experimental.serialize_executable import deserialize_and_load

        index_file = Path(directory) / "index.json"
        if not index_file.is_file():
            return 0
        index = json.loads(index_file.read_text())
        here = self._executable_target()
        saved = {k: index.get(k) for k in here}
        if saved != here:
            logger.warning("saved executables were built for %s, this is %s: compiling instead", saved, here)
            return 0
        for entry in index["shapes"]:
            shape = StepShape(**entry["shape"])
            in_tree = jax.tree.structure(((self.params, self.kv_cache, *self.abstract_inputs(shape)), {}))
            out_example = ({k: 0 for k in entry["out_keys"]}, self.kv_cache)
            out_tree = jax.tree.structure(out_example)
            payload = (Path(directory) / entry["file"]).read_bytes()
            self.executables[shape] = deserialize_and_load(payload, in_tree, out_tree,
                                                           execution_devices=self._devices())  # fmt: skip
        return len(index["shapes"])

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
            out = self._gather(self.kv_cache, self._on_device(self._page_ids(pages)))
        return [a[:, : len(pages)] for a in out]

    def scatter_pages(self, pages: list[int], values: list) -> None:
        """Write `values` ([k0, v0, ...], each [num_kv_heads, len(pages), page_size, head_dim], numpy
        or arrays on any device) into the pages `pages` of every layer."""
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
        with self._lock:
            self.kv_cache = self._scatter(self.kv_cache, self._on_device(ids), placed)

    # ---- packing ---------------------------------------------------------------------------
    def bucket_shape(self, requests: list[StepRequest]) -> tuple[int, int, int, int]:
        """(num_tokens T, num_seqs B, pages_per_seq P, max_query_len Q) for a step."""
        lens = [len(r.token_ids) for r in requests]
        B = bucket_for(len(requests), self.seq_buckets)
        pages = max(len(r.block_table) for r in requests)
        P = bucket_for(pages, self.page_buckets)
        if max(lens) == 1:
            return B, B, P, 1
        T = bucket_for(sum(lens), self.token_buckets)
        B = min(T, self.config.max_batch_size)  # mixed steps: one sequence bucket per token bucket
        Q = T if self.config.backend == "xla" else min(T, bucket_for(max(lens), QUERY_BUCKETS + [T]))
        return T, B, P, Q

    def _sampling_batch(self, requests: list[StepRequest], B: int) -> sampling_lib.SamplingBatch:
        n = len(requests)

        def col(name, dtype, fill):
            arr = np.full(B, fill, dtype)
            arr[:n] = [getattr(r, name) for r in requests]
            return arr

        seeds = np.zeros((B, 2), np.uint32)
        for i, r in enumerate(requests):
            seeds[i] = (r.seed >> 32) & 0xFFFFFFFF, r.seed & 0xFFFFFFFF
        truncate = any(r.top_k > 0 or r.top_p < 1.0 or r.min_p > 0 for r in requests if r.temperature > 0)
        penalize = any(
            r.repetition_penalty != 1.0 or r.presence_penalty != 0.0 or r.frequency_penalty != 0.0 for r in requests
        )
        logit_bias = None
        if any(r.logit_bias is not None for r in requests):
            logit_bias = np.zeros((B, self.cfg.vocab_size), np.float32)
            for i, r in enumerate(requests):
                if r.logit_bias is not None:
                    logit_bias[i] = r.logit_bias
        penalty_tokens = penalty_counts = rep = pres = freq = None
        if penalize:
            L = 1 << max(1, max(len(r.penalty_tokens or []) for r in requests) - 1).bit_length()
            penalty_tokens = np.full((B, L), -1, np.int32)
            penalty_counts = np.zeros((B, L), np.int32)
            for i, r in enumerate(requests):
                toks = r.penalty_tokens or []
                penalty_tokens[i, : len(toks)] = toks
                penalty_counts[i, : len(toks)] = r.penalty_counts or [0] * len(toks)
            rep = col("repetition_penalty", np.float32, 1.0)
            pres = col("presence_penalty", np.float32, 0.0)
            freq = col("frequency_penalty", np.float32, 0.0)
        banned = None
        if any(r.banned_tokens for r in requests):
            N = 1 << max(0, max(len(r.banned_tokens or []) for r in requests) - 1).bit_length()
            banned = np.full((B, N), -1, np.int32)
            for i, r in enumerate(requests):
                if r.banned_tokens:
                    banned[i, : len(r.banned_tokens)] = r.banned_tokens
        num_logprobs = MAX_LOGPROBS if any(r.num_logprobs for r in requests) else 0
        return sampling_lib.SamplingBatch(
            temperature=col("temperature", np.float32, 0.0),
            top_k=col("top_k", np.int32, 0),
            top_p=col("top_p", np.float32, 1.0),
            min_p=col("min_p", np.float32, 0.0),
            seeds=seeds,
            counters=col("counter", np.int32, 0),
            logit_bias=logit_bias,
            penalty_tokens=penalty_tokens,
            penalty_counts=penalty_counts,
            repetition_penalty=rep,
            presence_penalty=pres,
            frequency_penalty=freq,
            banned_tokens=banned,
            num_logprobs=num_logprobs,
            truncate=truncate,
            penalize=penalize,
        )

    def run(self, requests: list[StepRequest], decode_steps: int = 1) -> dict[str, np.ndarray]:
        """Run one step and wait for it: `dispatch(...).result()`."""
        return self.dispatch(requests, decode_steps).result()

    def dispatch(self, requests: list[StepRequest], decode_steps: int = 1, after: PendingStep | None = None) -> PendingStep:
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
        T, B, P, Q = self.bucket_shape(requests)
        token_ids = [self._device_token_ids(r) for r in requests] if self.adapters is not None else None
        batch = build_batch(
            token_ids or [r.token_ids for r in requests],
            [r.start for r in requests],
            [r.block_table for r in requests],
            self.config.page_size,
            num_tokens=T,
            num_seqs=B,
            pages_per_seq=P,
            max_query_len=Q,
        )
        sampling = self._sampling_batch(requests, B)
        want_prompt = any(r.prompt_logprobs_next is not None for r in requests)
        want_all = any(r.want_all_logits for r in requests)
        want_last = any(r.want_last_logits for r in requests)
        logits_mode = "all" if want_all else "prompt" if want_prompt else "last+" if want_last else "last"
        next_tokens = np.zeros(T, np.int32)
        if want_prompt:
            offset = 0
            for r in requests:
                if r.prompt_logprobs_next is not None:
                    next_tokens[offset : offset + len(r.prompt_logprobs_next)] = r.prompt_logprobs_next
                offset += len(r.token_ids)
        uses_adapters = self.adapters is not None and any(
            r.lora_slot or (r.prompt_adapter_slot and r.token_ids[0] >= self.cfg.vocab_size) for r in requests
        )
        shape = StepShape(
            T, B, P, Q, logits_mode, sampling.num_logprobs, sampling.truncate, sampling.penalize,
            bias=sampling.logit_bias is not None,
            banned_width=0 if sampling.banned_tokens is None else sampling.banned_tokens.shape[1],
            penalty_width=0 if sampling.penalty_tokens is None else sampling.penalty_tokens.shape[1],
            adapters=uses_adapters,
            decode_steps=decode_steps,
        )
        if decode_steps > 1 and (Q != 1 or logits_mode != "last"):
            raise ValueError("decode_steps > 1 needs a decode-only step that returns no logits")
        host = (batch, sampling, next_tokens)
        if uses_adapters and self._uses_lora:
            lora_slots = np.zeros(T, np.int32)  # [T]: each token's LoRA slot, 0 for padding
            offset = 0
            for r in requests:
                lora_slots[offset : offset + len(r.token_ids)] = r.lora_slot
                offset += len(r.token_ids)
            host = (*host, lora_slots)
        with self._lock:
            exe = self.executable(shape)
            if self.channel is not None:  # the followers replay it: the same inputs, the same follow-on
                header = {"kind": "step", "shape": shape.to_json(), "after": after and after.index}
                self.channel.send(header, jax.tree.leaves(host))
            inputs = self._on_device(host)
            if after is not None:
                inputs = self._with_next_tokens(inputs, after.out)
            out, self.kv_cache = exe(self.params, self.kv_cache, *self._step_args(inputs, shape))
            self.num_dispatches += 1
        return PendingStep(out, len(requests), decode_steps, self.num_dispatches)

    def _with_next_tokens(self, inputs: tuple, out: dict) -> tuple:
        """`inputs` of a follow-on dispatch with its input tokens taken from `out`, the outputs of the
        multi-step decode it follows, on the devices."""
        tokens = jax.device_put(out[NEXT_TOKENS], self._input_sharding())
        return (dataclasses.replace(inputs[0], token_ids=tokens), *inputs[1:])

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


def _step(params, kv_cache, batch: BatchMetadata, sampling, next_tokens, adapters=None, *, cfg, backend, mesh,
          logits_mode, decode_steps=1, vocab_parallel=True):  # fmt: skip
    """forward + sample: the one function the runner jits. kv_cache is donated; `adapters`
    (layers.adapters.AdapterInputs) only in the adapters variant of a step."""
    if decode_steps > 1:
        return _multi_step(params, kv_cache, batch, sampling, adapters, cfg=cfg, backend=backend, mesh=mesh,
                           steps=decode_steps, vocab_parallel=vocab_parallel)  # fmt: skip
    if logits_mode == "last":
        return _forward_and_sample(params, kv_cache, batch, sampling, adapters, cfg=cfg, backend=backend, mesh=mesh,
                                   vocab_parallel=vocab_parallel)  # fmt: skip
    every_token = logits_mode in ("all", "prompt")
    logits, kv_cache = forward(params, batch, kv_cache, cfg, backend=backend, all_logits=every_token, mesh=mesh,
                               adapters=adapters)  # fmt: skip
    last = logits[batch.logits_indices] if every_token else logits
    out = sampling_lib.sample(last, sampling)
    if every_token:
        prompt = sampling_lib.prompt_logprobs(logits, next_tokens, sampling.num_logprobs or 1)
        out.update({f"prompt_{k}": v for k, v in prompt.items()})
    if logits_mode == "all":
        out["all_logits"] = logits
    out["last_logits"] = last  # every mode but "last", which _forward_and_sample serves
    return out, kv_cache


def _forward_and_sample(params, kv_cache, batch: BatchMetadata, sampling, adapters, *, cfg, backend, mesh,
                        vocab_parallel: bool):  # fmt: skip
    """A step that returns samples and no logits. Under tensor parallelism (with `vocab_parallel`),
    batches that `sample_sharded` serves are sampled over the vocabulary shards (no [B, V] all-gather)."""
    sharded = vocab_parallel and mesh is not None and sampling_lib.can_sample_sharded(sampling)
    logits, kv_cache = forward(params, batch, kv_cache, cfg, backend=backend, mesh=mesh, adapters=adapters,
                               shard_logits=sharded)  # fmt: skip
    if sharded:
        return sampling_lib.sample_sharded(logits, sampling, mesh, sharding_lib.TP_AXIS, cfg.vocab_size), kv_cache
    return sampling_lib.sample(logits, sampling), kv_cache


def _multi_step(params, kv_cache, batch: BatchMetadata, sampling, adapters, *, cfg, backend, mesh, steps: int,
                vocab_parallel: bool):  # fmt: skip
    """`steps` decode steps in one dispatch (a loop on the device): step k computes the tokens
    step k - 1 sampled, one position further on, with sampling counter + k, exactly what `steps`
    separate decode steps would compute; the host reads every step's samples at the end and keeps
    each sequence's tokens up to its stop. A position past a sequence's pages writes its K/V into
    the null page, as padding does (the host only keeps tokens it gave pages to).
    Returns ({key: [steps, B, ...]}, kv_cache)."""
    T = batch.num_tokens  # == B: a decode step packs sequence i's token at row i
    page_size = kv_cache[0][0].shape[2]
    live = jnp.arange(T) < batch.query_start[-1]  # real rows; padding rows stay as they are
    live_seq = batch.seq_lens > 0
    pages_per_seq = batch.block_tables.shape[1]

    def one(carry, k):
        tokens, kv = carry
        positions = jnp.where(live, batch.positions + k, batch.positions)
        index = positions // page_size
        page = jnp.take_along_axis(batch.block_tables[batch.token_seq], jnp.minimum(index, pages_per_seq - 1)[:, None],
                                   axis=1)[:, 0]  # fmt: skip
        page = jnp.where(index < pages_per_seq, page, NULL_PAGE)
        step = dataclasses.replace(
            batch, token_ids=tokens, positions=positions,
            slot_mapping=jnp.where(live, page * page_size + positions % page_size, batch.slot_mapping),
            seq_lens=jnp.where(live_seq, batch.seq_lens + k, 0),
        )  # fmt: skip
        out, kv = _forward_and_sample(params, kv, step, dataclasses.replace(sampling, counters=sampling.counters + k),
                                      adapters, cfg=cfg, backend=backend, mesh=mesh, vocab_parallel=vocab_parallel)  # fmt: skip
        return (out["tokens"], kv), out

    (_, kv_cache), outs = jax.lax.scan(one, (batch.token_ids, kv_cache), jnp.arange(steps, dtype=jnp.int32))
    # The input tokens of a dispatch that follows this one (the overlap scheduler): the last samples,
    # padding rows 0 as the host packs them. Part of this program, so a follow-on compiles nothing.
    outs[NEXT_TOKENS] = jnp.where(live, outs["tokens"][-1], 0).astype(jnp.int32)
    return outs, kv_cache


@dataclasses.dataclass
class PendingStep:
    """A dispatched step: its outputs on the devices until `result()` reads them."""

    out: dict  # the step's outputs, device arrays: [B, ...], or [steps, B, ...] for a multi-step decode
    num_requests: int
    decode_steps: int
    index: int = 0  # its number among the runner's dispatches (ModelRunner.num_dispatches), from 1

    def result(self) -> dict[str, np.ndarray]:
        """Host arrays with a row per request (waits for the step)."""
        n = self.num_requests
        if self.decode_steps > 1:
            host = jax.device_get({k: v for k, v in self.out.items() if k != NEXT_TOKENS})
            return {k: v[:, :n] for k, v in host.items()}
        host = jax.device_get(self.out)
        result = {k: v[:n] for k, v in host.items() if not k.startswith(("prompt_", "all_"))}
        for k, v in host.items():
            if k.startswith(("prompt_", "all_")):
                result[k] = v  # per packed token; the caller slices by its offsets
        return result


def pack_host_inputs(tree) -> tuple[np.ndarray, tuple] | None:
    """A step's host inputs as one uint32 buffer and the static layout that `unpack_host_inputs`
    reads it back with; None when a leaf is not a 32-bit type (the bits are copied, not converted)."""
    leaves, treedef = jax.tree.flatten(tree)
    arrays = [np.ascontiguousarray(a) for a in leaves]
    if any(a.dtype.itemsize != 4 for a in arrays):
        return None
    flat = np.concatenate([a.view(np.uint32).ravel() for a in arrays] or [np.zeros(0, np.uint32)])
    return flat, (treedef, tuple((a.shape, a.dtype.name) for a in arrays))


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


# One small executable per layout (per step shape); its outputs stay where its input is.
_unpack_jit = jax.jit(unpack_host_inputs, static_argnums=(1,))


def _gather_pages(kv_cache, pages):
    """pages: [n] -> [k0, v0, k1, v1, ...], each [K, n, S, d]."""
    return [x[:, pages] for layer in kv_cache for x in layer]


def _scatter_pages(kv_cache, pages, values):
    """Write values ([k0, v0, ...], each [K, n, S, d]) into pages [n] of every layer."""
    return [(k.at[:, pages].set(values[2 * i]), v.at[:, pages].set(values[2 * i + 1]))
            for i, (k, v) in enumerate(kv_cache)]  # fmt: skip


def _out_keys(out_tree) -> list[str]:
    """The dict keys of a step's first output (its treedef is ((dict, kv_cache)))."""
    example = jax.tree.unflatten(out_tree, list(range(out_tree.num_leaves)))
    return sorted(example[0])
