"""Bad input refused at the boundary with the engine still serving, and nothing an LLM held left
behind once it is shut down (issue 19)."""

import gc
import json
import time
import weakref

import numpy as np
import pytest

from jaxllm import LLM, PreprocessedInputs, SamplingParams
from jaxllm.engine import kv_planner
from tests import tiny

PROMPT = [5, 17, 42, 99, 3]
OK = SamplingParams(max_tokens=2, ignore_eos=True)


class CharTokenizer:
    """One token per character (ids 3..VOCAB-1), BOS 1 leading when add_special_tokens."""

    bos_token_id, eos_token_id = 1, 2

    def encode(self, text, add_special_tokens=True):
        return [self.bos_token_id] * add_special_tokens + [3 + ord(c) % (tiny.VOCAB - 3) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i - 3 + 97) if i >= 3 else "" for i in ids)


@pytest.fixture(scope="module")
def llm(tiny_dir):
    """The tiny Llama with a tokenizer, max_batch_size=4."""
    with LLM(model=str(tiny_dir("llama")), tokenizer=CharTokenizer(), dtype="float32", max_batch_size=4,
             max_num_tokens=64) as engine:  # fmt: skip
        yield engine


def assert_serving(llm):
    assert len(llm.generate(PROMPT, OK, use_tqdm=False).outputs[0].token_ids) == 2


def write_config(path, **fields):
    """A config.json alone (for load_format='dummy'): the tiny Llama's sizes with `fields` changed."""
    path.mkdir(parents=True, exist_ok=True)
    config = dict(tiny.COMMON, model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                  rms_norm_eps=1e-6, tie_word_embeddings=False, **fields)  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_weights_that_cannot_fit_are_refused_before_anything_is_built(llm, tmp_path):
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"weights need an estimated [\d,]+ bytes .*more than the [\d,]+ bytes .*the "
                                         r"host has available"):  # fmt: skip
        LLM(model=str(write_config(tmp_path / "huge", num_hidden_layers=10**7)), load_format="dummy",
            skip_tokenizer_init=True)  # fmt: skip
    assert time.perf_counter() - started < 20  # it ran 85 s into a MemoryError
    assert_serving(llm)


class Gpu:
    """A GPU as the KV planner sees it: 100 GiB its allocator may hold, 10 GiB in use."""

    platform, process_index, device_kind = "gpu", 0, "H200"
    stats = {"bytes_limit": 100 << 30, "bytes_in_use": 10 << 30}

    def memory_stats(self):
        return self.stats


class GpuWithoutStats(Gpu):
    """XLA_PYTHON_CLIENT_ALLOCATOR=platform: the allocator keeps no statistics."""

    stats = None


def test_weights_fit_check_on_a_gpu_compares_each_devices_share():
    kv_planner.check_weights_fit(80 << 30, [Gpu()])
    kv_planner.check_weights_fit(160 << 30, [Gpu(), Gpu()], tensor_parallel_size=2)
    share = r"107,374,182,400 bytes \(100.00 GiB\) per device \(2-way tensor parallel\), more than the "
    with pytest.raises(ValueError, match=share + r"96,636,764,160 bytes \(90.00 GiB\) each of the 2 devices"):
        kv_planner.check_weights_fit(200 << 30, [Gpu(), Gpu()], tensor_parallel_size=2)
    with pytest.raises(ValueError, match=r"the device \(H200\) has available"):
        kv_planner.check_weights_fit(95 << 30, [Gpu()])


def test_a_gpu_without_memory_statistics_takes_max_tokens_or_a_warned_default(caplog):
    """XLA_PYTHON_CLIENT_ALLOCATOR=platform keeps no statistics: the cache cannot be sized from the free
    memory, so max_tokens sizes it (it used to be capped by the CPU's 1 GiB budget) or a warning says why not."""
    from pathlib import Path

    from jaxllm.checkpoints import loader
    from jaxllm.llm_args import KvCacheConfig

    configs = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"
    cfg = loader.read_config(loader.resolve(str(configs / "llama-3.1-8b")))
    per_token = kv_planner.bytes_per_token(cfg, "bfloat16")
    big, gpu = KvCacheConfig(max_tokens=200_000), GpuWithoutStats()
    assert kv_planner.plan_num_pages(cfg, "bfloat16", 32, big, 8192, 2048, devices=[gpu]) == 200_000 // 32 + 1
    with caplog.at_level("WARNING", logger="jaxllm.engine.kv_planner"):
        pages = kv_planner.plan_num_pages(cfg, "bfloat16", 32, KvCacheConfig(), 8192, 2048, devices=[gpu])
    assert pages == (1 << 30) // per_token // 32 + 1
    assert "reports no memory statistics" in caplog.text and "kv_cache_config.max_tokens" in caplog.text


