"""Many processes, one engine: JAX's distributed runtime, the leader -> follower channel, and the
`Replica` that replays the runner's calls.

One process per host (or per GPU) joins `jax.distributed`; together their devices form the tensor-
parallel mesh. Only the first process (the leader) runs the user's script and the engine loop. The
runner makes every call that touches the devices through its `Replica`: on the leader `call(name,
*args)` broadcasts the method's name and arguments (a step's plan and a few small arrays) before
running it, and each other process (a follower) runs `getattr(runner, name)(*args)` for every call
it receives, so every device takes part in every collective. Followers run
`jaxllm.launch.follower_main`, which receives the leader's `LLM(...)` arguments, builds the same
engine, and follows until the leader shuts down; `jaxllm/launch.py` starts them.

Environment read by `initialize_from_env` (the launcher sets it; under SLURM, JAX reads SLURM's):
  JAXLLM_COORDINATOR      host:port of process 0's coordinator
  JAXLLM_NUM_PROCESSES    total processes
  JAXLLM_PROCESS_ID       this process's index
  JAXLLM_CPU_DEVICES      CPU devices per process (CPU runs only; collectives through gloo)
  JAXLLM_SLURM=1          initialize from SLURM's variables instead
and, before JAX's backend starts, adds `--xla_gpu_shard_autotuning=false` to XLA_FLAGS (see
`autotune_alone`) unless XLA_FLAGS already sets that flag.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

_initialized = False

# XLA's GPU compiler, in a run of several processes, splits the autotuning of each program's GEMMs
# among the processes and waits for every process's share (xla_gpu_shard_autotuning, on by default).
# So every process must compile the program at the same time. The leader compiles a step's program
# at its first use before it sends the step, and the followers compile it when the step arrives:
# with sharded autotuning the leader waited for their shares and they for the step, and a TP=2
# engine of two processes, one GPU each, hung at its first step (benchmarks/archive/RESULTS-2026-11.md,
# "one process per GPU"). Each process autotunes its own programs instead.
NO_SHARD_AUTOTUNING = "--xla_gpu_shard_autotuning=false"


def autotune_alone(env=os.environ) -> None:
    """Add NO_SHARD_AUTOTUNING to env's XLA_FLAGS unless they already set the flag (XLA reads them
    when JAX's backend starts, so this must come before any device is used)."""
    flags = env.get("XLA_FLAGS", "")
    if "xla_gpu_shard_autotuning" not in flags:
        env["XLA_FLAGS"] = f"{flags} {NO_SHARD_AUTOTUNING}".strip()


def initialize_from_env() -> bool:
    """Join the distributed runtime if the environment asks for it; True if this is a multi-process run."""
    global _initialized
    if _initialized:
        return jax.process_count() > 1
    if os.environ.get("JAXLLM_SLURM"):
        autotune_alone()
        jax.distributed.initialize()
        _initialized = True
    elif os.environ.get("JAXLLM_COORDINATOR"):
        cpu_devices = os.environ.get("JAXLLM_CPU_DEVICES")
        if cpu_devices:
            jax.config.update("jax_platforms", "cpu")
            jax.config.update("jax_num_cpu_devices", int(cpu_devices))
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        autotune_alone()
        jax.distributed.initialize(
            coordinator_address=os.environ["JAXLLM_COORDINATOR"],
            num_processes=int(os.environ["JAXLLM_NUM_PROCESSES"]),
            process_id=int(os.environ["JAXLLM_PROCESS_ID"]),
        )
        _initialized = True
    return _initialized and jax.process_count() > 1


def is_leader() -> bool:
    return jax.process_index() == 0


