"""Multi-step decoding (num_scheduler_steps): several decodes per dispatch give exactly the tokens,
log-probabilities and finish reasons of one decode per dispatch."""

import jax
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.engine import scheduler

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 12], list(range(100, 133)), [45, 46, 47, 48], [9] * 20]


def _outputs(outs):
    return [[(o.token_ids, o.finish_reason, o.stop_reason, [sorted((t, round(l.logprob, 5)) for t, l in e.items())
                                                            for e in (o.logprobs or [])]) for o in out.outputs]
            for out in outs]  # fmt: skip


def _assert_same_outputs(got, want, atol=1e-4):
    """`_outputs` of two runs: the same tokens, finish and stop reasons and logprob tokens, the
    logprob values within atol (on GPUs two programs' float32 sums may round differently)."""
    assert len(got) == len(want)
    for g_out, w_out in zip(got, want):
        assert len(g_out) == len(w_out)
        for (g_ids, g_finish, g_stop, g_lp), (w_ids, w_finish, w_stop, w_lp) in zip(g_out, w_out):
            assert (g_ids, g_finish, g_stop) == (w_ids, w_finish, w_stop)
            assert [[t for t, _ in e] for e in g_lp] == [[t for t, _ in e] for e in w_lp]
            assert all(abs(a - b) < atol for ge, we in zip(g_lp, w_lp) for (_, a), (_, b) in zip(ge, we))


def _all_flavors(llm) -> LLM:
    """`llm` with multi-step decodes of every sampling flavor, as on GPUs (the CPU compiles only the
    "plain" one, engine/buckets.py)."""
    import dataclasses

    from jaxllm.engine.buckets import MULTI_STEP_FLAVORS

    runner = llm._engine.runner
    runner.buckets = dataclasses.replace(runner.buckets, multi_step_flavors=MULTI_STEP_FLAVORS)
    return llm


def _params(stop_token: int):
    return [
        SamplingParams(max_tokens=21, ignore_eos=True),  # greedy, not a multiple of the step count
        SamplingParams(max_tokens=13, temperature=0.9, seed=5, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=30, top_k=7, top_p=0.8, seed=9, ignore_eos=True),
        SamplingParams(max_tokens=30, stop_token_ids=[stop_token]),  # stops inside a multi-step run
        SamplingParams(max_tokens=11, repetition_penalty=1.3, ignore_eos=True),  # needs the host each token
    ]


def test_multi_step_decoding_matches_single_steps(tiny_llm):
    single = tiny_llm("llama", num_scheduler_steps=1)
    multi = _all_flavors(tiny_llm("llama"))  # the default: up to 8 decodes per dispatch
    assert multi._engine.decode_steps == 8 and single._engine.decode_steps == 1
    greedy = single.generate(PROMPTS[3], SamplingParams(max_tokens=30, ignore_eos=True), use_tqdm=False)
    stop_token = greedy.outputs[0].token_ids[12]
    params = _params(stop_token)
    expected = _outputs(single.generate(PROMPTS, params, use_tqdm=False))
    assert expected[3][0][1] == "stop" and len(expected[3][0][0]) < 30
    multi.get_stats()
    _assert_same_outputs(_outputs(multi.generate(PROMPTS, params, use_tqdm=False)), expected)
    stats = multi.get_stats()
    assert max(s["dispatch"]["numSteps"] for s in stats) > 1
    assert len({s["dispatch"]["id"] for s in stats}) < len(stats)  # fewer dispatches than iterations
    # One request at a time too (the step count is then each sequence's own).
    for prompt, p, e in zip(PROMPTS, params, expected):
        # (a request alone runs other programs than the batch: log-probabilities to their rounding)
        _assert_same_outputs(_outputs([multi.generate(prompt, p, use_tqdm=False)]), [e])
    bm = multi._engine.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks


def test_multi_step_fills_max_seq_len_and_frees_pages(tiny_dir):
    args = dict(dtype="float32", skip_tokenizer_init=True, max_batch_size=4, max_num_tokens=64, max_seq_len=48)
    params = SamplingParams(max_tokens=18, ignore_eos=True)
    prompts = [list(range(30, 60)), list(range(7, 12))]  # the first ends at max_seq_len, mid-run
    got = {}
    for steps in (1, 8):
        with LLM(model=str(tiny_dir("qwen3")), num_scheduler_steps=steps, **args) as llm:
            got[steps] = _outputs(llm.generate(prompts, params, use_tqdm=False))
            bm = llm._engine.block_manager
            assert not any(seq.block_table for r in llm._engine.requests.values() for seq in r.sequences)
            assert bm.num_free_blocks == bm.num_usable_blocks
    assert got[8] == got[1]
    assert len(got[1][0][0][0]) == 48 - 30 and got[1][0][0][1] == "length"


@pytest.mark.parametrize("steps", [1, 8])
def test_stats_count_every_decoded_token(tiny_llm, steps):
    """One prefill iteration, then one decode iteration per token, the last one included (stats are
    recorded before the outputs are posted), whether the decodes ran one or eight per dispatch."""
    llm = tiny_llm("llama", num_scheduler_steps=steps)
    llm.get_stats()
    llm.generate([300, 301, 302, 303, 304], SamplingParams(max_tokens=13, ignore_eos=True), use_tqdm=False)
    entries = llm.get_stats()
    stats = [s["inflightBatchingStats"] for s in entries]
    assert [s["numContextRequests"] for s in stats] == [1] + [0] * (len(stats) - 1)
    assert sum(s["avgNumDecodedTokensPerIter"] for s in stats[1:]) == 12
    assert len(stats) == 13  # a prefill, then 12 decode iterations
    dispatches = [s["dispatch"]["id"] for s in entries]
    assert len(set(dispatches)) == (13 if steps == 1 else 3)  # 12 single decodes, or runs of 8 and 4


def test_multi_step_streams_every_token_in_order(tiny_llm):
    llm = tiny_llm("llama")
    params = SamplingParams(max_tokens=19, ignore_eos=True)
    final = llm.generate(PROMPTS[0], params, use_tqdm=False).outputs[0].token_ids
    seen, chunks = [], 0
    for out in llm.generate_async(PROMPTS[0], params, streaming=True):
        seen = list(out.outputs[0].token_ids)
        chunks += 1
    assert seen == final and chunks >= 2


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 (virtual) devices")
def test_multi_step_under_tensor_parallelism(tiny_dir, tiny_llm):
    params = _params(stop_token=2)[:3] + _params(2)[4:]
    expected = _outputs(tiny_llm("llama", num_scheduler_steps=1).generate(PROMPTS[:4], params, use_tqdm=False))
    with LLM(model=str(tiny_dir("llama")), dtype="float32", skip_tokenizer_init=True, tensor_parallel_size=2,
             max_batch_size=8, max_num_tokens=64) as llm:  # fmt: skip
        got = _outputs(_all_flavors(llm).generate(PROMPTS[:4], params, use_tqdm=False))
        assert max(s["dispatch"]["numSteps"] for s in llm.get_stats()) > 1
    _assert_same_outputs(got, expected)  # float32 on one device and on two: log-probabilities to rounding


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 (virtual) devices")
def test_one_graph_decode_compiles_small_multi_step_decodes_with_its_options(tiny_dir, caplog):
    """Under TP on GPUs small multi-step decodes are compiled as one CUDA graph; elsewhere, and for
    single-step or wider decodes, with XLA's defaults. On and off give the same tokens (on the CPU,
    where XLA ignores GPU options, this checks that the step compiles with them)."""
    import dataclasses

    from jaxllm.engine.buckets import ForwardShape as Shape
    from jaxllm.engine.buckets import ONE_GRAPH_OPTIONS

    params = SamplingParams(max_tokens=20, ignore_eos=True)
    with LLM(model=str(tiny_dir("llama")), dtype="float32", skip_tokenizer_init=True, tensor_parallel_size=2,
             max_batch_size=8, max_num_tokens=64) as llm:  # fmt: skip
        runner = llm._engine.runner
        P = runner.page_buckets[0]
        small, wide, single = (Shape(2, 2, P, 1, decode_steps=8, sampling="plain"),
                               Shape(4, 4, P, 1, decode_steps=8, sampling="plain"), Shape(2, 2, P, 1))  # fmt: skip
        assert (runner.compiler_options(small) == ONE_GRAPH_OPTIONS) == (jax.devices()[0].platform == "gpu")
        got = {}
        for on in (False, True):
            runner.config = dataclasses.replace(runner.config, one_graph_decode=on)
            runner.executables.clear()
            assert (runner.compiler_options(small) == ONE_GRAPH_OPTIONS) is on
            assert runner.compiler_options(wide) is None and runner.compiler_options(single) is None
            got[on] = _outputs([llm.generate(PROMPTS[0], params, use_tqdm=False)])
            assert any(isinstance(s, Shape) and s.decode_steps == 8 and s.num_seqs <= 2 for s in runner.executables)
        assert got[True] == got[False]
        # An XLA that lacks one of the options compiles the step with its defaults, and says so.
        runner.executables.clear()
        with pytest.MonkeyPatch.context() as mp, caplog.at_level("WARNING", logger="jaxllm.engine"):
            mp.setitem(ONE_GRAPH_OPTIONS, "xla_no_such_option_here", 1)
            assert _outputs([llm.generate(PROMPTS[0], params, use_tqdm=False)]) == got[True]
        assert "No such compile option" in caplog.text and "xla_no_such_option_here" in caplog.text


