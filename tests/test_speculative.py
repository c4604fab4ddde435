"""Speculative decoding (jaxllm/speculative.py): n-gram drafts verified in one step give the tokens of
decoding without them (greedy, and seeded sampling token for token), unseeded sampling keeps the
target's distribution (a chi-square test on a top-k-truncated vocabulary), acceptance is counted in
get_stats, and the drafter's and the config's rules hold."""

from __future__ import annotations

import math

import pytest

from jaxllm import LLM, NGramDecodingConfig, SamplingParams
from jaxllm.speculative import DraftTargetDecodingConfig, NGramDrafter, accepted, as_speculative_config

REPEAT = [5, 6, 7, 8, 9, 10, 11, 12] * 5  # its last tokens occurred before: the lookup drafts at once
PROMPTS = [REPEAT, [20, 21, 22] * 8 + [7, 8, 9], list(range(30, 70)), [40, 41, 42, 43] * 6]


def _llm(tiny_dir, **kwargs) -> LLM:
    return LLM(model=str(tiny_dir("llama")), dtype="float32", skip_tokenizer_init=True, max_batch_size=16,
               max_num_tokens=256, max_seq_len=256, **kwargs)  # fmt: skip


@pytest.fixture(scope="module")
def engines(tiny_dir):
    plain = _llm(tiny_dir)
    spec = _llm(tiny_dir, speculative_config=NGramDecodingConfig(max_draft_len=4))
    yield plain, spec
    plain.shutdown()
    spec.shutdown()


def _spec_stats(llm) -> list[dict]:
    return [s["specDecodingStats"] for s in llm.get_stats() if "specDecodingStats" in s]


def test_outputs_match_decoding_without_drafts(engines):
    plain, spec = engines
    params = [
        SamplingParams(max_tokens=48, ignore_eos=True),  # greedy
        SamplingParams(max_tokens=48, ignore_eos=True, temperature=0.9, top_p=0.95, top_k=40, seed=7, logprobs=3),
        SamplingParams(max_tokens=48, ignore_eos=True, temperature=1.0, seed=11, n=2, best_of=2),
        SamplingParams(max_tokens=2, ignore_eos=True),  # one draft at most: its last token is the step's
        SamplingParams(max_tokens=30, stop_token_ids=[9, 22]),
        SamplingParams(max_tokens=40, ignore_eos=True, repetition_penalty=1.3),  # never drafts
    ]
    prompts = [p for p in PROMPTS for _ in params]
    per = params * len(PROMPTS)
    spec.get_stats()
    want = plain.generate(prompts, per, use_tqdm=False)
    got = spec.generate(prompts, per, use_tqdm=False)
    for w, g in zip(want, got):
        for a, b in zip(w.outputs, g.outputs):
            assert b.token_ids == a.token_ids
            assert (b.finish_reason, b.stop_reason) == (a.finish_reason, a.stop_reason)
            assert b.cumulative_logprob == pytest.approx(a.cumulative_logprob, abs=1e-4)
            if a.logprobs:
                for x, y in zip(a.logprobs, b.logprobs):
                    assert list(x) == list(y)
                    assert [v.logprob for v in y.values()] == pytest.approx([v.logprob for v in x.values()], abs=1e-4)
    stats = _spec_stats(spec)
    drafted, taken = sum(s["numDraftTokens"] for s in stats), sum(s["numAcceptedTokens"] for s in stats)
    assert drafted > 0 and 0 < taken <= drafted
    steps = [s for s in stats if s["numRequestsWithDraftTokens"]]
    assert all(s["acceptanceLength"] >= 1.0 for s in steps)
    # Fewer steps than tokens: a verifying step yields up to max_draft_len + 1 tokens.
    assert sum(s["acceptanceLength"] * s["numRequestsWithDraftTokens"] for s in steps) > len(steps)
    bm = spec._engine.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks


def test_drafts_are_cut_to_the_step_under_equal_progress_chunking(tiny_dir):
    """EQUAL_PROGRESS gives a sequence at most a page of tokens a step: with 4-token pages a
    sequence verifies at most 3 of its 6 drafts; the tokens are those without drafts."""
    from jaxllm import KvCacheConfig

    small = dict(kv_cache_config=KvCacheConfig(tokens_per_block=4), max_num_tokens=64,
                 scheduler_config={"context_chunking_policy": "EQUAL_PROGRESS"})  # fmt: skip
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    outs = {}
    for name, extra in (("plain", {}), ("ngram", {"speculative_config": NGramDecodingConfig(max_draft_len=6)})):
        with LLM(model=str(tiny_dir("llama")), dtype="float32", skip_tokenizer_init=True, max_batch_size=8,
                 max_seq_len=128, **small, **extra) as llm:  # fmt: skip
            outs[name] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
            stats = _spec_stats(llm)
    assert outs["ngram"] == outs["plain"]
    assert max(s["numDraftTokens"] / s["numRequestsWithDraftTokens"] for s in stats if s["numRequestsWithDraftTokens"]) <= 3