class StepChannel:
    """Broadcasts messages (a JSON header and numpy arrays) from the leader to every process.

    Each message costs two collectives: its size, then its bytes padded to a power of two (so the
    broadcast compiles for few sizes).
    """

    def send(self, header: dict, arrays: list[np.ndarray] = ()) -> None:
        self._broadcast(self._encode(header, list(arrays)))

    def recv(self) -> tuple[dict, list[np.ndarray]]:
        return self._decode(self._broadcast(None))

    @staticmethod
    def _encode(header: dict, arrays: list[np.ndarray]) -> bytes:
        arrays = [np.ascontiguousarray(a) for a in arrays]
        meta = {"header": header, "arrays": [[a.dtype.str, list(a.shape)] for a in arrays]}
        text = json.dumps(meta).encode()
        return len(text).to_bytes(8, "little") + text + b"".join(a.tobytes() for a in arrays)

    @staticmethod
    def _decode(payload: bytes) -> tuple[dict, list[np.ndarray]]:
        n = int.from_bytes(payload[:8], "little")
        meta = json.loads(payload[8 : 8 + n])
        offset, arrays = 8 + n, []
        for dtype, shape in meta["arrays"]:
            count = int(np.prod(shape)) * np.dtype(dtype).itemsize
            arrays.append(np.frombuffer(payload[offset : offset + count], dtype=dtype).reshape(shape))
            offset += count
        return meta["header"], arrays

    @staticmethod
    def _broadcast(payload: bytes | None) -> bytes:
        from jax.experimental.multihost_utils import broadcast_one_to_all

        leader = payload is not None
        size = np.array([len(payload) if leader else 0], np.int64)
        size = int(broadcast_one_to_all(size, is_source=leader)[0])
        padded = 1 << max(10, (size - 1).bit_length())
        buffer = np.zeros(padded, np.uint8)
        if leader:
            buffer[:size] = np.frombuffer(payload, np.uint8)
        return bytes(np.asarray(broadcast_one_to_all(buffer, is_source=leader))[:size])


class Replica:
    """Runs methods of `target` on every process of a run: the leader's `call(name, *args)` sends
    the call, then runs `getattr(target, name)(*args)`; a follower's `follow()` runs each call it
    receives until the leader's `stop()`. Without a channel (one process) a call just runs.

    Arguments travel as JSON values and numpy arrays, nested in lists and dicts (a tuple arrives
    as a list).
    """

    def __init__(self, target: Any, channel: StepChannel | None = None):
        self.target = target
        self.channel = channel

    @property
    def multi_process(self) -> bool:
        return self.channel is not None

    def call(self, name: str, *args):
        if self.channel is not None:
            arrays: list[np.ndarray] = []
            self.channel.send({"kind": "call", "name": name, "args": _encode(list(args), arrays)}, arrays)
        return getattr(self.target, name)(*args)

    def stop(self) -> None:
        """Leader: release the followers (their `follow()` returns)."""
        if self.channel is not None:
            self.channel.send({"kind": "stop"})
            self.channel = None

    def follow(self) -> None:
        """Follower: run the leader's calls until it stops."""
        while True:
            header, arrays = self.channel.recv()
            if header["kind"] == "stop":
                return
            if header["kind"] != "call":
                raise RuntimeError(f"unexpected message from the leader: {header['kind']!r}")
            getattr(self.target, header["name"])(*_decode(header["args"], arrays))


_ARRAY = "__array__"  # a JSON placeholder for the i-th array of a message


def _encode(value, arrays: list):
    """`value` as JSON, its numpy arrays appended to `arrays` and replaced by placeholders."""
    if isinstance(value, np.ndarray):
        arrays.append(value)
        return {_ARRAY: len(arrays) - 1}
    if isinstance(value, (list, tuple)):
        return [_encode(v, arrays) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v, arrays) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode(value, arrays: list):
    if isinstance(value, list):
        return [_decode(v, arrays) for v in value]
    if isinstance(value, dict):
        if set(value) == {_ARRAY}:
            return arrays[value[_ARRAY]]
        return {k: _decode(v, arrays) for k, v in value.items()}
    return value
