"""The engine under load: batch invariance, preemption, aborts, concurrency, seeds, compilations."""

import asyncio
import threading
import time

import jax
import numpy as np
import pytest

from jaxllm import KvCacheConfig, LLM, SamplingParams
from jaxllm.engine import scheduler

MIXED = [[5, 17, 42, 99, 3, 250, 7], [11], [300, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26],
         [8, 9, 10, 60, 61, 62], [77] * 40, [1, 2, 3], list(range(100, 133)), [45, 46],
         [200, 201, 202, 203, 204, 205, 206, 207, 208, 209], [9] * 3, [150, 151, 152, 153, 154], [31, 32, 33, 34]]  # fmt: skip


def _params(i):
    """A mix of greedy, seeded sampling, logprobs, penalties and truncation."""
    kinds = [
        SamplingParams(max_tokens=12, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=0.8, seed=1000 + i, ignore_eos=True),
        SamplingParams(max_tokens=10, top_k=5, top_p=0.9, seed=i, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=7, repetition_penalty=1.3, presence_penalty=0.5, ignore_eos=True),
    ]
    return kinds[i % len(kinds)]


def _tokens(outs):
    return [[o.token_ids for o in out.outputs] for out in outs]


def test_batch_invariance_and_seeded_reproducibility(tiny_llm):
    llm = tiny_llm("llama")
    params = [_params(i) for i in range(len(MIXED))]
    together = _tokens(llm.generate(MIXED, params, use_tqdm=False))
    for i in (0, 1, 2, 3, 5, 11):
        alone = _tokens([llm.generate(MIXED[i], params[i], use_tqdm=False)])[0]
        assert alone == together[i], f"request {i} differs alone vs in a batch"
    # Another composition: reversed order, seeded ones give the same tokens again.
    reversed_outs = _tokens(llm.generate(MIXED[::-1], params[::-1], use_tqdm=False))[::-1]
    assert reversed_outs == together


def test_a_batch_reaches_the_scheduler_together(tiny_llm):
    """generate's prompts are admitted in one iteration, however the engine thread is woken between
    them: a batch's composition decides its rounding, so a batch split by thread timing could give
    other log-probabilities from one call to the next. Here each queue put is followed by a pause in
    which the engine runs."""
    llm = tiny_llm("llama")
    engine = llm._engine
    inbox = engine._inbox

    class SlowInbox:
        def put(self, item):
            inbox.put(item)
            engine._wake.set()
            time.sleep(0.2)

        def __getattr__(self, name):
            return getattr(inbox, name)

    llm.get_stats()
    engine._inbox = SlowInbox()
    try:
        llm.generate(MIXED[:5], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    finally:
        engine._inbox = inbox
    first = llm.get_stats()[0]["inflightBatchingStats"]
    assert first["numContextRequests"] == 5, first


def test_preemption_under_a_tiny_kv_budget_gives_the_same_outputs(tiny_dir, tiny_llm, monkeypatch):
    # Requests of known length (ignore_eos) that preempt: MAX_UTILIZATION's projection of their growth
    # (scheduler.SureGrowth) would hold them back instead, so it is off here.
    monkeypatch.setattr(scheduler, "PROJECT_SURE_GROWTH", False)
    prompts = [list(range(10 + i, 40 + i)) for i in range(6)]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    reference = _tokens(tiny_llm("qwen2").generate(prompts, params, use_tqdm=False))
    small = KvCacheConfig(max_tokens=96, tokens_per_block=8)  # 12 pages for 6 sequences of 54 tokens
    with LLM(model=str(tiny_dir("qwen2")), dtype="float32", skip_tokenizer_init=True, max_batch_size=8,
             max_num_tokens=64, max_seq_len=64, kv_cache_config=small) as llm:  # fmt: skip
        outs = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.get_stats()
        assert _tokens(outs) == reference
        assert sum(s["inflightBatchingStats"]["numPausedRequests"] for s in stats) > 0, "nothing was preempted"
        bm = llm._engine.block_manager
        assert bm.num_free_blocks == bm.num_usable_blocks


def test_chunked_prefill_off_gives_the_same_outputs(tiny_dir, tiny_llm):
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    reference = _tokens(tiny_llm("mistral").generate(MIXED[:6], params, use_tqdm=False))
    with LLM(model=str(tiny_dir("mistral")), dtype="float32", skip_tokenizer_init=True, max_batch_size=4,
             max_num_tokens=48, enable_chunked_prefill=False) as llm:  # fmt: skip
        assert _tokens(llm.generate(MIXED[:6], params, use_tqdm=False)) == reference
    with LLM(model=str(tiny_dir("mistral")), dtype="float32", skip_tokenizer_init=True, max_batch_size=4,
             max_num_tokens=16) as llm:  # every long prompt is chunked
        assert _tokens(llm.generate(MIXED[:6], params, use_tqdm=False)) == reference


def test_abort_frees_pages(tiny_llm):
    llm = tiny_llm("llama")
    bm = llm._engine.block_manager
    free_before = bm.num_free_blocks
    future = llm.generate_async(MIXED[2], SamplingParams(max_tokens=400, ignore_eos=True), streaming=True)
    seen = 0
    for partial in future:
        seen += len(partial.outputs[0].token_ids_diff)
        if seen >= 3:
            future.abort()
            break
    result = future.result(timeout=30)
    assert result.outputs[0].finish_reason == "cancelled" and future.aborted()
    deadline = time.time() + 10
    while bm.num_free_blocks != free_before and time.time() < deadline:
        time.sleep(0.01)
    assert bm.num_free_blocks == free_before


def test_200_concurrent_async_requests_from_threads_and_asyncio(tiny_llm):
    llm = tiny_llm("gemma3")
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(3, 300, size=int(rng.integers(1, 30)))] for _ in range(200)]
    params = [_params(i) for i in range(200)]
    results: dict[int, object] = {}

    def submit(indices):
        futures = {i: llm.generate_async(prompts[i], params[i]) for i in indices}
        for i, f in futures.items():
            results[i] = f.result(timeout=300)

    threads = [threading.Thread(target=submit, args=(range(k, 100, 4),)) for k in range(4)]
    for t in threads:
        t.start()

    async def main():
        futures = [llm.generate_async(prompts[i], params[i], streaming=(i % 2 == 0)) for i in range(100, 200)]
        outs = []
        for i, f in zip(range(100, 200), futures):
            if i % 2 == 0:
                async for _ in f:
                    pass
                outs.append(f)
            else:
                outs.append(await f)
        return outs

    for i, out in zip(range(100, 200), asyncio.run(main())):
        results[i] = out
    for t in threads:
        t.join()
    assert sorted(results) == list(range(200))
    for i, out in results.items():
        assert out.finished and len(out.outputs[0].token_ids) == params[i].max_tokens, i


