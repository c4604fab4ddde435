"""Two processes x 4 CPU devices over localhost (jax.distributed, gloo), started by the launcher; on a
machine with two GPUs, two processes with one GPU each."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jaxllm import SamplingParams
from jaxllm.distributed import NO_SHARD_AUTOTUNING, autotune_alone

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 12], list(range(30, 70))]
MAX_TOKENS = 24  # as tests/multiprocess_script.py: several dispatches a request


def _launch(tiny_dir, tmp_path, launcher_args: list[str], env_extra: dict | None = None,
            script_args: tuple = ()) -> subprocess.CompletedProcess:  # fmt: skip
    """tests/multiprocess_script.py over two processes started by the launcher with `launcher_args`,
    on llama-odd, its result written to tmp_path / "result.json"."""
    script = Path(__file__).with_name("multiprocess_script.py")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "jaxllm.launch", "--nproc-per-node", "2", *launcher_args,
                           str(script), str(tmp_path / "result.json"), str(tiny_dir("llama-odd")), *script_args],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip


def _launch_script(tiny_dir, tiny_llm, tmp_path, launcher_args: list[str], env_extra: dict | None = None,
                   script_args: tuple = ()) -> tuple:  # fmt: skip
    """`_launch`, which must succeed: (its result, the tokens of one device in this process; None with
    `script_args`)."""
    expected = None if script_args else [o.outputs[0].token_ids for o in tiny_llm("llama-odd").generate(
        PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)]  # fmt: skip
    proc = _launch(tiny_dir, tmp_path, launcher_args, env_extra, script_args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "result.json").read_text()), expected


def test_two_processes_give_the_single_device_tokens(tiny_dir, tiny_llm, tmp_path):
    result, expected = _launch_script(tiny_dir, tiny_llm, tmp_path, ["--cpu-devices-per-process", "4"])
    assert result["processes"] == 2 and result["devices"] == 8
    assert result["tokens"] == expected
    assert result["streamed"] == expected[0] and result["async"] == expected[2]
    assert result["stats"] > 0
    assert result["follow_ons"] > 0  # the overlap scheduler ran ahead, the followers replaying it


def test_two_processes_calibrate_once(tiny_dir, tiny_llm, tmp_path):
    """calib_config over two processes: the leader calibrates and sends its scales to the follower;
    they are what one process measures. A failed calibration ends the follower too, naming why."""
    from jaxllm.calibration import CalibConfig, calibrate, calibrated_config
    from jaxllm.checkpoints import loader
    from jaxllm.quantization import QuantConfig

    dataset = tmp_path / "calibration.jsonl"
    dataset.write_text("\n".join(json.dumps({"input_ids": ids}) for ids in PROMPTS))
    result, _ = _launch_script(tiny_dir, tiny_llm, tmp_path, ["--cpu-devices-per-process", "4"],
                               script_args=(str(dataset),))  # fmt: skip
    assert result["processes"] == 2 and all(len(t) == MAX_TOKENS for t in result["tokens"])
    resolved = loader.resolve(str(tiny_dir("llama-odd")))
    cfg = calibrated_config(loader.read_config(resolved), QuantConfig(quant_algo="FP8"), kv_fp8=True)
    scales = calibrate(resolved, cfg, jnp.float32, CalibConfig(calib_dataset=str(dataset)), None)
    assert result["k_scale"] == float(jnp.float32(scales["layers.1.k_scale"]))  # (held as float32)
    # The leader's calibration fails (text, and no tokenizer): the follower's build ends with its error.
    (tmp_path / "text.txt").write_text("Some text to calibrate on.")
    proc = _launch(tiny_dir, tmp_path, ["--cpu-devices-per-process", "4"], script_args=(str(tmp_path / "text.txt"),))
    assert proc.returncode != 0
    assert "calibration failed in the leader process: ValueError: calib_dataset holds text" in proc.stderr, \
        proc.stderr[-3000:]


@pytest.mark.skipif(jax.devices()[0].platform != "gpu" or jax.device_count() < 2, reason="needs 2 GPUs")
def test_two_processes_one_gpu_each_give_one_gpus_tokens(tiny_dir, tiny_llm, tmp_path):
    """One process per GPU (`--one-gpu-per-process`): hung until each process autotuned alone."""
    # This process holds GPU 0 too (its share: what `import jaxllm` set, unless the user had): the child
    # on GPU 0 gets what is left of it, less ~3% for the CUDA contexts, and at most 0.2.
    held = float(os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"])
    child = max(0.02, min(0.2, 1.0 - held - 0.03))
    result, expected = _launch_script(tiny_dir, tiny_llm, tmp_path, ["--one-gpu-per-process"],
                                      {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{child:.2f}"})  # fmt: skip
    assert result["processes"] == 2 and result["devices"] == 2
    assert result["tokens"] == expected
    assert result["streamed"] == expected[0] and result["async"] == expected[2]
    assert result["follow_ons"] > 0


def test_every_process_autotunes_alone():
    """XLA's sharded autotuning needs every process compiling a program at once; the leader compiles a
    step before its followers do, so jaxllm.distributed turns it off unless XLA_FLAGS set the flag."""
    env = {}
    autotune_alone(env)
    assert env["XLA_FLAGS"] == NO_SHARD_AUTOTUNING
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    autotune_alone(env)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4 " + NO_SHARD_AUTOTUNING
    env = {"XLA_FLAGS": "--xla_gpu_shard_autotuning=true"}  # the user's choice stays
    autotune_alone(env)
    assert env["XLA_FLAGS"] == "--xla_gpu_shard_autotuning=true"


def test_launcher_arguments_are_checked():
    proc = subprocess.run([sys.executable, "-m", "jaxllm.launch", "--nnodes", "2", "x.py"], capture_output=True, text=True)
    assert proc.returncode != 0 and "--coordinator" in proc.stderr


def test_a_terminated_launcher_stops_its_processes(tmp_path):
    """SIGTERM to the launcher (timeout, scancel) must not leave its processes running, holding devices."""
    import signal
    import time

    pids = tmp_path / "pids"
    script = tmp_path / "sleeper.py"
    script.write_text(f"import os, time\nopen({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n')\ntime.sleep(600)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    launcher = subprocess.Popen([sys.executable, "-m", "jaxllm.launch", str(script)], env=env)
    deadline = time.monotonic() + 60
    while not (pids.exists() and pids.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(pids.read_text().split()[0])
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=30) == 128 + signal.SIGTERM
    try:
        os.kill(child, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive, "the launched process outlived its launcher"
