"""Shared fixtures: tiny checkpoints of every family, the real GGUF models, their references.

Everything expensive (checkpoints, engines with their compiled shapes, transformers references)
is built once per session and shared.
"""

from __future__ import annotations

import os
from pathlib import Path

# Eight virtual CPU devices for the tensor-parallel tests; harmless for the rest. XLA's CPU collectives
# abort the process when a participant is 40 s late to a rendezvous; on 2 cores shared by two test
# workers, each device a thread, a late participant is load, not a deadlock: 10 minutes here.
# The suite's programs are tiny and compiled far more often than run long: LLVM's cheaper passes
# (semantics unchanged: no fast-math either way) took a precompiled tiny engine from 22.7 to 16.9 s,
# with the same tokens, while the beam-search tests ran slower (49 -> 74 s); the whole suite, back to
# back from clean clones with warm caches on two cores: 20:30 with them, 23:47 without (2026-12-06).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120 "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=600 "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The references' torch runs OpenMP threads that spin while they wait for work: with as many threads
# as cores in each of two workers on two cores, each spins on a core the other needs (a Gemma 3
# reference test took 107 s beside a copy of itself, 40 s with one thread each). The cores are shared
# out among the workers instead (pytest-xdist sets the count in each worker before this file is read;
# subprocesses inherit it). A run without workers keeps torch's default.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Engines compile each program at its first use: most tests visit a few of an engine's programs, and
# compiling all of them for each of the suite's engines would take most of its time. The tests of
# start-up (tests/test_startup.py) run engines as users get them, precompiled, in subprocesses.
os.environ.setdefault("JAXLLM_PRECOMPILE", "0")

import pytest  # noqa: E402


# The files that take the most worker time, longest first (per file, from a --junitxml run of the
# suite on two cores, 2026-12-05): the Makefile hands files to the workers in collection order
# (--dist loadfile --no-loadscope-reorder), so the long ones start first and the short ones fill the
# end. Keep it roughly in this order when a file grows.
LONGEST_FIRST = ("test_quantization", "test_startup", "test_real_models", "test_tensor_parallel", "test_notebooks",
                 "test_speculative", "test_multistep", "test_engine", "test_gguf", "test_serve", "test_multiprocess",
                 "test_pallas_backend", "test_beam_search", "test_converters_cli", "test_batch", "test_faults",
                 "test_guided", "test_calibration", "test_disaggregated", "test_lora", "test_tokenizer_gguf",
                 "test_prefix_cache", "test_models_parity", "test_kv_cache_fp8", "test_tp4_70b_shape",
                 "test_bench")  # fmt: skip


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.stem
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order


def _run_directory(config) -> Path | None:
    """A directory every test worker of this run shares (under the run's pytest base directory, which
    pytest removes with the old runs'), or None outside pytest-xdist workers."""
    basetemp = getattr(config.option, "basetemp", None)
    if not os.environ.get("PYTEST_XDIST_WORKER") or not basetemp:
        return None
    return Path(basetemp).resolve().parent


@pytest.fixture(scope="session", autouse=True)
def program_cache(tmp_path_factory, pytestconfig):
    """One persistent program cache for the session (never the user's), shared by the run's workers:
    engines of the same model and arguments in different tests load each other's programs."""
    shared = _run_directory(pytestconfig)
    path = shared / "programs" if shared is not None else tmp_path_factory.mktemp("programs")
    path.mkdir(parents=True, exist_ok=True)
    os.environ["JAXLLM_COMPILE_CACHE"] = str(path)
    yield path


from tests import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir(name) -> path of a saved tiny checkpoint (see tests/tiny.py for the variants)."""
    root = tmp_path_factory.mktemp("tiny")
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = tiny.save_tiny(name, root / name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_hf():
    """tiny_hf(name) -> the transformers float32 model of that tiny variant (the reference; shared)."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = tiny.build_tiny(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_llm(tiny_dir):
    """tiny_llm(name) -> a float32 LLM over that tiny checkpoint (shared, tokenizer-free)."""
    from jaxllm import LLM

    engines: dict = {}

    def get(name: str, **kwargs):
        key = (name, tuple(sorted(kwargs.items())))
        if key not in engines:
            engines[key] = LLM(model=str(tiny_dir(name)), dtype="float32", skip_tokenizer_init=True,
                               max_batch_size=16, max_num_tokens=256, **kwargs)  # fmt: skip
        return engines[key]

    yield get
    for llm in engines.values():
        llm.shutdown()


@pytest.fixture(scope="session")
def smollm2_path():
    from jaxllm.checkpoints.builtin import fetch

    return fetch("smollm2")


@pytest.fixture(scope="session")
def gemma3_path():
    from jaxllm.checkpoints.builtin import fetch

    return fetch("gemma3-270m")


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_path):
    from jaxllm import LLM

    llm = LLM(model=str(smollm2_path), dtype="float32", max_batch_size=16, max_num_tokens=512, max_beam_width=4)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_path):
    """transformers' float32 model of the same GGUF file (the reference)."""
    return tiny.hf_from_gguf(smollm2_path)


@pytest.fixture(scope="session")
def gemma3_hf(gemma3_path):
    return tiny.hf_from_gguf(gemma3_path)
