"""Launch a jaxllm script over several processes (hosts, or GPUs of one host).

    python -m jaxllm.launch --nproc-per-node 2 script.py [args...]          # one host, 2 processes
    python -m jaxllm.launch --nnodes 2 --node-rank R --coordinator HOST0:PORT --nproc-per-node 8 script.py
    srun --ntasks-per-node=1 python -m jaxllm.launch --slurm script.py     # under SLURM
    python -m jaxllm.launch --nproc-per-node 2 --data-parallel script.py    # every process runs script.py
    (`jaxllm launch ...` is the same command.)

Process 0 runs `script.py`; every other process runs `follower_main`, which builds the engine
that the script's `LLM(model=..., tensor_parallel_size=N)` describes and replays its runner's
calls (jaxllm/distributed.py). N must equal the number of devices over all processes, and `model` must be
readable at the same path on every host. On GPUs with one process per GPU, each process sees only
its own GPU (`--one-gpu-per-process`); with one process per host, each process drives all its
GPUs, which is the faster way on one host (benchmarks/archive/RESULTS-2026-11.md, "one process per GPU").
`--cpu-devices-per-process D` runs on CPU devices instead, with gloo collectives (tests).
With `--data-parallel` every process runs `script.py` and no process follows another: each builds its
own engines over its own devices, as `jaxllm batch` does, which shards its requests over the processes.

Under SLURM, JAX reads the coordinator, process count and index from SLURM's variables; start one
task per host (or per GPU with --one-gpu-per-process and `--gpus-per-task=1`).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys

FOLLOWER = "from jaxllm.launch import follower_main; follower_main()"


def follower_main() -> None:
    """Entry point of processes 1..N-1: build the leader's engine and follow its calls (the LLM
    made with `_follower_channel` does not return until the leader shuts down)."""
    from jaxllm import distributed

    if not distributed.initialize_from_env():
        raise SystemExit("follower_main needs a multi-process run (see jaxllm/launch.py)")
    channel = distributed.StepChannel()
    header, _ = channel.recv()
    if header.get("kind") != "construct":
        raise SystemExit(f"expected the leader's LLM arguments, got {header.get('kind')!r}")
    from jaxllm.llm import LLM

    LLM(**header["kwargs"], _follower_channel=channel)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(is_leader: bool, script: list[str]) -> list[str]:
    return [sys.executable, *script] if is_leader else [sys.executable, "-c", FOLLOWER]


def _slurm(args) -> int:
    env = dict(os.environ, JAXLLM_SLURM="1")
    rank = int(os.environ.get("SLURM_PROCID", "0"))
    if args.one_gpu_per_process and "SLURM_LOCALID" in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = os.environ["SLURM_LOCALID"]
    return subprocess.call(_command(rank == 0 or args.data_parallel, args.script), env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm launch", description=__doc__.splitlines()[0])
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--coordinator", default=None, help="HOST:PORT of node 0 (default: localhost, a free port)")
    parser.add_argument("--cpu-devices-per-process", type=int, default=None)
    parser.add_argument("--one-gpu-per-process", action="store_true")
    parser.add_argument("--slurm", action="store_true", help="take the process layout from SLURM (run under srun)")
    parser.add_argument("--data-parallel", action="store_true",
                        help="every process runs the script with its own engines (jaxllm batch); none follows")
    parser.add_argument("script", nargs=argparse.REMAINDER, help="the script and its arguments")
    args = parser.parse_args(argv)
    if not args.script:
        parser.error("give the script to run")
    if args.slurm:
        return _slurm(args)
    for name in ("nproc_per_node", "nnodes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.node_rank < args.nnodes:
        parser.error(f"--node-rank {args.node_rank} is outside 0..{args.nnodes - 1}")
    if args.nnodes > 1 and args.coordinator is None:
        parser.error("--coordinator HOST:PORT is needed with several nodes")
    coordinator = args.coordinator or f"127.0.0.1:{_free_port()}"
    total = args.nnodes * args.nproc_per_node
    processes = []
    for local in range(args.nproc_per_node):
        rank = args.node_rank * args.nproc_per_node + local
        env = dict(os.environ, JAXLLM_COORDINATOR=coordinator, JAXLLM_NUM_PROCESSES=str(total),
                   JAXLLM_PROCESS_ID=str(rank))  # fmt: skip
        if args.cpu_devices_per_process:
            env["JAXLLM_CPU_DEVICES"] = str(args.cpu_devices_per_process)
            flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
            env["XLA_FLAGS"] = " ".join(flags)
        if args.one_gpu_per_process:
            env["CUDA_VISIBLE_DEVICES"] = str(local)
        processes.append(subprocess.Popen(_command(rank == 0 or args.data_parallel, args.script), env=env))
    codes = [None] * len(processes)
    # A launcher stopped by a signal (timeout, SLURM's scancel, a batch system) stops its processes:
    # left running, they would hold their GPUs and wait for peers that are gone.
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        leader = processes[0] if args.node_rank == 0 else None
        if leader is not None:
            codes[0] = leader.wait()
            if codes[0] != 0:  # followers would wait for a leader that is gone
                _stop(processes[1:])
        for i, p in enumerate(processes):
            codes[i] = p.wait()
    except (KeyboardInterrupt, _Terminated) as stopped:
        _stop(processes)
        return 130 if isinstance(stopped, KeyboardInterrupt) else 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    return next((c for c in codes if c), 0)


class _Terminated(Exception):
    """The launcher received SIGTERM."""


def _raise_terminated(signum, frame):
    raise _Terminated


def _stop(processes: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM every process still running, then SIGKILL those that outlive `grace_s`."""
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in processes:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


if __name__ == "__main__":
    sys.exit(main())
