"""get_stats and perf metrics as TensorRT-LLM gives them: one entry per iteration (multi-step
dispatches expanded), completed requests counted, per-request statistics, RequestPerfMetrics."""

import asyncio

import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.llm_args import EngineArgs
from jaxllm.outputs import KvCacheMetrics, RequestPerfMetrics, TimingMetrics

REQ_STATS_ITERS = 4


@pytest.fixture(scope="module")
def llm(tiny_dir):
    with LLM(model=str(tiny_dir("llama")), dtype="float32", skip_tokenizer_init=True, max_batch_size=8,
             max_num_tokens=64, enable_iter_req_stats=True, request_stats_max_iterations=REQ_STATS_ITERS,
             kv_cache_config={"tokens_per_block": 8}) as engine:  # fmt: skip
        yield engine


def test_one_entry_per_generated_token_with_multi_step_decoding(llm):
    llm.get_stats()
    out = llm.generate([5, 6, 7, 8], SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 5
    stats = llm.get_stats()
    assert len(stats) == 5  # the prefill's token, then four decode iterations
    assert [s["iter"] for s in stats] == list(range(stats[0]["iter"], stats[0]["iter"] + 5))
    assert max(s["dispatch"]["numSteps"] for s in stats) == 8  # the decodes ran in one multi-step dispatch
    assert len({s["dispatch"]["id"] for s in stats}) == 2
    assert [s["numActiveRequests"] for s in stats] == [1] * 5
    assert [s["numCompletedRequests"] for s in stats] == [0, 0, 0, 0, 1]
    ifb = [s["inflightBatchingStats"] for s in stats]
    assert [(s["numContextRequests"], s["numGenRequests"]) for s in ifb] == [(1, 0)] + [(0, 1)] * 4
    assert ifb[0]["numCtxTokens"] == 4 and all(s["avgNumDecodedTokensPerIter"] == 1.0 for s in ifb[1:])


def test_requests_finishing_inside_a_dispatch_complete_in_their_iteration(llm):
    llm.get_stats()
    lengths = [3, 5, 7]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths]
    outs = llm.generate([[11, 12, 13], [21, 22], [31, 32, 33, 34]], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == lengths
    stats = llm.get_stats()
    assert len(stats) == 7
    assert [s["inflightBatchingStats"]["numGenRequests"] for s in stats] == [0, 3, 3, 2, 2, 1, 1]
    assert [s["numCompletedRequests"] for s in stats] == [0, 0, 1, 0, 1, 0, 1]
    assert [s["numActiveRequests"] for s in stats] == [3, 3, 3, 2, 2, 1, 1]
    # Per-request statistics: only the newest REQ_STATS_ITERS iterations keep theirs.
    with_requests = [s for s in stats if "requestStats" in s]
    assert with_requests == stats[-REQ_STATS_ITERS:]
    last = stats[-1]["requestStats"]
    assert [(r["id"], r["stage"], r["numGeneratedTokens"], r["scheduled"]) for r in last] == [
        (outs[2].request_id, "GENERATION_COMPLETE", 7, True)]  # fmt: skip
    middle = {r["id"]: r for r in stats[-3]["requestStats"]}  # iteration 5: the second request completes
    assert middle[outs[1].request_id]["stage"] == "GENERATION_COMPLETE"
    assert middle[outs[1].request_id]["numGeneratedTokens"] == 5
    assert middle[outs[2].request_id]["stage"] == "GENERATION_IN_PROGRESS"
    assert middle[outs[2].request_id]["numGeneratedTokens"] == 5
    for key in ("contextPrefillPosition", "avgNumDecodedTokensPerIter", "paused", "allocTotalBlocksPerRequest",
                "allocNewBlocksPerRequest", "reusedBlocksPerRequest", "missedBlocksPerRequest",
                "kvCacheHitRatePerRequest"):  # fmt: skip
        assert key in last[0]
    assert last[0]["contextPrefillPosition"] == 4


def test_queued_requests_appear_in_request_stats(llm):
    llm.get_stats()
    prompts = [[40 + i] * 30 for i in range(4)]  # 120 prompt tokens, 64 a step: the last ones wait
    llm.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    stats = llm.get_stats()
    assert len(stats) <= REQ_STATS_ITERS  # two prefill iterations and a decode: all keep their requestStats
    first = stats[0]
    stages = sorted(r["stage"] for r in first["requestStats"])
    assert first["numQueuedRequests"] == 1 and first["numActiveRequests"] == 3
    assert stages == ["CONTEXT_IN_PROGRESS", "GENERATION_IN_PROGRESS", "GENERATION_IN_PROGRESS", "QUEUED"]
    chunked = next(r for r in first["requestStats"] if r["stage"] == "CONTEXT_IN_PROGRESS")
    assert chunked["contextPrefillPosition"] == 4 and chunked["numGeneratedTokens"] == 0
    assert sum(s["numCompletedRequests"] for s in stats) == 4


def test_request_perf_metrics_are_objects_with_trt_structure(llm):
    prompt = list(range(100, 120))  # two full pages of 8 and a partial one
    params = SamplingParams(max_tokens=3, ignore_eos=True, return_perf_metrics=True)
    llm.get_stats()
    first = llm.generate(prompt, params, use_tqdm=False).outputs[0].request_perf_metrics
    iters = [s["iter"] for s in llm.get_stats()]
    assert isinstance(first, RequestPerfMetrics) and isinstance(first.timing_metrics, TimingMetrics)
    assert isinstance(first.kv_cache_metrics, KvCacheMetrics)
    t = first.timing_metrics
    assert t.arrival_time <= t.first_scheduled_time <= t.first_token_time <= t.last_token_time
    assert (first.first_iter, first.last_iter, first.iter) == (iters[0], iters[-1], iters[-1])
    kv = first.kv_cache_metrics
    assert kv.num_reused_blocks == 0 and kv.num_missed_blocks == 3 and kv.kv_cache_hit_rate == 0.0
    assert kv.num_new_allocated_blocks == kv.num_total_allocated_blocks == 3
    again = llm.generate(prompt, params, use_tqdm=False).outputs[0].request_perf_metrics
    kv = again.kv_cache_metrics
    assert kv.num_reused_blocks == 2 and kv.num_missed_blocks == 1 and kv.kv_cache_hit_rate == pytest.approx(2 / 3)
    # Read as the dict it used to be.
    assert again["timing_metrics"]["arrival_time"] == again.timing_metrics.arrival_time
    assert again.get("kv_cache_metrics").get("num_reused_blocks") == 2 and again.get("nothing", 1) == 1
    assert "first_iter" in again and again.to_dict()["kv_cache_metrics"]["num_missed_blocks"] == 1
    with pytest.raises(KeyError):
        again["nothing"]
    plain = llm.generate(prompt, SamplingParams(max_tokens=1), use_tqdm=False).outputs[0]
    assert plain.request_perf_metrics is None


def test_get_stats_async(llm):
    llm.get_stats()

    async def collect():
        llm.generate([7, 8, 9], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
        return [s async for s in llm.get_stats_async(timeout=2)]

    stats = asyncio.run(collect())
    assert len(stats) == 3 and stats[-1]["numCompletedRequests"] == 1


def test_iter_stats_max_iterations_bounds_what_is_kept(tiny_dir):
    with LLM(model=str(tiny_dir("llama")), dtype="float32", skip_tokenizer_init=True, max_batch_size=8,
             max_num_tokens=64, iter_stats_max_iterations=3) as small:  # fmt: skip
        small.generate([5, 6, 7], SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
        stats = small.get_stats()
        assert len(stats) == 3 and "requestStats" not in stats[-1]
        assert stats[-1]["numCompletedRequests"] == 1


@pytest.mark.parametrize("kwargs", [dict(iter_stats_max_iterations=-1), dict(request_stats_max_iterations=1.5),
                                    dict(enable_iter_req_stats="yes"), dict(enable_iter_perf_stats=None)])
def test_stats_arguments_are_validated(kwargs):
    (name, value), = kwargs.items()
    with pytest.raises(ValueError, match=f"{name}={value!r} is invalid; allowed"):
        EngineArgs.from_kwargs(kwargs)
