"""Many processes, one engine: JAX's distributed runtime, and the leader -> follower step channel.

One process per host (or per GPU) joins `jax.distributed`; together their devices form the tensor-
parallel mesh. Only the first process (the leader) runs the user's script and the engine loop;
before every step it broadcasts the step's host inputs (a shape key and a few small arrays), and
the other processes (followers) run the same compiled step on them, so every device takes part in
every collective. Followers run `follower_main`, which receives the leader's `LLM(...)` arguments,
builds the same engine, and follows until the leader shuts down. `jaxllm/launch.py` starts them.

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

import jax
import numpy as np

_initialized = False

# XLA's GPU compiler, in a run of several processes, splits the autotuning of each program's GEMMs
# among the processes and waits for every process's share (xla_gpu_shard_autotuning, on by default).
# So every process must compile the program at the same time. The leader compiles a step's program
# at its first use before it sends the step, and the followers compile it when the step arrives:
# with sharded autotuning the leader waited for their shares and they for the step, and a TP=2
# engine of two processes, one GPU each, hung at its first step (benchmarks/RESULTS.md, "one
# process per GPU"). Each process autotunes its own programs instead.
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


def follower_main() -> None:
    """Entry point of processes 1..N-1: build the leader's engine and follow its steps."""
    if not initialize_from_env():
        raise SystemExit("follower_main needs a multi-process run (see jaxllm/launch.py)")
    channel = StepChannel()
    header, _ = channel.recv()
    if header.get("kind") != "construct":
        raise SystemExit(f"expected the leader's LLM arguments, got {header.get('kind')!r}")
    from jaxllm.llm import LLM

    LLM(**header["kwargs"], _follower_channel=channel)
