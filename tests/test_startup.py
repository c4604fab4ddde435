"""What a user meets first: scripts that end (streaming, in flight, Ctrl-C) exit cleanly; an engine
compiles every program before LLM() returns and nothing after, whatever the workload; the
persistent program cache lets a second process start without compiling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams

ROOT = Path(__file__).resolve().parent.parent


def _run_script(body: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `body` as a standalone script (a new interpreter), as a user runs one."""
    script = textwrap.dedent(body)
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


def _assert_clean(proc: subprocess.CompletedProcess, status: int = 0) -> None:
    abort_marks = ("FATAL", "terminate called", "Aborted", "core dumped", "Fatal Python error")
    assert proc.returncode == status, (proc.returncode, proc.stderr[-3000:])
    assert not any(mark in proc.stderr for mark in abort_marks), proc.stderr[-3000:]


# ---- clean exit ---------------------------------------------------------------------------------------
TINY_ENGINE = """
from jaxllm import LLM, SamplingParams
llm = LLM(model={path!r}, dtype="float32", skip_tokenizer_init=True, max_batch_size=4, max_num_tokens=64)
"""


@pytest.mark.parametrize("ending", ["stream", "result", "preprocess", "in_flight", "mid_stream"])
def test_scripts_that_end_without_shutdown_exit_cleanly(tiny_dir, ending):
    """The seed's examples as scripts that end without `shutdown()`: status 0, no abort (an engine
    thread still inside XLA when the interpreter tears threads down used to abort the process with
    status 134), three times over."""
    endings = {
        "stream": """
            n = 0
            for out in llm.generate_async([5, 6, 7], SamplingParams(max_tokens=40, ignore_eos=True), streaming=True):
                n = len(out.outputs[0].token_ids)
            print("streamed", n)
            """,
        "result": """
            out = llm.generate_async([5, 6, 7], SamplingParams(max_tokens=20, ignore_eos=True)).result()
            print("tokens", len(out.outputs[0].token_ids))
            """,
        "preprocess": """
            pre = llm.preprocess([5, 6, 7], SamplingParams(max_tokens=10, ignore_eos=True))
            print("tokens", len(llm.generate(pre, use_tqdm=False).outputs[0].token_ids))
            """,
        "in_flight": """
            futures = [llm.generate_async([5, 6, i], SamplingParams(max_tokens=1000, ignore_eos=True)) for i in range(3)]
            print("submitted", len(futures))
            """,
        "mid_stream": """
            stream = llm.generate_async([5, 6, 7], SamplingParams(max_tokens=1000, ignore_eos=True), streaming=True)
            print("first", len(next(iter(stream)).outputs[0].token_ids))
            """,
    }
    script = TINY_ENGINE.format(path=str(tiny_dir("llama"))) + textwrap.dedent(endings[ending])
    for _ in range(3):
        proc = _run_script(script)
        _assert_clean(proc)
        assert proc.stdout.strip()


def test_requests_in_flight_at_exit_resolve_with_engine_shutdown(tiny_dir):
    script = TINY_ENGINE.format(path=str(tiny_dir("llama"))) + textwrap.dedent("""
        import atexit, threading
        from jaxllm.engine.engine import EngineShutdown
        future = llm.generate_async([5, 6, 7], SamplingParams(max_tokens=1000, ignore_eos=True))
        def report():  # atexit runs its hooks last-in first-out: this one after the engines stop
            try:
                future.result(timeout=10)
                print("finished")
            except Exception as e:
                print("resolved with", type(e.__cause__ or e).__name__)
        atexit.register(report)
        """)
    proc = _run_script(script)
    _assert_clean(proc)