def test_full_multi_step_decodes_are_compiled_up_to_their_row_cap():
    """The "full" flavor's multi-step buckets stop at multi_step_full_max_rows, "plain" ones do not;
    a wider truncating batch has no multi-step program and none is listed for it."""
    from jaxllm.engine.buckets import Buckets, ForwardShape

    buckets = Buckets(max_num_tokens=256, max_batch_size=128, max_seq_len=512, page_size=16, min_decode_rows=2,
                      decode_steps=8, multi_step_full_max_rows=16)  # fmt: skip
    assert buckets.multi_step_rows("plain") == [2, 4, 8, 16, 32, 64, 128]
    assert buckets.multi_step_rows("full") == [2, 4, 8, 16]
    assert buckets.multi_step_rows("penalties") == []
    multi = [s for s in buckets.all_shapes() if isinstance(s, ForwardShape) and s.decode_steps > 1]
    assert sorted(s.num_seqs for s in multi if s.sampling == "full") == [2, 4, 8, 16]
    assert buckets.forward_shape([1] * 9, 3, decode_steps=8, sampling="full").num_seqs == 16
    with pytest.raises(ValueError):
        buckets.forward_shape([1] * 17, 3, decode_steps=8, sampling="full")


@pytest.mark.parametrize("quant_algo", [None, "FP8", "W4A16"])
def test_triton_gemms_only_in_few_row_forward_programs_on_gpus(tiny_llm, monkeypatch, quant_algo):
    """XLA's defaults on the CPU; on a GPU every program but a forward of at most
    TRITON_GEMM_MAX_ROWS tokens (a quantized model's: QUANTIZED_TRITON_GEMM_MAX_ROWS, its weight-only
    decode steps) is compiled without Triton GEMMs (benchmarks/RESULTS.md)."""
    import dataclasses
    import types

    from jaxllm.engine.buckets import (NO_TRITON_GEMM_OPTIONS, QUANTIZED_TRITON_GEMM_MAX_ROWS, TRITON_GEMM_MAX_ROWS,
                                       ForwardShape)  # fmt: skip

    from jaxllm.layers.linear import WEIGHT_ONLY_MAX_ROWS

    # every weight-only decode step (its product widens the weight inside Triton's GEMM) keeps them
    assert QUANTIZED_TRITON_GEMM_MAX_ROWS >= WEIGHT_ONLY_MAX_ROWS
    runner = tiny_llm("llama")._engine.runner
    monkeypatch.setattr(runner, "cfg", dataclasses.replace(runner.cfg, quant_algo=quant_algo))
    shapes = runner.bucket_shapes()
    assert all(runner.compiler_options(s) is None for s in shapes)
    monkeypatch.setattr(runner, "_devices", lambda: [types.SimpleNamespace(platform="gpu", device_kind="H200", id=0)])
    rows = QUANTIZED_TRITON_GEMM_MAX_ROWS if quant_algo else TRITON_GEMM_MAX_ROWS
    for s in shapes:
        few = isinstance(s, ForwardShape) and s.num_tokens <= rows
        assert runner.compiler_options(s) == (None if few else NO_TRITON_GEMM_OPTIONS), s
    assert any(isinstance(s, ForwardShape) and s.num_tokens <= TRITON_GEMM_MAX_ROWS for s in shapes)
    assert any(isinstance(s, ForwardShape) and TRITON_GEMM_MAX_ROWS < s.num_tokens <= rows for s in shapes) == bool(
        quant_algo)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_num_scheduler_steps_is_validated(tiny_dir, bad):
    with pytest.raises(ValueError, match="num_scheduler_steps"):
        LLM(model=str(tiny_dir("llama")), skip_tokenizer_init=True, num_scheduler_steps=bad)


