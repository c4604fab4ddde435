"""The LLM API surface: sampling options against references, streaming, stops, stats, bad input."""

import asyncio

import numpy as np
import pytest
import scipy.stats
import torch

from jaxllm import LLM, PreprocessedInputs, RequestError, SamplingParams
from jaxllm.engine.engine import EngineShutdown
from jaxllm.layers import sampling as sampling_lib
from tests import tiny

PROMPT = [5, 17, 42, 99, 3, 250, 7, 8, 9]


@pytest.fixture(scope="module")
def llama(tiny_llm):
    return tiny_llm("llama")


@pytest.fixture(scope="module")
def llama_hf():
    return tiny.build_tiny("llama")


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


# ---- sampling distribution ----------------------------------------------------------------------
def _expected(logits, temperature, top_k, top_p, min_p):
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros_like(p, bool)
    cum = 0.0
    for rank, t in enumerate(order):
        if (top_k and rank >= top_k) or cum >= top_p or p[t] < min_p * p[order[0]]:
            break
        keep[t] = True
        cum += p[t]
    q = np.where(keep, p, 0)
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.3, 6, 1.0, 0.0),
                                                            (1.0, 0, 0.8, 0.0), (0.9, 8, 0.7, 0.0), (1.0, 0, 1.0, 0.1)])