def test_ctrl_c_during_generate_exits_as_an_interrupt(tiny_dir):
    """SIGINT while `generate` waits: a KeyboardInterrupt exit (status 130 / killed by SIGINT),
    never an abort. The batch takes far longer than the wait before the signal (4 requests of 1000
    tokens take about a second on 2 cores with warm programs: the signal used to race their end).

    The script first sets SIGINT to Python's handler, as a terminal's shell starts it: a suite run
    as a background job of a non-interactive shell ignores SIGINT, its children inherit that, and
    Python then installs no KeyboardInterrupt handler at all (the batch would simply finish)."""
    script = "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
    script += TINY_ENGINE.format(path=str(tiny_dir("llama"))) + textwrap.dedent("""
        import sys
        llm.generate([5, 6, 7], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
        print("ready", flush=True)
        llm.generate([[5, 6, i] for i in range(64)], SamplingParams(max_tokens=1000, ignore_eos=True), use_tqdm=False)
        print("finished", flush=True)
        """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert "finished" not in stdout, "the batch ended before the signal came"
    assert proc.returncode in (130, -signal.SIGINT, 1), (proc.returncode, stderr[-3000:])
    assert "KeyboardInterrupt" in stderr
    assert not any(mark in stderr for mark in ("FATAL", "terminate called", "core dumped")), stderr[-3000:]


@pytest.mark.slow
def test_streaming_example_with_smollm2_exits_cleanly(smollm2_path):
    """The seed's streaming example on the real model, 500 tokens, no shutdown() (the tiny model's
    scripts above run every ending)."""
    script = f"""
        from jaxllm import LLM, SamplingParams
        llm = LLM(model={str(smollm2_path)!r}, max_batch_size=2, max_num_tokens=128)
        text = ""
        for out in llm.generate_async("What is machine learning?", SamplingParams(max_tokens=500), streaming=True):
            text += out.outputs[0].text_diff
        print(len(text))
        """
    proc = _run_script(script)
    _assert_clean(proc)
    assert int(proc.stdout.strip().splitlines()[-1]) > 0


# ---- no compilation after LLM() returns ---------------------------------------------------------------
class _CompileCounter:
    """Counts XLA compilations in this process (JAX reports each backend compile's duration)."""

    def __init__(self):
        import jax

        self.count = 0
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if self.active and event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


@pytest.fixture(scope="module")
def compile_counter():
    return _CompileCounter()


def _mixed_workload(llm, vocab: int) -> list:
    """Lengths from 1 to 200 tokens, n and best_of, log-probabilities (generated and prompt), stops,
    penalties, bias, bans, min_tokens, truncation, seeds, generation and context logits, a logits
    processor, streaming and aborts, all at once."""
    rng = np.random.default_rng(0)
    bias = np.zeros(vocab, np.float32)
    bias[[3, 4, 5]] = [2.0, -1.0, 0.5]

    def halve(request_id, logits, token_ids, *_):
        return logits * 0.5

    kinds = [
        SamplingParams(max_tokens=12, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, seed=1),
        SamplingParams(max_tokens=7, temperature=1.0, top_k=5, min_p=0.05, logprobs=3, seed=2),
        SamplingParams(max_tokens=8, n=3, temperature=0.7, seed=3),
        SamplingParams(max_tokens=6, best_of=3, n=2, temperature=0.9, seed=4, logprobs=0),
        SamplingParams(max_tokens=10, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2),
        SamplingParams(max_tokens=10, embedding_bias=bias, bad_token_ids=[7, 8], min_tokens=4, stop_token_ids=[9]),
        SamplingParams(max_tokens=5, prompt_logprobs=2),
        SamplingParams(max_tokens=4, return_context_logits=True, return_generation_logits=True),
        SamplingParams(max_tokens=6, logits_processor=halve, temperature=0.5, seed=5),
        SamplingParams(max_tokens=30, stop_token_ids=[11, 12], ignore_eos=False),
    ]
    lengths = [1, 2, 3, 7, 16, 31, 64, 100, 150, 200]
    prompts, params = [], []
    for i in range(40):
        length = lengths[i % len(lengths)]
        prompts.append([int(t) for t in rng.integers(13, vocab - 1, size=length)])
        params.append(kinds[i % len(kinds)])
    outs = llm.generate(prompts, params, use_tqdm=False)
    streams = [llm.generate_async(p, SamplingParams(max_tokens=20, ignore_eos=True), streaming=True)
               for p in prompts[:3]]  # fmt: skip
    for out in streams[0]:
        pass
    next(iter(streams[1]))
    streams[1].abort()
    streams[2].result()
    return outs


def test_no_compilation_after_ready_for_a_mixed_workload(tiny_dir, compile_counter, monkeypatch, tmp_path):
    """LLM() makes every program; a workload of every kind then compiles nothing."""
    monkeypatch.setenv("JAXLLM_PRECOMPILE", "1")
    monkeypatch.setenv("JAXLLM_COMPILE_CACHE", str(tmp_path / "programs"))
    with LLM(model=str(tiny_dir("llama")), dtype="float32", skip_tokenizer_init=True, max_batch_size=16,
             max_num_tokens=128) as llm:  # fmt: skip
        runner = llm._engine.runner
        assert set(runner.bucket_shapes()) <= set(runner.executables)
        compile_counter.count, compile_counter.active = 0, True
        try:
            outs = _mixed_workload(llm, llm.config.vocab_size)
        finally:
            compile_counter.active = False
        assert all(o.finished for o in outs)
        assert compile_counter.count == 0, f"{compile_counter.count} compilations after LLM() returned"
        assert runner.num_compilations == len(runner.bucket_shapes())


def test_no_compilation_after_ready_with_adapters(tiny_dir, compile_counter, monkeypatch, tmp_path):
    """LoRA and prompt-adapter requests mixed with plain ones compile nothing after LLM() returns
    (their programs, and the slot writers, are made before)."""
    from jaxllm import LoraConfig, LoRARequest, PromptAdapterRequest
    from tests import tiny

    monkeypatch.setenv("JAXLLM_PRECOMPILE", "1")
    monkeypatch.setenv("JAXLLM_COMPILE_CACHE", str(tmp_path / "programs"))
    lora = tiny.save_lora("llama", tmp_path / "lora", rank=4, alpha=8, seed=1, merge=False)[0]
    prompt = tiny.save_prompt_adapter("llama", tmp_path / "prompt", 3, seed=1)[0]
    with LLM(model=str(tiny_dir("llama")), dtype="float32", skip_tokenizer_init=True, max_batch_size=4,
             max_num_tokens=16, lora_config=LoraConfig(max_lora_rank=8, max_loras=2),
             max_prompt_adapter_token=4) as llm:  # fmt: skip
        compile_counter.count, compile_counter.active = 0, True
        try:
            params = SamplingParams(max_tokens=6, ignore_eos=True)
            prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14]]
            outs = llm.generate(prompts, params, use_tqdm=False,
                                lora_request=[LoRARequest("a", 1, str(lora)), None, LoRARequest("a", 1, str(lora)), None],
                                prompt_adapter_request=[None, PromptAdapterRequest("p", 1, str(prompt)), None, None])  # fmt: skip
        finally:
            compile_counter.active = False
        assert all(o.finished for o in outs)
        assert compile_counter.count == 0, f"{compile_counter.count} compilations after LLM() returned"


# ---- the persistent program cache ---------------------------------------------------------------------
CACHE_SCRIPT = """
import json, time
from jaxllm import LLM, SamplingParams
started = time.perf_counter()
llm = LLM(model={path!r}, dtype="float32", skip_tokenizer_init=True, max_batch_size={batch}, max_num_tokens=32)
ready = time.perf_counter() - started
out = llm.generate([5, 6, 7], SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
runner = llm._engine.runner
print(json.dumps({{"compiled": runner.programs.num_compiled, "loaded": runner.programs.num_loaded,
                  "programs": len(runner.bucket_shapes()), "tokens": out.outputs[0].token_ids, "ready_s": ready}}))
"""


def _cache_run(path, cache, batch: int = 2, extra_env: dict | None = None) -> dict:
    env = {"JAXLLM_PRECOMPILE": "1", "JAXLLM_COMPILE_CACHE": str(cache), **(extra_env or {})}
    proc = _run_script(CACHE_SCRIPT.format(path=str(path), batch=batch), env=env)
    _assert_clean(proc)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_every_program_from_the_cache_and_recompiles_damaged_ones(tiny_dir, tmp_path):
    cache = tmp_path / "programs"
    first = _cache_run(tiny_dir("llama"), cache)
    assert first["compiled"] == first["programs"] and first["loaded"] == 0
    second = _cache_run(tiny_dir("llama"), cache)
    assert second["compiled"] == 0 and second["loaded"] == second["programs"]
    assert second["tokens"] == first["tokens"]
    assert not list(cache.rglob(".tmp-*"))  # written whole, renamed into place
    # A damaged file (garbage, or cut short) is compiled again, and only that one.
    files = sorted(cache.rglob("*.bin"))
    files[0].write_bytes(b"not a program")
    files[1].write_bytes(files[1].read_bytes()[:100])
    again = _cache_run(tiny_dir("llama"), cache)
    assert again["compiled"] == 2 and again["tokens"] == first["tokens"]
    # Another engine size is another engine: it misses cleanly and compiles its own programs.
    other = _cache_run(tiny_dir("llama"), cache, batch=4)
    assert other["compiled"] == other["programs"] and other["tokens"] == first["tokens"]
    assert len([d for d in cache.iterdir() if d.is_dir()]) == 2


def test_the_cache_key_holds_the_module_switches_programs_are_traced_under(monkeypatch):
    """A program made under one setting of a module switch (benchmarks flip them) is never loaded
    under another: each is part of the key of an engine's directory in the program cache."""
    from jaxllm.engine.executables import environment_description
    from jaxllm.layers import attention, linear
    from jaxllm.models import transformer

    base = environment_description()
    flips = [(attention, "DECODES_APART", [not attention.DECODES_APART[0]]),
             (attention, "ROPE_IN_KV_WRITE", {"pallas": not attention.ROPE_IN_KV_WRITE["pallas"]}),
             (transformer, "WEIGHT_ONLY_MAX_ROWS", transformer.WEIGHT_ONLY_MAX_ROWS + 1),
             (linear, "GROUPED_DOTS", [not linear.GROUPED_DOTS[0]]),
             (linear, "WEIGHT_ONLY_INPUT_LAST", {**linear.WEIGHT_ONLY_INPUT_LAST, "int8": False}),
             (linear, "SMALL_GROUP_DOT_ROWS", linear.SMALL_GROUP_DOT_ROWS + 1)]  # fmt: skip
    for module, name, value in flips:
        with monkeypatch.context() as patch:
            patch.setattr(module, name, value)
            assert environment_description() != base, name
    assert environment_description() == base


def test_cache_directory_comes_from_the_argument_the_variable_or_xdg(monkeypatch, tmp_path):
    from jaxllm.engine.executables import resolve_cache_dir

    monkeypatch.delenv("JAXLLM_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir(None) == tmp_path / "xdg" / "jaxllm" / "programs"
    monkeypatch.setenv("JAXLLM_COMPILE_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir(None) == tmp_path / "env"
    assert resolve_cache_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    assert resolve_cache_dir("off") is None
    monkeypatch.setenv("JAXLLM_COMPILE_CACHE", "off")
    assert resolve_cache_dir(None) is None


def _cache_of_engines(path, max_bytes: int, keys: str):
    """A program cache holding a 1,000-byte program for each engine key "a" * 64, ..., used in
    the order of `keys` (the first least recently)."""
    from jaxllm.engine.buckets import HeadShape
    from jaxllm.engine.executables import CompileCache

    cache = CompileCache(path, max_bytes=max_bytes)
    for i, key in enumerate(k * 64 for k in keys):
        cache.store(key, HeadShape(16), None, {"out_keys": []}, b"x" * 1000)
        os.utime(cache.directory(key) / cache.file_name(HeadShape(16), None), (1000 + i, 1000 + i))
    return cache


def test_cache_is_kept_under_its_size_bound(tmp_path):
    """Least recently used engines' directories go first; the engine being written stays."""
    from jaxllm.engine.buckets import HeadShape

    cache = _cache_of_engines(tmp_path, 2500, "abc")
    assert cache.load("a" * 64, HeadShape(16)) is not None  # now the most recently used
    cache.evict(keep="c" * 64)
    left = sorted(d.name[0] for d in tmp_path.iterdir())
    assert left == ["a", "c"] and cache.size() <= 2500


def test_eviction_passes_over_files_another_process_renames_meanwhile(tmp_path, monkeypatch):
    """Processes share the cache: a temporary file listed by one can be renamed into place (or its
    directory evicted) by another before its size is read. Such files are left out, never raised."""
    cache = _cache_of_engines(tmp_path, 1500, "ab")
    for key in ("a" * 64, "b" * 64):
        (cache.directory(key) / ".tmp-renamed").write_bytes(b"y")
    stat = Path.stat

    def vanishing(path, *args, **kwargs):
        if path.name == ".tmp-renamed":
            raise FileNotFoundError(path)
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", vanishing)
    assert cache.size() > 2000
    cache.evict(keep="b" * 64)
    assert [d.name[0] for d in tmp_path.iterdir()] == ["b"] and cache.size() <= 1500


def test_import_lets_the_gpu_allocator_take_92_percent_unless_the_user_chose():
    """JAX's allocator would hold 75% of a GPU, and the KV cache is sized from what it holds."""
    body = "import os, jaxllm; print(os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'])"
    env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_MEM_FRACTION"}
    proc = subprocess.run([sys.executable, "-c", body], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**env, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.split() == ["0.92"], proc.stderr[-2000:]
    proc = _run_script(body, env={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.4"}, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["0.4"], proc.stderr[-2000:]


def test_pallas_backend_without_a_gpu_names_the_cpu_backend(tiny_dir):
    import jax

    if jax.default_backend() == "gpu":
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="'xla'.*pallas_interpret"):
        LLM(model=str(tiny_dir("llama")), skip_tokenizer_init=True, backend="pallas")


@pytest.mark.parametrize("source", ["tiny", "gguf", "8b"])
def test_llama_configs_read_without_transformers_match_transformers(source, tiny_dir, smollm2_path):
    """A plain Llama config.json is read without transformers' config classes (they import torch):
    the same ModelConfig as through them."""
    from transformers import AutoConfig

    from jaxllm.checkpoints import gguf, hf
    from jaxllm.models import config_from_hf_dict, config_from_hf_object

    if source == "tiny":
        config = hf.read_config_dict(tiny_dir("llama"))
    elif source == "gguf":
        config = gguf.hf_config_dict(smollm2_path)
    else:
        config = json.loads((ROOT / "benchmarks" / "configs" / "llama-3.1-8b" / "config.json").read_text())
    fields = {k: v for k, v in config.items() if k != "model_type"}
    via_transformers = config_from_hf_object(AutoConfig.for_model(config.get("model_type", "llama"), **fields))
    assert config_from_hf_dict(config) == via_transformers