def test_compilations_are_bounded_by_buckets(tiny_dir):
    with LLM(model=str(tiny_dir("qwen3")), dtype="float32", skip_tokenizer_init=True, max_batch_size=8,
             max_num_tokens=64) as llm:  # fmt: skip
        runner = llm._engine.runner
        llm.generate(MIXED, SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
        first = runner.num_compilations
        llm.generate(MIXED[::-1] + MIXED[:3], SamplingParams(max_tokens=9, ignore_eos=True), use_tqdm=False)
        assert set(runner.executables) <= set(runner.bucket_shapes())
        assert runner.num_compilations <= len(runner.bucket_shapes())
        assert first >= 1


def test_tensorrt_backend_compiles_ahead_and_saved_engines_start_without_compiling(tiny_dir, tmp_path):
    args = dict(dtype="float32", skip_tokenizer_init=True, max_batch_size=2, max_num_tokens=16, max_seq_len=48)
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    with LLM(model=str(tiny_dir("llama")), backend="tensorrt", **args) as llm:
        runner = llm._engine.runner
        assert set(runner.bucket_shapes()) <= set(runner.executables)
        count = runner.num_compilations
        expected = _tokens(llm.generate(MIXED[:2], params, use_tqdm=False))
        assert runner.num_compilations == count  # nothing compiled at request time
        llm.save(tmp_path / "engine")
    with LLM(model=str(tmp_path / "engine"), skip_tokenizer_init=True) as again:
        runner = again._engine.runner
        assert runner.num_compilations == 0 and len(runner.executables) >= count  # loaded, not compiled
        assert _tokens(again.generate(MIXED[:2], params, use_tqdm=False)) == expected
        assert runner.num_compilations == 0


def test_n_and_best_of_share_prompt_pages(tiny_llm):
    llm = tiny_llm("llama")
    llm.get_stats()
    prompt = list(range(20, 60))  # 40 tokens: full pages to share
    out = llm.generate(prompt, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True),
                       use_tqdm=False)  # fmt: skip
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert max(s["kvCacheStats"]["reusedBlocks"] for s in llm.get_stats()) > 0
    best = llm.generate(prompt, SamplingParams(n=2, best_of=5, temperature=1.0, seed=7, max_tokens=6,
                                               ignore_eos=True, logprobs=0), use_tqdm=False)  # fmt: skip
    assert len(best.outputs) == 2
    all5 = llm.generate(prompt, SamplingParams(n=5, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True),
                        use_tqdm=False)  # fmt: skip
    top2 = sorted(all5.outputs, key=lambda o: -o.cumulative_logprob)[:2]
    assert sorted(tuple(o.token_ids) for o in best.outputs) == sorted(tuple(o.token_ids) for o in top2)


def test_two_row_decode_buckets_give_the_same_tokens(tiny_llm):
    """GPUs pad batch-1 decode steps to two rows (runner.GPU_MIN_DECODE_ROWS); the padding row changes nothing."""
    import dataclasses

    from jaxllm.engine.buckets import ForwardShape
    from jaxllm.engine.runner import ModelRunner

    llm = tiny_llm("llama")
    runner = llm._engine.runner
    config = dataclasses.replace(runner.config, min_decode_rows=2, max_batch_size=1)
    assert ModelRunner(runner.cfg, runner.params, config).seq_buckets == [2]
    assert runner.seq_buckets[0] == 1  # the CPU keeps one-row steps
    params = SamplingParams(max_tokens=10, ignore_eos=True, logprobs=2)
    one_row = llm.generate(MIXED[0], params, use_tqdm=False).outputs[0]
    buckets = runner.buckets
    runner.buckets = dataclasses.replace(buckets, min_decode_rows=2)  # what a GPU engine of this size has
    try:
        two_rows = llm.generate(MIXED[0], params, use_tqdm=False).outputs[0]
    finally:
        runner.buckets = buckets
    assert any(isinstance(s, ForwardShape) and s.num_seqs == 2 and s.decode_steps == 1 for s in runner.executables)
    assert two_rows.token_ids == one_row.token_ids
    for a, b in zip(two_rows.logprobs, one_row.logprobs):
        assert {t: round(x.logprob, 4) for t, x in a.items()} == {t: round(x.logprob, 4) for t, x in b.items()}


def test_few_sequences_in_a_wide_mixed_step_take_the_narrow_program(tiny_llm, monkeypatch):
    """A mixed step of many tokens and few sequences runs the program of B = FEW_SEQS slots
    (engine/buckets.py), not min(T, max_batch_size): same tokens and log-probabilities."""
    from jaxllm.engine import buckets as buckets_lib
    from jaxllm.engine.buckets import Buckets, ForwardShape

    wide = Buckets(max_num_tokens=8192, max_batch_size=2048, max_seq_len=4096, page_size=16, backend="pallas")
    assert wide.forward_shape([2048], 128) == ForwardShape(2048, 256, 256, 2048)  # a lone long prompt
    assert wide.forward_shape([1] * 300 + [1700], 128).num_seqs == 2048  # many sequences: the full width
    assert wide.forward_shape([100] * 5, 128).num_seqs == 512  # under FEW_SEQS_MIN_TOKENS: one width
    assert ForwardShape(8192, 256, 256, 8192) in wide.all_shapes() and 256 in wide.sampler_rows

    llm = tiny_llm("llama")
    runner = llm._engine.runner
    params = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2)
    prompts = [list(range(20, 60)), list(range(30, 75)), list(range(5, 40))]
    full = llm.generate(prompts, params, use_tqdm=False)
    monkeypatch.setattr(buckets_lib, "FEW_SEQS", 4)  # this engine's mixed steps of >= 32 tokens: B = 4
    monkeypatch.setattr(buckets_lib, "FEW_SEQS_MIN_TOKENS", 32)
    few = llm.generate(prompts, params, use_tqdm=False)
    assert any(isinstance(s, ForwardShape) and s.num_tokens >= 32 and s.num_seqs == 4 for s in runner.executables)
    for a, b in zip(few, full):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert {t: round(v.logprob, 4) for t, v in x.items()} == {t: round(v.logprob, 4) for t, v in y.items()}


def test_host_inputs_travel_as_one_buffer_and_come_back_bit_exact():
    """A step's host inputs are packed into one uint32 buffer (one transfer per device) and split on
    the device: every leaf comes back with its shape, dtype and bits (NaN payloads and the high bit
    of uint32 seeds included); a leaf that is not 32-bit is refused, not converted."""
    import jax.numpy as jnp

    from jaxllm.engine.programs import unpack_host_inputs
    from jaxllm.engine.step_inputs import host_layout, pack_host_inputs
    from jaxllm.layers.sampling import SamplingBatch

    rng = np.random.default_rng(0)
    sampling = SamplingBatch(
        temperature=np.array([0.7, np.nan, -0.0], np.float32), top_k=np.array([1, -1, 5], np.int32),
        top_p=rng.uniform(size=3).astype(np.float32), min_p=np.zeros(3, np.float32),
        seeds=np.array([[0xFFFFFFFF, 1], [2, 0x80000000], [3, 4]], np.uint32), counters=np.arange(3, dtype=np.int32),
        bias_slots=np.zeros(3, np.int32), banned_tokens=np.zeros((3, 0), np.int32), num_logprobs=2, flavor="full",
    )  # fmt: skip
    tree = (sampling, rng.integers(-5, 5, size=(4, 2)).astype(np.int32))
    flat = pack_host_inputs(tree)
    layout = host_layout(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree))
    assert flat.dtype == np.uint32 and flat.size == sum(a.size for a in jax.tree.leaves(tree))
    back = jax.jit(unpack_host_inputs, static_argnums=(1,))(jnp.asarray(flat), layout)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
        got = np.asarray(got)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()
    with pytest.raises(TypeError, match="32-bit"):
        pack_host_inputs((np.zeros(2, np.int64),))