def test_sampler_draws_the_intended_distribution(temperature, top_k, top_p, min_p):
    """Chi-square goodness of fit of 20000 draws (one per seed) against the truncated softmax."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, 24).astype(np.float32)
    n = 20000
    batch = sampling_lib.SamplingBatch(
        temperature=np.full(n, temperature, np.float32), top_k=np.full(n, top_k, np.int32),
        top_p=np.full(n, top_p, np.float32), min_p=np.full(n, min_p, np.float32),
        seeds=np.stack([np.zeros(n, np.uint32), np.arange(n, dtype=np.uint32)], 1), counters=np.zeros(n, np.int32),
        bias_slots=np.zeros(n, np.int32), banned_tokens=np.full((n, sampling_lib.BAN_WIDTH), -1, np.int32),
        flavor="full")  # fmt: skip
    import jax

    tokens = np.asarray(jax.jit(sampling_lib.sample)(np.tile(logits, (n, 1)), batch)["tokens"])
    expected = _expected(logits.astype(np.float64), temperature, top_k, top_p, min_p)
    counts = np.bincount(tokens, minlength=24)
    assert counts[expected == 0].sum() == 0, "sampled a truncated token"
    support = expected > 0
    f_exp = expected[support] / expected[support].sum() * counts[support].sum()
    _, p_value = scipy.stats.chisquare(counts[support].astype(np.float64), f_exp)
    assert p_value > 1e-3, f"p={p_value}"


def _sorted_truncation(x, top_k, top_p, min_p):
    """The truncation's definition, by sorting (float64): the kept prefix of the descending order,
    then every token tied with its last one."""
    order = np.argsort(-x, kind="stable")
    if not np.isfinite(x[order[0]]):
        return np.ones(x.shape, bool)
    p = np.exp(x[order] - x[order[0]])
    p /= p.sum()
    before = np.cumsum(p) - p
    keep = ((top_k <= 0) | (np.arange(len(x)) < top_k)) & ((top_p >= 1) | (before < top_p)) & (p >= min_p * p[0])
    keep[0] = True
    last = np.flatnonzero(keep)[-1] if keep.all() else np.argmin(keep) - 1
    return x >= x[order[last]]


def test_truncation_mask_matches_the_sorting_definition():
    """`truncation_mask` finds its threshold by halving the probabilities' float32 bits, without a sort: the same
    mask as sorting each row, with ties at the threshold, -inf tokens, rows of one or no allowed
    token, negative and positive logits, and every setting neutral or extreme."""
    import jax

    rng = np.random.default_rng(7)
    B, V = 96, 700
    x = rng.normal(0, 1, (B, V)) * rng.choice([0.1, 1.0, 2.5], (B, 1)) + rng.choice([-40.0, 0.0, 30.0], (B, 1))
    x = x.astype(np.float32)
    x[::5] = np.round(x[::5] * 2) / 2  # many ties
    x[1::7, rng.integers(0, V, 300)] = -np.inf
    x[3] = -np.inf
    x[4] = -np.inf
    x[4, 11] = 0.5
    x[6] = 0.0  # one tie across the row
    x[8, :] = np.where(rng.random(V) < 0.5, -0.0, 0.0)
    top_k = rng.choice([0, 1, 2, 5, 50, V, V + 10], B).astype(np.int32)
    top_p = rng.choice([1.0, 0.95, 0.9, 0.5, 0.1, 0.0], B).astype(np.float32)
    min_p = rng.choice([0.0, 0.0, 0.02, 0.3, 1.0], B).astype(np.float32)
    batch = sampling_lib.SamplingBatch(
        temperature=np.ones(B, np.float32), top_k=top_k, top_p=top_p, min_p=min_p,
        seeds=np.zeros((B, 2), np.uint32), counters=np.zeros(B, np.int32),
        bias_slots=np.zeros(B, np.int32), banned_tokens=np.full((B, sampling_lib.BAN_WIDTH), -1, np.int32),
        flavor="full")  # fmt: skip
    mask = np.asarray(jax.jit(sampling_lib.truncation_mask)(x, batch))
    for row in range(B):
        expected = _sorted_truncation(x[row].astype(np.float64), top_k[row], top_p[row], min_p[row])
        assert (mask[row] == expected).all(), (row, top_k[row], top_p[row], min_p[row], mask[row].sum(), expected.sum())


def test_sampler_draws_across_chunk_boundaries_and_never_an_excluded_token():
    """The sampler inverts the cumulative distribution a chunk of SAMPLE_CHUNK tokens at a time: a
    support split over chunks (the first token of one, the last of another, the padded last chunk)
    is drawn as its softmax, excluded tokens (-inf) never, a row of one allowed token always gives it
    and a row with none gives 0 (as the greedy argmax does); under 4 vocabulary shards the same tokens."""
    import jax
    from jax.sharding import Mesh

    C, V, n = sampling_lib.SAMPLE_CHUNK, 2 * sampling_lib.SAMPLE_CHUNK + 300, 20000
    support = np.array([C - 1, C, 2 * C - 1, 2 * C + 1, V - 1])
    logits = np.full(V, -np.inf, np.float32)
    logits[support] = [0.3, -0.5, 1.0, 0.0, -1.2]
    rows = np.tile(logits, (n, 1))
    rows[1] = -np.inf
    rows[1, 7] = 2.0
    rows[2] = -np.inf
    batch = sampling_lib.SamplingBatch(
        temperature=np.full(n, 0.8, np.float32), counters=np.zeros(n, np.int32),
        seeds=np.stack([np.full(n, 3, np.uint32), np.arange(n, dtype=np.uint32)], 1))  # fmt: skip
    tokens = np.asarray(jax.jit(sampling_lib.sample)(rows, batch)["tokens"])
    assert tokens[1] == 7 and tokens[2] == 0
    counts = np.bincount(tokens[3:], minlength=V)
    assert counts.sum() == counts[support].sum(), "sampled an excluded token"
    p = np.exp(logits[support].astype(np.float64) / 0.8)
    _, p_value = scipy.stats.chisquare(counts[support].astype(np.float64), p / p.sum() * (n - 3))
    assert p_value > 1e-3, f"p={p_value}"
    mesh = Mesh(np.array(jax.devices()[:4]), ("tp",))
    padded = np.pad(rows[:512], ((0, 0), (0, -V % 4)), constant_values=-np.inf)
    head = jax.tree.map(lambda x: x[:512], batch)
    sharded = jax.jit(lambda x, s: sampling_lib.sample_sharded(x, s, mesh, "tp", V))(padded, head)
    assert (np.asarray(sharded["tokens"]) == tokens[:512]).all()


def test_greedy_defaults_and_temperature_zero(llama):
    a = llama.generate(PROMPT, SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
    b = llama.generate(PROMPT, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), use_tqdm=False)
    c = llama.generate(PROMPT, SamplingParams(max_tokens=6, top_k=1, ignore_eos=True), use_tqdm=False)
    assert a.outputs[0].token_ids == b.outputs[0].token_ids == c.outputs[0].token_ids
    assert SamplingParams().is_greedy and not SamplingParams(temperature=0.5).is_greedy


# ---- logit adjustments against a host reference ---------------------------------------------------
def _reference_greedy(model, prompt, steps, adjust):
    ids = list(prompt)
    for _ in range(steps):
        logits = _hf_logits(model, ids)[-1].astype(np.float64)
        ids.append(int(np.argmax(adjust(logits, ids))))
    return ids[len(prompt) :]


def test_penalties_bias_and_bans_match_a_host_reference(llama, llama_hf):
    bias = np.zeros(tiny.VOCAB, np.float32)
    bias[[3, 30, 300]] = [2.0, -1.0, 4.0]

    def adjust(logits, ids):
        logits = logits + bias
        logits[[11, 12]] = -np.inf  # bad_token_ids
        seen = set(ids)
        out = ids[len(PROMPT) :]
        for t in seen:
            logits[t] = logits[t] / 1.4 if logits[t] > 0 else logits[t] * 1.4
        for t in set(out):
            logits[t] -= 0.3 * out.count(t) + 0.2
        return logits

    params = SamplingParams(max_tokens=10, ignore_eos=True, repetition_penalty=1.4, frequency_penalty=0.3,
                            presence_penalty=0.2, embedding_bias=bias, bad_token_ids=[11, 12])  # fmt: skip
    got = llama.generate(PROMPT, params, use_tqdm=False).outputs[0].token_ids
    assert got == _reference_greedy(llama_hf, PROMPT, 10, adjust)


def test_logits_processor_slow_path(llama, llama_hf):
    calls = []

    def only_even(request_id, logits, token_ids, stream, client):
        calls.append(request_id)
        logits[..., 1::2] = -np.inf

    got = llama.generate(PROMPT, SamplingParams(max_tokens=5, ignore_eos=True, logits_processor=only_even),
                         use_tqdm=False).outputs[0].token_ids  # fmt: skip

    def adjust(logits, ids):
        logits[1::2] = -np.inf
        return logits

    assert got == _reference_greedy(llama_hf, PROMPT, 5, adjust) and len(calls) == 5


def test_min_tokens_stop_token_ids_and_multi_token_bad_words(llama):
    free = llama.generate(PROMPT, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False).outputs[0].token_ids
    stop = SamplingParams(max_tokens=8, stop_token_ids=[free[2]])
    out = llama.generate(PROMPT, stop, use_tqdm=False).outputs[0]
    assert out.token_ids == free[:2] and out.finish_reason == "stop" and out.stop_reason == free[2]  # stop token trimmed
    late = llama.generate(PROMPT, SamplingParams(max_tokens=8, stop_token_ids=[free[2]], min_tokens=4),
                          use_tqdm=False).outputs[0]  # fmt: skip
    assert free[2] not in late.token_ids[:4]
    eos = llama.generate(PROMPT, SamplingParams(max_tokens=8, end_id=free[1]), use_tqdm=False).outputs[0]
    assert eos.token_ids == free[:2] and eos.finish_reason == "stop"


def test_prompt_logprobs_context_and_generation_logits_match_transformers(llama, llama_hf):
    params = SamplingParams(max_tokens=4, ignore_eos=True, prompt_logprobs=2, logprobs=1, return_context_logits=True,
                            return_generation_logits=True)  # fmt: skip
    out = llama.generate(PROMPT, params, use_tqdm=False)
    completion = out.outputs[0]
    ref = _hf_logits(llama_hf, PROMPT + completion.token_ids)
    np.testing.assert_allclose(out.context_logits, ref[: len(PROMPT)], atol=1e-4)
    np.testing.assert_allclose(completion.generation_logits, ref[len(PROMPT) - 1 : -1], atol=1e-4)
    logp = torch.log_softmax(torch.tensor(ref), -1).numpy()
    assert completion.prompt_logprobs[0] is None and len(completion.prompt_logprobs) == len(PROMPT)
    for i in range(1, len(PROMPT)):
        entry = completion.prompt_logprobs[i]
        assert abs(entry[PROMPT[i]].logprob - logp[i - 1, PROMPT[i]]) < 1e-4
        top = np.argsort(-logp[i - 1])[:2]
        assert all(abs(entry[int(t)].logprob - logp[i - 1, t]) < 1e-4 for t in top)


def test_exclude_input_truncate_and_token_forms(llama):
    base = llama.generate(PROMPT, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False).outputs[0]
    full = llama.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=4, ignore_eos=True,
                          exclude_input_from_output=False), use_tqdm=False).outputs[0]  # fmt: skip
    assert full.token_ids == PROMPT + base.token_ids
    cut = llama.generate([1, 1, 1] + PROMPT, SamplingParams(max_tokens=4, ignore_eos=True,
                         truncate_prompt_tokens=len(PROMPT)), use_tqdm=False)  # fmt: skip
    assert cut.prompt_token_ids == PROMPT and cut.outputs[0].token_ids == base.token_ids
    timed = llama.generate(PROMPT, SamplingParams(max_tokens=3, return_perf_metrics=True), use_tqdm=False).outputs[0]
    t = timed.request_perf_metrics["timing_metrics"]
    assert t["arrival_time"] <= t["first_scheduled_time"] <= t["first_token_time"] <= t["last_token_time"]


# ---- text: streaming, stop strings, detokenize ----------------------------------------------------
def test_streaming_diffs_add_up_and_async_iteration(smollm2_llm):
    prompt = "Write one sentence about the moon."
    params = SamplingParams(max_tokens=24)
    final = smollm2_llm.generate(prompt, params, use_tqdm=False).outputs[0]
    text, tokens = "", []
    for partial in smollm2_llm.generate_async(prompt, params, streaming=True):
        text += partial.outputs[0].text_diff
        tokens += partial.outputs[0].token_ids_diff
    assert text == final.text and tokens == final.token_ids

    async def consume():
        chunks = []
        async for partial in smollm2_llm.generate_async(prompt, params, streaming=True):
            chunks.append(partial.outputs[0].text_diff)
        return "".join(chunks)

    assert asyncio.run(consume()) == final.text


def test_stop_strings_across_token_boundaries(smollm2_llm):
    prompt = "The capital of France is"
    free = smollm2_llm.generate(prompt, SamplingParams(max_tokens=20), use_tqdm=False).outputs[0]
    tok = smollm2_llm.tokenizer
    pieces = [tok.decode(free.token_ids[: i + 1]) for i in range(len(free.token_ids))]
    # A stop string that starts inside one token's text and ends inside a later one.
    boundary = len(pieces[3])
    stop = free.text[boundary - 2 : boundary + 3]
    assert len(stop.strip()) >= 3
    out = smollm2_llm.generate(prompt, SamplingParams(max_tokens=20, stop=stop), use_tqdm=False).outputs[0]
    assert out.text == free.text[: free.text.index(stop)] and out.finish_reason == "stop" and out.stop_reason == stop
    kept = smollm2_llm.generate(prompt, SamplingParams(max_tokens=20, stop=[stop, "zzz"], include_stop_str_in_output=True),
                                use_tqdm=False).outputs[0]  # fmt: skip
    assert kept.text == free.text[: free.text.index(stop) + len(stop)]
    raw = smollm2_llm.generate(prompt, SamplingParams(max_tokens=5, detokenize=False), use_tqdm=False).outputs[0]
    assert raw.text == "" and raw.token_ids == free.token_ids[:5]


# ---- API shape ----------------------------------------------------------------------------------
def test_preprocess_stats_and_seed_api_names(llama):
    pre = llama.preprocess(PROMPT, SamplingParams(max_tokens=3, ignore_eos=True))
    assert isinstance(pre, PreprocessedInputs) and list(pre.prompt_token_ids) == PROMPT
    out = llama.generate_async(pre).result(timeout=60)
    assert len(out.outputs[0].token_ids) == 3 and out.finished
    stats = llama.get_stats(timeout=2)
    assert stats, "no iteration stats"
    s = stats[-1]
    for key in ("iter", "iterLatencyMS", "gpuMemUsage", "cpuMemUsage", "numActiveRequests", "numQueuedRequests",
                "maxNumActiveRequests", "kvCacheStats", "inflightBatchingStats"):  # fmt: skip
        assert key in s
    for key in ("maxNumBlocks", "freeNumBlocks", "usedNumBlocks", "tokensPerBlock", "allocTotalBlocks", "reusedBlocks"):
        assert key in s["kvCacheStats"]
    for key in ("numScheduledRequests", "numContextRequests", "numGenRequests", "numCtxTokens"):
        assert key in s["inflightBatchingStats"]

    async def stats_async():
        llama.generate(PROMPT, SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
        return [x async for x in llama.get_stats_async(timeout=2)]

    assert asyncio.run(stats_async())
    assert llama.llm_id and llama.disaggregated_params is None


def test_request_extras_are_validated_at_the_boundary(llama):
    for name in ("lora_request", "prompt_adapter_request", "kv_cache_retention_config", "disaggregated_params",
                 "scheduling_params", "cache_salt"):  # fmt: skip
        with pytest.raises(TypeError, match=name):
            llama.generate(PROMPT, SamplingParams(max_tokens=1), use_tqdm=False, **{name: object()})
    with pytest.raises(ValueError, match="3 cache_salt for 2 prompts"):
        llama.generate([PROMPT, PROMPT], use_tqdm=False, cache_salt=["a", "b", "c"])


@pytest.mark.parametrize("backend", ["pytorch", "_autodeploy", "xla"])
def test_seed_backend_names_select_a_jax_backend(backend):
    from jaxllm.llm_args import resolve_backend

    assert resolve_backend(backend) == "xla"


def test_bad_input_is_rejected_and_the_engine_keeps_serving(llama):
    ok = SamplingParams(max_tokens=2, ignore_eos=True)
    cases = [
        (lambda: llama.generate([], ok), ValueError, "empty list"),
        (lambda: llama.generate("", ok), ValueError, "empty"),
        (lambda: llama.generate({"prompt_token_ids": []}, ok), ValueError, "no tokens"),
        (lambda: llama.generate([[1, 2], [3, 10**6]], ok), ValueError, r"prompt 1: token ids \[1000000\] are outside the vocabulary \[0, 320\)"),
        (lambda: llama.generate([[1, 2], [-4]], ok), ValueError, "outside the vocabulary"),
        (lambda: llama.generate([1.5, 2], ok), TypeError, "str, a list of token ids"),
        (lambda: llama.generate(3, ok), TypeError, "inputs must be"),
        (lambda: llama.generate([[1], [2]], [ok]), ValueError, "got 1 SamplingParams for 2 prompts"),
        (lambda: llama.generate([1, 2], "greedy"), TypeError, "SamplingParams"),
        (lambda: llama.generate([1] * 2000, ok), ValueError, "prompt length 2000 leaves no room for a new token within max_seq_len"),
        (lambda: llama.generate([1, 2], SamplingParams(stop_token_ids=[99999])), ValueError, "stop_token_ids"),
        (lambda: llama.generate([1, 2], SamplingParams(embedding_bias=np.zeros(7))), ValueError, "embedding_bias has 7"),
        (lambda: llama.generate("text", ok), ValueError, "needs a tokenizer"),
        (lambda: llama.generate({"text": "x"}, ok), ValueError, "unknown keys"),
        (lambda: llama.generate_async([[1], [2]], ok), TypeError, "one prompt"),
        (lambda: llama.generate_async([1], ok, streaming="yes"), TypeError, "streaming"),
        (lambda: SamplingParams(temperature=-1), ValueError, r"temperature=-1 is out of range; allowed: >= 0.0"),
        (lambda: SamplingParams(top_p=1.5), ValueError, "top_p=1.5"),
        (lambda: SamplingParams(top_k=-2), ValueError, "top_k=-2"),
        (lambda: SamplingParams(max_tokens=0), ValueError, "max_tokens=0"),
        (lambda: SamplingParams(max_tokens="8"), TypeError, "max_tokens must be an int"),
        (lambda: SamplingParams(n=2), ValueError, "greedy decoding returns one sequence"),
        (lambda: SamplingParams(n=3, best_of=2, temperature=1), ValueError, "best_of"),
        (lambda: SamplingParams(logprobs=50), ValueError, "logprobs=50"),
        (lambda: SamplingParams(stop=[""]), ValueError, "empty strings"),
        (lambda: SamplingParams(repetition_penalty=0), ValueError, "repetition_penalty=0"),
        (lambda: SamplingParams(min_tokens=9, max_tokens=4), ValueError, "min_tokens"),
        (lambda: SamplingParams(use_beam_search=True, best_of=2, temperature=0.5), ValueError,
         "temperature > 0 is not allowed"),
        (lambda: SamplingParams(top_p_decay=0.5), NotImplementedError, "top_p_decay"),
        (lambda: SamplingParams(logits_processor=3), TypeError, "callable"),
        (lambda: LLM(model="x", backend="trt"), ValueError, r"backend='trt' is not valid; valid: None, 'xla', 'pallas'"),
        (lambda: LLM(model="x", tensor_parallel_size=0), ValueError, "tensor_parallel_size=0"),
        (lambda: LLM(model="x", max_batch_size=0), ValueError, "max_batch_size=0"),
        (lambda: LLM(model="x", max_num_tokenz=4), TypeError, "unknown argument"),
        (lambda: LLM(model="x", kv_cache_config={"free_gpu_memory_fraction": 2}), ValueError, "free_gpu_memory_fraction=2"),
    ]  # fmt: skip
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    assert llama.generate([1, 2], ok, use_tqdm=False).outputs[0].token_ids  # still serving


def test_an_error_inside_the_engine_fails_only_its_request(llama):
    def broken(request_id, logits, token_ids, stream, client):
        raise RuntimeError("processor exploded")

    bad = llama.generate_async(PROMPT, SamplingParams(max_tokens=3, logits_processor=broken))
    with pytest.raises(RequestError, match="processor exploded"):
        bad.result(timeout=60)
    assert len(llama.generate(PROMPT, SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False).outputs[0].token_ids) == 3


def test_shutdown_is_idempotent_and_fails_pending(tiny_dir):
    llm = LLM(model=str(tiny_dir("qwen2")), dtype="float32", skip_tokenizer_init=True, max_batch_size=2,
              max_num_tokens=32)  # fmt: skip
    pending = [llm.generate_async(PROMPT, SamplingParams(max_tokens=500, ignore_eos=True)) for _ in range(4)]
    llm.shutdown()
    llm.shutdown()
    for future in pending:
        with pytest.raises((RequestError, EngineShutdown)):
            future.result(timeout=30)
    with pytest.raises(EngineShutdown):
        llm.generate(PROMPT, SamplingParams(max_tokens=1))
    with LLM(model=str(tiny_dir("qwen2")), dtype="float32", skip_tokenizer_init=True, max_batch_size=2,
             max_num_tokens=32) as ctx:  # fmt: skip
        ctx.generate(PROMPT, SamplingParams(max_tokens=1), use_tqdm=False)
    assert ctx._engine is None