def test_a_dict_prompt_whose_text_and_token_ids_disagree_is_refused(llm):
    text = "hello"
    tok = CharTokenizer()
    for ids in (tok.encode(text), tok.encode(text, add_special_tokens=False)):  # they agree: accepted
        out = llm.generate({"prompt": text, "prompt_token_ids": ids}, OK, use_tqdm=False)
        assert out.prompt == text and out.prompt_token_ids == ids
    disagree = r"prompt 1: 'prompt' and 'prompt_token_ids' disagree: the text tokenizes to 6 tokens .* and "
    with pytest.raises(ValueError, match=disagree + r"prompt_token_ids has 3 .*differ from position 1"):
        llm.generate([PROMPT, {"prompt": text, "prompt_token_ids": [1, 50, 51]}], OK)
    with pytest.raises(TypeError, match="'prompt' must be a str or None"):
        llm.generate({"prompt": 7, "prompt_token_ids": PROMPT}, OK)
    assert_serving(llm)


def test_embedding_bias_must_be_finite_and_leave_a_token(llm):
    vocab = tiny.VOCAB
    with pytest.raises(ValueError, match=r"embedding_bias\[3\]=nan is not finite in float32 \(1 such entries\)"):
        SamplingParams(embedding_bias=np.where(np.arange(vocab) == 3, np.nan, 0.0))
    with pytest.raises(ValueError, match=r"embedding_bias\[0\]=inf is not finite"):
        SamplingParams(embedding_bias=np.full(vocab, 1e39))  # overflows float32
    with pytest.raises(ValueError, match=f"-inf for all {vocab} tokens, which bans every token"):
        SamplingParams(embedding_bias=np.full(vocab, -np.inf))
    with pytest.raises(TypeError, match="embedding_bias must be a float array-like"):
        SamplingParams(embedding_bias=["a"] * vocab)
    only_7 = np.where(np.arange(vocab) < 8, 0.0, -np.inf)  # tokens 0..7 allowed, then bad_token_ids ban 0..7
    ban_all = rf"prompt 0: embedding_bias \(-inf entries\) and bad_token_ids ban all {vocab} tokens"
    with pytest.raises(ValueError, match=ban_all):
        llm.generate(PROMPT, SamplingParams(embedding_bias=only_7, bad_token_ids=list(range(8)), max_tokens=2))
    with pytest.raises(ValueError, match=f"bad_token_ids ban all {vocab} tokens"):
        llm.generate(PROMPT, SamplingParams(bad_token_ids=list(range(vocab)), max_tokens=2))
    tok = CharTokenizer()  # a bad string of the one token left (id 7) bans it too
    with pytest.raises(ValueError, match=f"the bad strings .* ban all {vocab} tokens"):
        llm.generate(PROMPT, SamplingParams(embedding_bias=only_7, bad_token_ids=list(range(7)),
                                            bad=[c for c in map(chr, range(vocab)) if tok.encode(c, False) == [7]]))
    ban_but_7 = SamplingParams(embedding_bias=only_7, bad_token_ids=list(range(7)), max_tokens=4, ignore_eos=True)
    assert llm.generate(PROMPT, ban_but_7, use_tqdm=False).outputs[0].token_ids == [7] * 4
    assert_serving(llm)


