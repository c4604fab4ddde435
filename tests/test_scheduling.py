"""SchedulingParams through the LLM: priority order on a saturated engine, FCFS among equals, bad input."""

import pytest

from jaxllm import LLM, SamplingParams, SchedulingParams


@pytest.fixture(scope="module")
def one_at_a_time(tiny_dir):
    with LLM(model=str(tiny_dir("qwen2")), dtype="float32", skip_tokenizer_init=True, max_batch_size=1,
             max_num_tokens=32) as llm:  # fmt: skip
        yield llm


def _timing(out) -> dict:
    return out.outputs[0].request_perf_metrics["timing_metrics"]


def test_a_late_high_priority_request_runs_before_earlier_low_ones(one_at_a_time):
    llm = one_at_a_time
    params = SamplingParams(max_tokens=4, ignore_eos=True, return_perf_metrics=True)
    blocker = llm.generate_async([3, 4, 5], SamplingParams(max_tokens=300, ignore_eos=True, return_perf_metrics=True),
                                 streaming=True)  # fmt: skip
    next(iter(blocker))  # running: one sequence at a time, so everything below queues behind it
    submitted = [  # (name, priority): low ones first, then equal defaults, then the urgent one
        ("low0", 0.1), ("low1", 0.1), ("mid0", None), ("low2", 0.1), ("mid1", None), ("high", 0.9), ("mid2", 0.5),
    ]
    futures = {}
    for i, (name, priority) in enumerate(submitted):
        scheduling = SchedulingParams(priority=priority) if priority is not None else None
        futures[name] = llm.generate_async([10 + i, 20, 30 + i], params, scheduling_params=scheduling)
    assert not blocker.done(), "the blocker finished before the queue was complete; the order below would not be tested"
    outs = {name: f.result(timeout=120) for name, f in futures.items()}
    blocker.result(timeout=120)
    # The engine records these (monotonic, one thread): with one sequence at a time they are the run order.
    by_start = sorted(outs, key=lambda name: _timing(outs[name])["first_scheduled_time"])
    by_finish = sorted(outs, key=lambda name: _timing(outs[name])["last_token_time"])
    expected = ["high", "mid0", "mid1", "mid2", "low0", "low1", "low2"]
    assert by_start == expected and by_finish == expected
    # (It may be scheduled before the blocker's last token is read: the overlap scheduler schedules
    # the step after the blocker's last while that one runs; its first token comes after.)
    assert _timing(outs["high"])["first_token_time"] >= _timing(blocker)["last_token_time"]


def test_scheduling_params_are_validated(one_at_a_time):
    ok = SamplingParams(max_tokens=1)
    cases = [
        (lambda: SchedulingParams(priority=1.5), ValueError, r"priority=1.5 is invalid; allowed: a number in \[0.0, 1.0\]"),
        (lambda: SchedulingParams(priority="high"), ValueError, "priority='high'"),
        (lambda: SchedulingParams(priority=True), ValueError, "priority=True"),
        (lambda: one_at_a_time.generate([1, 2], ok, scheduling_params=0.9), TypeError,
         "scheduling_params must be a SchedulingParams"),
        (lambda: one_at_a_time.generate([[1], [2]], ok, scheduling_params=[SchedulingParams()]), ValueError,
         "1 scheduling_params for 2 prompts"),
    ]  # fmt: skip
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    outs = one_at_a_time.generate([[1, 2], [3, 4]], ok, use_tqdm=False,
                                  scheduling_params=[SchedulingParams(priority=0.0), SchedulingParams(priority=1.0)])  # fmt: skip
    assert all(o.outputs[0].token_ids for o in outs)
