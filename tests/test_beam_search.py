"""Beam search (SamplingParams(use_beam_search=True)): the beams and scores of transformers'
generate(num_beams=...) on real SmolLM2 in float32, mixed in one batch with greedy and sampled
requests; streaming; the search's rules as plain Python; bad combinations refused."""

import pytest
import torch

from jaxllm import LLM, SamplingParams
from jaxllm.engine.beam_search import BeamSearch

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
# (width, n, length_penalty, early_stopping, max_tokens)
CASES = [(4, 2, 1.0, True, 12), (3, 3, 0.0, False, 10), (2, 1, 2.0, "never", 14), (4, 4, -0.5, True, 8)]


def _beam_params(width, n, length_penalty, early_stopping, max_tokens, **kw):
    return SamplingParams(use_beam_search=True, best_of=width, n=n, length_penalty=length_penalty,
                          early_stopping=early_stopping, max_tokens=max_tokens, **kw)  # fmt: skip


def _hf_beams(model, ids, width, n, length_penalty, early_stopping, max_tokens, stop):
    with torch.no_grad():
        g = model.generate(torch.tensor([ids]), num_beams=width, num_return_sequences=n,
                           length_penalty=length_penalty, early_stopping=early_stopping, max_new_tokens=max_tokens,
                           do_sample=False, output_scores=True, return_dict_in_generate=True, eos_token_id=stop,
                           pad_token_id=stop[0])  # fmt: skip
    out = []
    for seq, score in zip(g.sequences, g.sequences_scores):
        tokens = seq[len(ids):].tolist()
        while len(tokens) > 1 and tokens[-1] == stop[0] and tokens[-2] in stop:  # (padding after an end)
            tokens.pop()
        out.append((tokens, float(score)))
    return out


@pytest.mark.slow
def test_beams_and_scores_match_transformers_mixed_with_greedy_and_sampled(smollm2_llm, smollm2_hf):
    """Several widths, length penalties and early_stopping modes, all in one generate call beside
    greedy and seeded sampled requests: the same beams as transformers, in the same order, with
    scores (cumulative log-probability / length ** length_penalty) within 1e-4 relative (float32
    forwards of two frameworks: ~1e-5 a token); the greedy and sampled requests unchanged."""
    model, tok = smollm2_hf
    llm = smollm2_llm
    stop = sorted(set(llm.config.eos_token_ids))
    prompts, params, expected = [], [], []
    for i, case in enumerate(CASES):  # each case on one of the prompts, in turn
        ids = tok.encode(PROMPTS[i % len(PROMPTS)])
        prompts.append(ids)
        params.append(_beam_params(*case))
        expected.append(_hf_beams(model, ids, *case, stop))
    others = [SamplingParams(max_tokens=12), SamplingParams(max_tokens=12, temperature=0.8, seed=3, logprobs=2)]
    alone = [llm.generate(tok.encode(PROMPTS[0]), p, use_tqdm=False).outputs[0] for p in others]
    outs = llm.generate(prompts + [tok.encode(PROMPTS[0])] * 2, params + others, use_tqdm=False)
    for out, p, want in zip(outs, params, expected):
        assert len(out.outputs) == p.n
        got = [(o.token_ids, o.cumulative_logprob / (len(o.token_ids) ** p.length_penalty)) for o in out.outputs]
        assert [t for t, _ in got] == [t for t, _ in want], (p, got, want)
        for (_, score), (_, ref) in zip(got, want):
            assert abs(score - ref) <= 1e-4 * max(1.0, abs(ref)), (p, score, ref)
        for o in out.outputs:
            assert o.finish_reason == ("stop" if o.token_ids[-1] in stop else "length")
            assert o.text == tok.decode(o.token_ids, skip_special_tokens=True)
    for o, a in zip(outs[-2:], alone):
        assert o.outputs[0].token_ids == a.token_ids
    bm = llm._engine.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks


@pytest.mark.slow
def test_streaming_beams_end_as_the_final_ones(smollm2_llm, smollm2_hf):
    """Streaming returns the current best beams each step (replacing what was published at their
    index); the last update is the search's result, as without streaming; logprobs per token."""
    _, tok = smollm2_hf
    ids = tok.encode(PROMPTS[1])
    params = _beam_params(3, 2, 1.0, True, 10, logprobs=2)
    final = smollm2_llm.generate(ids, params, use_tqdm=False)
    updates = 0
    for out in smollm2_llm.generate_async(ids, params, streaming=True):
        updates += 1
        assert all(len(o.token_ids) <= 10 for o in out.outputs)
    assert updates > 2 and out.finished
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in final.outputs]
    assert [o.text for o in out.outputs] == [o.text for o in final.outputs]
    for o in final.outputs:
        assert len(o.logprobs) == len(o.token_ids)
        assert abs(sum(e[t].logprob for t, e in zip(o.token_ids, o.logprobs)) - o.cumulative_logprob) < 1e-4


def test_the_search_rules_as_plain_python():
    """BeamSearch alone: the first step extends beam 0 only; a continuation that ends among the
    first `width` becomes a hypothesis; the next beams are the best that do not end; with a
    diversity rate, a beam's k-th token ranks r * k lower; early_stopping=True stops at `width`
    hypotheses."""
    search = BeamSearch(2, 2, 1.0, True, 0.0, max_new_tokens=5, stop_token_ids=frozenset({0}))
    nxt = search.step([([], [(5, -0.1), (0, -0.5), (6, -1.0), (7, -2.0)])])
    assert [(c.parent, c.token) for c in nxt] == [(0, 5), (0, 6)]
    assert search.hypotheses[0].tokens == [0] and search.hypotheses[0].score == pytest.approx(-0.5)
    nxt = search.step([([5], [(0, -0.2), (8, -0.3), (9, -3.0), (1, -4.0)]),
                       ([6], [(0, -0.1), (3, -0.2), (4, -5.0), (2, -6.0)])])  # fmt: skip
    # Continuations by score: 5,0 (-0.3); 5,8 (-0.4); 6,0 (-1.1); 6,3 (-1.2): two end.
    assert [(c.parent, c.token) for c in nxt] == [] and search.done  # early stopping: 2 hypotheses
    assert [h.tokens for h in search.best()] == [[5, 0], [0]]
    assert search.best()[0].score == pytest.approx(-0.3 / 2)

    def third_step(rate):
        diverse = BeamSearch(3, 1, 0.0, True, rate, max_new_tokens=5, stop_token_ids=frozenset())
        diverse.step([([], [(5, -0.1), (6, -0.2), (7, -0.3), (8, -2.0), (9, -3.0), (4, -4.0)])])
        cands = [(1, -0.05), (2, -0.06), (3, -0.07), (10, -5.0), (11, -5.0), (12, -5.0)]
        return [(c.parent, c.token) for c in diverse.step([([5], cands), ([6], [(9, -0.05)] + cands[3:]),
                                                           ([7], [(9, -0.05)] + cands[3:])])]  # fmt: skip

    assert third_step(0.0) == [(0, 1), (0, 2), (0, 3)]
    assert third_step(0.1) == [(0, 1), (0, 2), (1, 9)]  # beam 0's third token now ranks below beam 1's first


@pytest.mark.parametrize("kwargs, message", [
    (dict(length_penalty=1.0), "applies to beam search only"),
    (dict(use_beam_search=True, best_of=11), "best_of=11 .*allowed: <= 10"),
    (dict(use_beam_search=True, best_of=2, temperature=0.7), "temperature > 0 is not allowed"),
    (dict(use_beam_search=True, best_of=2, stop="x"), "stop strings"),
    (dict(use_beam_search=True, best_of=2, early_stopping="sometimes"), "early_stopping='sometimes'"),
    (dict(use_beam_search=True, best_of=2, logprobs=5), "logprobs=5 is out of range; allowed: <= 4"),
])  # fmt: skip
def test_bad_beam_search_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_a_beam_wider_than_max_beam_width_is_refused_and_the_engine_serves_on(tiny_dir, tiny_llm):
    llm = tiny_llm("llama")
    with pytest.raises(ValueError, match=r"best_of=2 \(the beam width\) exceeds max_beam_width=1"):
        llm.generate([5, 6, 7], SamplingParams(use_beam_search=True, best_of=2), use_tqdm=False)
    with pytest.raises(ValueError, match="max_beam_width=11 is out of range"):
        LLM(model=str(tiny_dir("llama")), skip_tokenizer_init=True, max_beam_width=11)
    assert len(llm.generate([5, 6, 7], SamplingParams(max_tokens=3), use_tqdm=False).outputs[0].token_ids) == 3