def test_overlap_scheduler_gives_the_same_outputs_and_runs_ahead(tiny_llm):
    """The overlap scheduler (the default) starts each multi-step decode before reading the last
    one's tokens: the same tokens, log-probabilities and finish reasons as without it, whether a
    sequence runs to max_tokens, stops on a token inside a dispatch already followed, or runs
    alongside others that stop; and every page comes back."""
    off = tiny_llm("llama", disable_overlap_scheduler=True)
    on = tiny_llm("llama")
    assert on._engine.overlap and not off._engine.overlap
    greedy = off.generate(PROMPTS[3], SamplingParams(max_tokens=40, ignore_eos=True), use_tqdm=False)
    tokens = greedy.outputs[0].token_ids
    # A token first sampled in the third dispatch of 8 or later: the dispatch after it already runs.
    stop_at = next(i for i in range(17, len(tokens)) if tokens[i] not in tokens[:i])
    stop_token = tokens[stop_at]
    params = [
        SamplingParams(max_tokens=37, ignore_eos=True),
        SamplingParams(max_tokens=29, temperature=0.9, seed=5, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=40, top_k=7, top_p=0.8, seed=9, ignore_eos=True),
        SamplingParams(max_tokens=40, stop_token_ids=[stop_token]),
        SamplingParams(max_tokens=26, temperature=0.7, seed=3, ignore_eos=True),
    ]
    expected = _outputs(off.generate(PROMPTS, params, use_tqdm=False))
    assert expected[3][0][1] == "stop" and len(expected[3][0][0]) == stop_at  # (the stop token is left out)
    assert off._engine.num_follow_ons == 0
    _assert_same_outputs(_outputs(on.generate(PROMPTS, params, use_tqdm=False)), expected)
    for prompt, p in zip(PROMPTS, params):  # alone (a batch of one rounds its float32 sums differently)
        _assert_same_outputs(_outputs([on.generate(prompt, p, use_tqdm=False)]),
                             _outputs([off.generate(prompt, p, use_tqdm=False)]))
    assert on._engine.num_follow_ons > 0
    bm = on._engine.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks


def test_overlap_scheduler_runs_every_kind_of_step_ahead_with_the_same_outputs(tiny_dir, monkeypatch):
    """The overlap scheduler schedules every step while the last one runs, prefill chunks and mixed
    steps too: under chunked prefill, a KV budget that preempts, parallel samples, penalties,
    min_tokens and stops inside a step already followed, the same outputs as without it, and every
    page comes back."""
    # Most requests are of known length (ignore_eos) and must preempt: MAX_UTILIZATION's projection
    # of their growth (scheduler.SureGrowth) would hold them back instead, so it is off here.
    monkeypatch.setattr(scheduler, "PROJECT_SURE_GROWTH", False)
    from jaxllm import KvCacheConfig

    prompts = [list(range(10 + 3 * i, 10 + 3 * i + 9 + 7 * i)) for i in range(8)]
    kwargs = dict(dtype="float32", skip_tokenizer_init=True, max_batch_size=6, max_num_tokens=32, max_seq_len=96,
                  kv_cache_config=KvCacheConfig(max_tokens=160, tokens_per_block=8), num_scheduler_steps=4)
    with LLM(model=str(tiny_dir("llama")), disable_overlap_scheduler=True, **kwargs) as off, \
            LLM(model=str(tiny_dir("llama")), **kwargs) as on:  # fmt: skip
        greedy = off.generate(prompts[0], SamplingParams(max_tokens=30, ignore_eos=True), use_tqdm=False)
        stop_token = greedy.outputs[0].token_ids[9]
        params = [
            SamplingParams(max_tokens=30, ignore_eos=True),
            SamplingParams(max_tokens=30, stop_token_ids=[stop_token]),
            SamplingParams(max_tokens=17, temperature=0.9, seed=5, ignore_eos=True, logprobs=2),
            SamplingParams(max_tokens=12, n=2, best_of=3, temperature=1.0, seed=7, ignore_eos=True),
            SamplingParams(max_tokens=20, repetition_penalty=1.3, presence_penalty=0.5, ignore_eos=True),
            SamplingParams(max_tokens=15, min_tokens=12, stop_token_ids=[stop_token], top_k=5, seed=1),
            SamplingParams(max_tokens=25, top_p=0.8, temperature=0.7, seed=3, ignore_eos=True),
            SamplingParams(max_tokens=9, ignore_eos=True),
        ]
        expected = _outputs(off.generate(prompts, params, use_tqdm=False))
        on._engine.trace_steps(True)
        got = _outputs(on.generate(prompts, params, use_tqdm=False))
        records = on._engine.trace_steps(False)
        stats = on.get_stats()
        _assert_same_outputs(got, expected)
        ahead = {r.kind for r in records if r.ahead}
        assert {"mixed", "decode", "multi-step"} <= ahead, ahead
        assert sum(s["inflightBatchingStats"]["numPausedRequests"] for s in stats) > 0, "nothing was preempted"
        assert off._engine.num_follow_ons == 0
        for llm in (on, off):
            bm = llm._engine.block_manager
            assert bm.num_free_blocks == bm.num_usable_blocks


def test_disable_overlap_scheduler_must_be_a_bool(tiny_dir):
    with pytest.raises(TypeError, match="disable_overlap_scheduler must be a bool, got 'yes'"):
        LLM(model=str(tiny_dir("llama")), skip_tokenizer_init=True, disable_overlap_scheduler="yes")