def test_n_and_best_of_are_bounded_by_max_batch_size(llm):
    for params, message in [
        (SamplingParams(n=10**4, temperature=1.0), r"n=10000 exceeds max_batch_size=4; allowed: n <= best_of <= 4"),
        (SamplingParams(n=2, best_of=5, temperature=1.0), r"best_of=5 exceeds max_batch_size=4"),
    ]:
        started = time.perf_counter()
        with pytest.raises(ValueError, match=message):
            llm.generate([PROMPT, PROMPT], params)
        with pytest.raises(ValueError, match=message):
            llm.generate_async(PROMPT, params)
        with pytest.raises(ValueError, match=message):
            llm.preprocess(PROMPT, params)
        with pytest.raises(ValueError, match=message):  # preprocessed elsewhere (an LLM with a larger batch)
            llm.generate(PreprocessedInputs(None, tuple(PROMPT), params))
        assert time.perf_counter() - started < 5
    out = llm.generate(PROMPT, SamplingParams(n=4, temperature=1.0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(out.outputs) == 4
    assert_serving(llm)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status")


def test_llm_lifetimes_leave_no_memory_and_no_engine_behind(tmp_path):
    """Make, use and shut down an LLM of ~20 MB of weights and ~190 MB of KV cache five times in
    this process. Before the fix, glibc kept what the engine's threads had freed: RSS after shutdown
    stayed 230-380 MB above where it started (each shutdown gave back 1-134 MB of the ~290 MB), and
    grew from one lifetime to the next (1.0 -> 2.2 GB over 8 lifetimes of SmolLM2); now each shutdown
    gives back ~200 MB and RSS settles within ~60-90 MB of the start (first-use caches, arenas)."""
    from jaxllm.engine.builder import release_host_memory

    model = write_config(tmp_path / "small", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=64, vocab_size=4096)  # fmt: skip
    release_host_memory()  # what earlier tests freed, so that the start is this process's real use
    start = _rss_mb()
    engines, alive, after = [], [], []
    for _ in range(5):
        llm = LLM(model=str(model), load_format="dummy", dtype="float32", skip_tokenizer_init=True,
                  max_batch_size=16, max_num_tokens=64)  # fmt: skip
        assert llm.generate(PROMPT, OK, use_tqdm=False).outputs[0].token_ids
        engines.append(weakref.ref(llm._engine))
        alive.append(_rss_mb())
        llm.shutdown()
        del llm
        gc.collect()
        after.append(_rss_mb())
        assert not any(ref() is not None for ref in engines), "an engine outlived its LLM's shutdown"
    footprint = max(alive) - start
    print(f"RSS MB: start {start:.0f}, alive {[round(x) for x in alive]}, after shutdown {[round(x) for x in after]}")
    assert footprint > 100  # the engine's memory is visible, so what follows measures something
    # Nothing the engines held stays: RSS goes back near the start (first-use caches aside).
    assert max(after) - start < footprint / 2
    # And does not creep up from one lifetime to the next once warm (glibc's arenas still settle by a
    # few MB a lifetime over the first ten; an engine kept alive would add its programs and state).
    assert (after[-1] - after[1]) / (len(after) - 2) < 20


def test_cpu_kv_cache_holds_whole_pages_of_every_sequence():
    """On the CPU the cache is bounded by max_batch_size sequences of max_seq_len tokens, in whole
    pages: 52 tokens at page 32 need 2 pages (not 52 // 32 = 1 of the rounded-down token bound)."""
    from pathlib import Path

    from jaxllm.checkpoints import loader
    from jaxllm.llm_args import KvCacheConfig

    configs = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"
    cfg = loader.read_config(loader.resolve(str(configs / "smollm2-135m")))
    pages = kv_planner.plan_num_pages(cfg, "float32", 32, KvCacheConfig(), max_num_tokens=64, max_batch_size=1,
                                      max_seq_len=52)  # fmt: skip
    assert pages == 1 + 2  # page 0 (reserved) and the sequence's two
    pages = kv_planner.plan_num_pages(cfg, "float32", 32, KvCacheConfig(), max_num_tokens=64, max_batch_size=3,
                                      max_seq_len=64)  # fmt: skip
    assert pages == 1 + 3 * 2


def test_a_shut_down_engine_still_refuses_submits_and_takes_aborts(tiny_dir):
    """Shutdown takes the engine apart (its attributes emptied, breaking its reference cycles), all
    but what a caller racing it may touch: a submit through an engine reference taken before the
    shutdown raises EngineShutdown, an abort is a no-op, and the engine is freed at once."""
    from jaxllm.engine.postprocess import EngineShutdown

    llm = LLM(model=str(tiny_dir("llama")), dtype="float32", skip_tokenizer_init=True, max_batch_size=4,
              max_num_tokens=64)  # fmt: skip
    out = llm.generate(PROMPT, OK, use_tqdm=False)
    engine = llm._engine
    gone = weakref.ref(engine.runner)
    llm.shutdown()
    assert gone() is None  # freed by reference counting, before any collection
    with pytest.raises(EngineShutdown, match="shut down"):
        engine.submit()
    engine.abort(out.request_id)
    with pytest.raises(EngineShutdown, match="shut down"):
        llm.generate(PROMPT, OK, use_tqdm=False)