def test_no_drafts_while_more_than_max_concurrency_run(engines, tiny_dir):
    plain = engines[0]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (6, 6, 40, 40)]
    want = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, params, use_tqdm=False)]
    with _llm(tiny_dir, speculative_config=NGramDecodingConfig(max_draft_len=4, max_concurrency=2)) as spec:
        got = [o.outputs[0].token_ids for o in spec.generate(PROMPTS, params, use_tqdm=False)]
        entries = [s for s in spec.get_stats() if "specDecodingStats" in s]
    assert got == want
    assert sum(s["specDecodingStats"]["numDraftTokens"] for s in entries) > 0  # once two were left
    assert all(s["specDecodingStats"]["numDraftTokens"] == 0 for s in entries if s["numActiveRequests"] > 2)
    with pytest.raises(ValueError, match=r"max_concurrency=0 is invalid"):
        NGramDecodingConfig(max_draft_len=2, max_concurrency=0)


@pytest.mark.parametrize("draft", ["llama", "llama-linear"])
def test_a_draft_model_drafts_and_the_outputs_stay(engines, tiny_dir, draft):
    """DraftTargetDecodingConfig: the model itself as its draft (its greedy drafts are its own
    tokens: all accepted for greedy requests), and another model of the same vocabulary: the tokens
    of decoding without drafts either way."""
    plain = engines[0]
    params = [SamplingParams(max_tokens=40, ignore_eos=True),
              SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.8, top_p=0.9, seed=5, logprobs=2),
              SamplingParams(max_tokens=2, ignore_eos=True), SamplingParams(max_tokens=30, stop_token_ids=[9, 22])]
    prompts = [p for p in PROMPTS[:3] for _ in params]
    per = params * 3
    want = plain.generate(prompts, per, use_tqdm=False)
    config = DraftTargetDecodingConfig(max_draft_len=3, speculative_model=str(tiny_dir(draft)))
    with _llm(tiny_dir, speculative_config=config) as spec:
        got = spec.generate(prompts, per, use_tqdm=False)
        stats = _spec_stats(spec)
        bm = spec._engine.block_manager
        assert bm.num_free_blocks == bm.num_usable_blocks
        spec.generate(PROMPTS[:3], params[0], use_tqdm=False)  # greedy alone
        greedy = _spec_stats(spec)
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.outputs[0].finish_reason == w.outputs[0].finish_reason
    assert sum(s["numDraftTokens"] for s in stats) > 0  # (another random model's drafts are rarely right)
    if draft == "llama":  # the model's own greedy drafts: every one accepted by its greedy rows
        drafted, taken = sum(s["numDraftTokens"] for s in greedy), sum(s["numAcceptedTokens"] for s in greedy)
        assert taken == drafted > 0


def test_a_draft_model_at_max_seq_len(engines, tiny_dir):
    """Sequences that end at max_seq_len: their drafts and pages stay within it."""
    plain = engines[0]
    prompts = [list(range(30, 70)), REPEAT[:41]]
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True),
                                                           use_tqdm=False)]  # fmt: skip
    config = DraftTargetDecodingConfig(max_draft_len=4, speculative_model=str(tiny_dir("llama")))
    with LLM(model=str(tiny_dir("llama")), dtype="float32", skip_tokenizer_init=True, max_batch_size=4,
             max_num_tokens=64, max_seq_len=48, speculative_config=config) as spec:  # fmt: skip
        outs = spec.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [w[: 48 - len(p)] for w, p in zip(want, prompts)]
    assert all(o.outputs[0].finish_reason == "length" for o in outs)


def test_a_draft_model_must_share_the_vocabulary_and_run_on_one_device(tiny_dir):
    config = DraftTargetDecodingConfig(max_draft_len=2, speculative_model=str(tiny_dir("llama-odd")))
    with pytest.raises(ValueError, match=r"has a vocabulary of 330 tokens, the model 320; allowed: a draft model of the "
                                         r"same vocabulary"):
        _llm(tiny_dir, speculative_config=config)
    config = DraftTargetDecodingConfig(max_draft_len=2, speculative_model=str(tiny_dir("llama")))
    with pytest.raises(ValueError, match=r"needs one device and one process \(tensor_parallel_size=1\)"):
        _llm(tiny_dir, speculative_config=config, tensor_parallel_size=2)


def test_streaming_deltas_join_to_the_final_output(engines):
    _, spec = engines
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    final = spec.generate(REPEAT, params, use_tqdm=False).outputs[0].token_ids
    seen = []
    for out in spec.generate_async(REPEAT, params, streaming=True):
        seen.append(list(out.outputs[0].token_ids))
    assert seen[-1] == final
    assert all(b[: len(a)] == a for a, b in zip(seen, seen[1:]))  # each update extends the last


def _truncated(logprobs: dict, temperature: float) -> dict[int, float]:
    """The sampling distribution of a top-k row from its raw top-k log-probabilities."""
    z = {t: lp.logprob / temperature for t, lp in logprobs.items()}
    m = max(z.values())
    total = sum(math.exp(v - m) for v in z.values())
    return {t: math.exp(v - m) / total for t, v in z.items()}


def test_unseeded_sampling_keeps_the_targets_distribution(engines, tiny_dir):
    """Three tokens after a prompt whose n-gram drafts the second and third: the joint frequencies
    of 4,000 unseeded samples against the target's own (top-k 3) probabilities, by a chi-square test
    at the 0.999 level (cells expected below 5 times merged)."""
    plain = engines[0]
    k, temperature, n = 3, 0.8, 4000
    # A request's greedy tokens enter the shared pattern pool (of a new engine: the oldest
    # continuation of a pattern is drafted); the test's prompt is its first half, so the drafts are
    # what the model would most likely write next.
    spec = _llm(tiny_dir, speculative_config=NGramDecodingConfig(max_draft_len=4))
    start, greedy = [60, 61, 62], SamplingParams(max_tokens=12)
    continuation = spec.generate(start, greedy, use_tqdm=False).outputs[0].token_ids
    prompt = start + continuation[:6]
    greedy_rows = SamplingParams(max_tokens=1, logprobs=k)
    joint = {(): 1.0}
    for _ in range(3):  # extend every prefix by each of its top-k tokens
        prefixes = list(joint)
        outs = plain.generate([prompt + list(p) for p in prefixes], greedy_rows, use_tqdm=False)
        joint = {p + (t,): joint[p] * q for p, out in zip(prefixes, outs)
                 for t, q in _truncated(out.outputs[0].logprobs[0], temperature).items()}  # fmt: skip
    spec.get_stats()
    outs = spec.generate([prompt] * n, SamplingParams(max_tokens=3, ignore_eos=True, temperature=temperature, top_k=k),
                         use_tqdm=False)  # fmt: skip
    stats = _spec_stats(spec)
    spec.shutdown()
    assert sum(s["numAcceptedTokens"] for s in stats) > 0
    assert sum(s["numDraftTokens"] for s in stats) > sum(s["numAcceptedTokens"] for s in stats)  # some rejected
    counts = {}
    for out in outs:
        key = tuple(out.outputs[0].token_ids)
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) <= set(joint)
    cells, rest = [], [0, 0.0]  # (observed, expected)
    for key, p in joint.items():
        if n * p >= 5:
            cells.append((counts.get(key, 0), n * p))
        else:
            rest[0] += counts.get(key, 0)
            rest[1] += n * p
    if rest[1] > 0:
        cells.append(tuple(rest))
    chi2 = sum((o - e) ** 2 / e for o, e in cells)
    dof = len(cells) - 1
    limit = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3  # Wilson-Hilferty, 0.999
    assert chi2 < limit, (chi2, dof, limit)


def test_ngram_drafter_rules():
    def seq(tokens, request_id=0, seq_id=0):
        from jaxllm.engine.sequence import Request, Sequence

        request = Request(request_id=request_id, prompt=None, prompt_token_ids=list(tokens), params=SamplingParams(),
                          output=None)  # fmt: skip
        return Sequence(seq_id=seq_id, request=request, index=0, token_ids=list(tokens), num_prompt_tokens=len(tokens),
                        seed=0)  # fmt: skip

    base = dict(max_draft_len=3, max_matching_ngram_size=2)
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 6, 2, 3]
    # The longest pattern first: "2 3" occurred twice; the oldest continuation by default.
    assert NGramDrafter(NGramDecodingConfig(**base)).propose(seq(tokens), 10) == [4, 5, 9]
    assert NGramDrafter(NGramDecodingConfig(**base, is_use_oldest=False)).propose(seq(tokens), 10) == [7, 8, 6]
    assert NGramDrafter(NGramDecodingConfig(**base, is_keep_all=False)).propose(seq(tokens), 10) == [7, 8, 6]
    assert NGramDrafter(NGramDecodingConfig(**base)).propose(seq(tokens), 2) == [4, 5]  # the limit
    # Only one token matches: "9 3" never occurred, "3" did.
    assert NGramDrafter(NGramDecodingConfig(**base)).propose(seq([3, 4, 5, 6, 9, 3]), 10) == [4, 5, 6]
    assert NGramDrafter(NGramDecodingConfig(**base)).propose(seq([1, 2, 3, 4]), 10) == []
    # A public pool drafts from another request's tokens; a private one does not.
    for public, want in ((True, [4, 5, 9]), (False, [])):
        drafter = NGramDrafter(NGramDecodingConfig(**base, is_public_pool=public))
        drafter.propose(seq(tokens, request_id=1, seq_id=1), 10)
        assert drafter.propose(seq([8, 8, 2, 3], request_id=2, seq_id=2), 10) == want
    assert accepted([4, 5, 9], [4, 5, 1, 2]) == 2 and accepted([4], [3, 1]) == 0 and accepted([4, 5], [4, 5, 6]) == 2


@pytest.mark.parametrize("value, error, match", [
    (NGramDecodingConfig, ValueError, r"NGramDecodingConfig.max_draft_len is required; allowed: an int in \[1, 16\]"),
    (dict(max_draft_len=0, decoding_type="NGram"), ValueError, r"max_draft_len=0 is invalid; allowed: an int in \[1, 16\]"),
    (dict(max_draft_len=4, max_matching_ngram_size=0, decoding_type="NGram"), ValueError,
     r"max_matching_ngram_size=0 is invalid"),
    (dict(max_draft_len=4, is_public_pool="yes", decoding_type="NGram"), ValueError, r"is_public_pool='yes' is invalid"),
    (dict(max_draft_len=4, decoding_type="Eagle"), ValueError, r"decoding_type='Eagle' is invalid; allowed: 'NGram', 'DraftTarget'"),
    (dict(max_draft_len=4, decoding_type="DraftTarget"), ValueError,
     r"DraftTargetDecodingConfig.speculative_model=None is invalid; allowed: a model name, directory or file"),
    ("ngram", TypeError, r"speculative_config must be an NGramDecodingConfig, a DraftTargetDecodingConfig, a dict or "
                         r"None, got str"),
])  # fmt: skip
def test_bad_configs_are_refused_naming_what_is_allowed(value, error, match):
    with pytest.raises(error, match=match):
        as_speculative_config(value() if isinstance(value, type) else value)


def test_yaml_form_and_llm_argument(tiny_dir):
    config = as_speculative_config({"decoding_type": "NGram", "max_draft_len": 2, "is_public_pool": False})
    assert config == NGramDecodingConfig(max_draft_len=2, is_public_pool=False)
    with pytest.raises(ValueError, match=r"max_draft_len=99 is invalid"):
        _llm(tiny_dir, speculative_config={"decoding_type": "NGram", "max_draft_len": 99})


@pytest.mark.slow
def test_smollm2_greedy_code_edit_is_unchanged_and_accepts_drafts(smollm2_path, smollm2_llm):
    """A code-editing prompt (the answer repeats most of the prompt) on real SmolLM2: the greedy
    tokens of decoding without drafts, most of them from accepted drafts."""
    code = ("def area(width, height):\n    return width * height\n\n\ndef perimeter(width, height):\n"
            "    return 2 * (width + height)\n")  # fmt: skip
    prompt = f"Rename `width` to `w` and `height` to `h` in this code:\n\n{code}\nThe renamed code:\n\n"
    params = SamplingParams(max_tokens=48)
    want = smollm2_llm.generate(prompt, params, use_tqdm=False).outputs[0]
    with LLM(model=str(smollm2_path), dtype="float32", max_batch_size=16, max_num_tokens=512, max_beam_width=4,
             speculative_config=NGramDecodingConfig(max_draft_len=4)) as spec:  # fmt: skip
        got = spec.generate(prompt, params, use_tqdm=False).outputs[0]
        stats = _spec_stats(spec)
    assert got.token_ids == want.token_ids and got.text == want.text
    drafted, taken = sum(s["numDraftTokens"] for s in stats), sum(s["numAcceptedTokens"] for s in stats)
    assert taken >= 0.3 * drafted > 0, (taken, drafted)
    assert sum(1 for s in stats if s["numRequestsWithDraftTokens"]) < len(want.token_ids)