def test_multi_step_rows_taken_at_once_match_token_by_token(tiny_dir, monkeypatch):
    """A multi-step row with no per-token work (no log-probabilities, grammar or stop strings) is
    taken in at once (postprocess.py `_take_row`): the same tokens, text, finish and stop reasons
    and cumulative log-probabilities as appended token by token, through stop tokens below and past
    min_tokens, max_tokens and max_seq_len, with the text decoded (special tokens kept or skipped).
    No prefix reuse: the second run's prefills compute what the first one's did."""
    from jaxllm.engine.postprocess import Postprocessor
    from tests.test_faults import char_tokenizer

    with LLM(model=str(tiny_dir("llama")), tokenizer=char_tokenizer(), dtype="float32", max_batch_size=8,
             max_num_tokens=64, max_seq_len=64, kv_cache_config={"enable_block_reuse": False}) as llm:  # fmt: skip
        prompts = ["hello world", "abc", "x" * 40, "the quick brown fox", "zz"]
        greedy = llm.generate(prompts[3], SamplingParams(max_tokens=30, ignore_eos=True), use_tqdm=False)
        tokens = greedy.outputs[0].token_ids
        stop = tokens[next(i for i in range(9, 30) if tokens[i] not in tokens[:i])]  # first seen past 9
        early = tokens[2]  # seen early, and maybe again after min_tokens
        params = [
            SamplingParams(max_tokens=21, ignore_eos=True, skip_special_tokens=False),
            SamplingParams(max_tokens=30, temperature=0.8, seed=4, stop_token_ids=[early]),
            SamplingParams(max_tokens=40, ignore_eos=True),  # the long prompt ends at max_seq_len
            SamplingParams(max_tokens=30, stop_token_ids=[stop]),
            SamplingParams(max_tokens=30, min_tokens=12, stop_token_ids=[early], temperature=0.8, seed=7),
        ]
        taken = []
        take_row = Postprocessor._take_row
        monkeypatch.setattr(Postprocessor, "_take_row", lambda self, *a: taken.append(1) or take_row(self, *a))
        run = [[(o.token_ids, o.text, o.finish_reason, o.stop_reason, o.cumulative_logprob) for o in out.outputs]
               for out in llm.generate(prompts, params, use_tqdm=False)]  # fmt: skip
        assert taken and run[3][0][2] == "stop" and run[2][0][2] == "length"
        monkeypatch.setattr(Postprocessor, "takes_at_once", lambda self, seq: False)
        one_by_one = [[(o.token_ids, o.text, o.finish_reason, o.stop_reason, o.cumulative_logprob) for o in out.outputs]
                      for out in llm.generate(prompts, params, use_tqdm=False)]  # fmt: skip
        assert run == one_by_one


def _linear_costs(buckets, decode_steps):
    """A DecodeCap whose buckets cost their rows (compute-bound), whatever the CPU's timings."""
    from jaxllm.engine.decode_cap import DecodeCap

    cap = DecodeCap(buckets, decode_steps)
    cap.cost = lambda bucket: float(bucket)
    cap.observe = lambda *args: None
    return cap


def test_a_decode_cap_runs_decodes_at_the_bucket_below_in_turns_with_the_same_outputs(tiny_llm, tiny_dir):
    """A draining engine with a decode cap (engine/decode_cap.py) runs 5 decoding sequences as
    multi-step decodes of 4 rows, each sequence in its turn (the overlap scheduler scheduling them
    ahead): the same tokens, log-probabilities and finish reasons as the whole batch a step, and
    every page comes back."""
    llm = tiny_llm("llama")
    engine = llm._engine
    params = [SamplingParams(max_tokens=37, ignore_eos=True),
              SamplingParams(max_tokens=29, temperature=0.9, seed=5, ignore_eos=True, logprobs=2),
              SamplingParams(max_tokens=40, ignore_eos=True), SamplingParams(max_tokens=26, ignore_eos=True),
              SamplingParams(max_tokens=33, temperature=0.7, seed=3, ignore_eos=True)]  # fmt: skip
    expected = _outputs(llm.generate(PROMPTS, params, use_tqdm=False))
    assert engine.decode_cap is None  # off on the CPU by default (SchedulerConfig(decode_cap=True) below)
    engine.decode_cap = cap = _linear_costs(engine.runner.buckets.seq_buckets, engine.decode_steps)
    engine.trace_steps(True)
    try:
        got = _outputs(llm.generate(PROMPTS, params, use_tqdm=False))
    finally:
        records = engine.trace_steps(False)
        engine.decode_cap = None
    _assert_same_outputs(got, expected)
    assert cap.num_capped > 0
    with LLM(model=str(tiny_dir("llama")), dtype="float32", skip_tokenizer_init=True, max_batch_size=16,
             max_num_tokens=256, scheduler_config={"decode_cap": True}) as capped:  # fmt: skip
        assert capped._engine.decode_cap is not None
        _assert_same_outputs(_outputs(capped.generate(PROMPTS[:2], params[:2], use_tqdm=False)), expected[:2])
        assert capped._engine.decode_cap._times  # the engine timed its decode steps for the cap
    capped = [r for r in records if r.kind == "multi-step" and r.padded_seqs == 4]
    assert capped and all(r.seqs == 4 for r in capped)
    assert not any(r.padded_seqs == 8 for r in records)  # 5 decodes never ran as 8 rows
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks
