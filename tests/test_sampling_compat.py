"""TensorRT-LLM's (and vLLM's) SamplingParams and result conventions: end_id=-1, the batched logits
processor, return_log_probs, stop_reason, spaces between special tokens, max_tokens clipped at
max_seq_len, stop tokens trimmed from token_ids, logits as tensors, vLLM's bad_words /
allowed_token_ids / prompt_token_ids, bad words banned after a space. (LoRARequest's id 0:
tests/test_lora.py, on its LoRA engine.)"""

import logging

import numpy as np
import pytest
import torch

from jaxllm import LLM, RequestError, SamplingParams
from jaxllm.engine.detokenizer import Detokenizer, tokens_before
from jaxllm.engine.sequence import Sequence
from jaxllm.outputs import Delta, Logprob, RequestOutput, Update, as_logits
from jaxllm.sampling_params import BatchedLogitsProcessor, LogitsProcessor
from tests import tiny

PROMPT = [5, 17, 42, 99, 3, 250, 7, 8, 9]
EOS = tiny.COMMON["eos_token_id"]


@pytest.fixture(scope="module")
def llama(tiny_llm):
    return tiny_llm("llama")


def _generate(llm, prompt, **params):
    return llm.generate(prompt, SamplingParams(**params), use_tqdm=False).outputs[0]


def _free(llama, n=8):
    return _generate(llama, PROMPT, max_tokens=n, ignore_eos=True).token_ids


# ---- end_id=-1, stop_reason, return_log_probs ------------------------------------------------------
def test_end_id_minus_one_never_stops_at_the_end_token_and_end_tokens_give_no_stop_reason(llama):
    bias = np.zeros(tiny.VOCAB, np.float32)
    bias[EOS] = 100.0  # the end token is every step's greedy choice
    eos = _generate(llama, PROMPT, max_tokens=6, embedding_bias=bias)
    assert eos.token_ids == [EOS] and eos.finish_reason == "stop" and eos.stop_reason is None
    never = _generate(llama, PROMPT, max_tokens=6, embedding_bias=bias, end_id=-1)
    assert never.token_ids == [EOS] * 6 and never.finish_reason == "length" and never.stop_reason is None
    assert SamplingParams(end_id=-1).pad_id == -1
    free = _free(llama)
    by_end_id = _generate(llama, PROMPT, max_tokens=8, end_id=free[1])
    assert by_end_id.token_ids == free[:2] and by_end_id.finish_reason == "stop" and by_end_id.stop_reason is None
    with pytest.raises(ValueError, match=r"end_id=-2 is out of range; allowed: a token id >= 0, or -1"):
        SamplingParams(end_id=-2)


def test_return_log_probs_is_logprobs_and_newer_fields_are_accepted(llama):
    assert SamplingParams(return_log_probs=True).logprobs == 1
    assert SamplingParams(return_log_probs=True, logprobs=3).logprobs == 3
    assert SamplingParams(return_log_probs=False).logprobs is None
    out = _generate(llama, PROMPT, max_tokens=3, return_log_probs=True)
    assert len(out.logprobs) == 3 and all(t in entry for t, entry in zip(out.token_ids, out.logprobs))
    with pytest.raises(TypeError, match="return_log_probs must be a bool, got 'yes'"):
        SamplingParams(return_log_probs="yes")
    # Newer TensorRT-LLM fields, accepted where they mean what jaxllm does.
    assert SamplingParams(logprobs_mode="raw", prompt_ignore_length=0).logprobs_mode == "raw"
    with pytest.raises(NotImplementedError, match=r"logprobs_mode='processed' is not supported by jaxllm; allowed: 'raw'"):
        SamplingParams(logprobs_mode="processed")
    with pytest.raises(NotImplementedError, match=r"prompt_ignore_length=4 is not supported .* allowed: None or <= 0"):
        SamplingParams(prompt_ignore_length=4)


# ---- stop tokens trimmed from token_ids --------------------------------------------------------------
def test_a_stop_token_is_trimmed_from_token_ids_unless_include_stop_str_in_output(llama):
    free = _free(llama)
    out = _generate(llama, PROMPT, max_tokens=8, stop_token_ids=[free[2]], logprobs=0, return_generation_logits=True)
    assert out.token_ids == free[:2] and out.finish_reason == "stop" and out.stop_reason == free[2]
    assert len(out.logprobs) == 2 and out.generation_logits.shape[0] == 2
    kept = _generate(llama, PROMPT, max_tokens=8, stop_token_ids=[free[2]], include_stop_str_in_output=True)
    assert kept.token_ids == free[:3] and kept.stop_reason == free[2]
    # Streaming: the stop token is never published.
    params = SamplingParams(max_tokens=8, stop_token_ids=[free[3]])
    seen = [list(o.outputs[0].token_ids) for o in llama.generate_async(PROMPT, params, streaming=True)]
    assert seen[-1] == free[:3] and all(free[3] not in s for s in seen)


def test_published_tokens_of_a_stop_are_retracted_by_the_last_update():
    out = RequestOutput(0, None, [1, 2], 1, streaming=True)
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    out._post(Update((Delta(0, (5, 6, 7), logprobs=({5: Logprob(-1.0)}, {6: Logprob(-2.0)}, {7: Logprob(-3.0)}),
                            generation_logits=rows[:3]),)))  # fmt: skip
    out._post(Update((Delta(0, (), num_retracted=2, finish_reason="stop", stop_reason="ab"),), finished=True))
    next(out)
    assert out.outputs[0].token_ids == [5, 6, 7] and out.outputs[0].generation_logits.shape[0] == 3
    next(out)
    done = out.outputs[0]
    assert done.token_ids == [5] and list(done.logprobs[0]) == [5] and len(done.logprobs) == 1
    assert done.generation_logits.shape == (1, 3) and done.stop_reason == "ab" and out.finished


# ---- batched logits processor ----------------------------------------------------------------------
class OnlyEven(BatchedLogitsProcessor):
    """A TensorRT-LLM BatchedLogitsProcessor: the requests it is given sample even tokens only."""

    def __init__(self):
        self.calls = []

    def __call__(self, req_ids, logits, token_ids, stream_ptr, client_ids):
        self.calls.append((list(req_ids), [row.shape for row in logits], [len(t[0]) for t in token_ids], stream_ptr,
                           list(client_ids)))  # fmt: skip
        if any(t[0][-1] == 251 for t in token_ids):
            raise RuntimeError("token 251 seen")
        for row in logits:
            row[..., 1::2] = -np.inf


def _only_even(request_id, logits, token_ids, stream, client):
    logits[..., 1::2] = -np.inf


class OnlyMultiplesOfThree(LogitsProcessor):
    def __call__(self, req_id, logits, token_ids, stream_ptr, client_id):
        mask = np.ones(logits.shape[-1], bool)
        mask[::3] = False
        logits[..., mask] = -np.inf


_only_multiples_of_three = OnlyMultiplesOfThree()


def test_batched_logits_processor_edits_the_requests_that_ask_for_it(tiny_llm, llama):
    processor = OnlyEven()
    llm = tiny_llm("llama", batched_logits_processor=processor)
    flagged = SamplingParams(max_tokens=5, ignore_eos=True, apply_batched_logits_processor=True)
    own = SamplingParams(max_tokens=5, ignore_eos=True, apply_batched_logits_processor=True,
                         logits_processor=_only_multiples_of_three)  # fmt: skip
    plain = SamplingParams(max_tokens=5, ignore_eos=True)
    prompts = [PROMPT, PROMPT[:4], PROMPT, PROMPT]
    outs = llm.generate(prompts, [flagged, flagged, own, plain], use_tqdm=False)
    expected = llama.generate(prompts, [SamplingParams(max_tokens=5, ignore_eos=True, logits_processor=p)
                                        for p in (_only_even, _only_even, _only_multiples_of_three, None)],
                              use_tqdm=False)  # fmt: skip
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expected]
    assert all(t % 2 == 0 for t in outs[0].outputs[0].token_ids + outs[1].outputs[0].token_ids)
    # Once per step, for the flagged requests only (a request with its own processor is given to that).
    flagged_ids = sorted([outs[0].request_id, outs[1].request_id])
    assert len(processor.calls) == 5
    for k, (req_ids, shapes, lengths, stream, clients) in enumerate(processor.calls):
        assert sorted(req_ids) == flagged_ids and shapes == [(1, tiny.VOCAB)] * 2
        assert sorted(lengths) == [4 + k, len(PROMPT) + k] and stream is None and clients == [None, None]
    # A processor that raises fails the requests it was given; the engine keeps serving.
    with pytest.raises(RequestError, match=r"token 251 seen.*batched_logits_processor OnlyEven"):
        llm.generate([1, 251], flagged, use_tqdm=False)
    assert _generate(llm, PROMPT, max_tokens=5, ignore_eos=True).token_ids == _free(llama, 5)
    # The flag needs an LLM with a batched processor.
    with pytest.raises(ValueError, match=r"apply_batched_logits_processor=True needs an LLM made with "
                                         r"LLM\(\.\.\., batched_logits_processor=<callable>\)"):  # fmt: skip
        llama.generate(PROMPT, flagged, use_tqdm=False)
    with pytest.raises(TypeError, match="batched_logits_processor must be callable"):
        LLM(model="unused", batched_logits_processor=3)


# ---- max_tokens clipped at max_seq_len ---------------------------------------------------------------
def test_max_tokens_past_max_seq_len_is_clipped_with_a_warning(llama, caplog):
    max_seq_len = llama.max_seq_len
    prompt = (PROMPT * 200)[: max_seq_len - 3]
    with caplog.at_level(logging.WARNING, logger="jaxllm.inputs"):
        out = _generate(llama, prompt, max_tokens=32, ignore_eos=True)
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
    warnings = [r.getMessage() for r in caplog.records if "clipped" in r.getMessage()]
    assert len(warnings) == 1 and f"+ max_tokens 32 exceeds max_seq_len={max_seq_len}; max_tokens is clipped to 3" in warnings[0]
    with pytest.raises(ValueError, match=rf"prompt length {max_seq_len} leaves no room for a new token within "
                                         rf"max_seq_len={max_seq_len}; allowed: at most {max_seq_len - 1} prompt"):  # fmt: skip
        llama.generate((PROMPT * 200)[:max_seq_len], SamplingParams(max_tokens=1), use_tqdm=False)


# ---- results: logits as tensors; vLLM's names -------------------------------------------------------
def test_logits_come_back_as_torch_tensors_where_torch_is_installed(llama, monkeypatch):
    out = llama.generate(PROMPT, SamplingParams(max_tokens=3, ignore_eos=True, return_context_logits=True,
                                                return_generation_logits=True), use_tqdm=False)  # fmt: skip
    assert isinstance(out.context_logits, torch.Tensor) and out.context_logits.shape == (len(PROMPT), tiny.VOCAB)
    logits = out.outputs[0].generation_logits
    assert isinstance(logits, torch.Tensor) and logits.dtype == torch.float32 and logits.shape == (3, tiny.VOCAB)
    assert logits.argmax(-1).tolist() == out.outputs[0].token_ids  # greedy
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "torch" else object())
    values = np.ones((2, 3), np.float32)
    assert as_logits(values) is values


def test_vllm_bad_words_allowed_token_ids_and_prompt_token_ids(llama):
    free = _free(llama)
    allowed = _generate(llama, PROMPT, max_tokens=8, ignore_eos=True, allowed_token_ids=[7, 9, free[3]])
    assert set(allowed.token_ids) <= {7, 9, free[3]}
    with pytest.raises(ValueError, match=r"allowed_token_ids \[400\] are outside the vocabulary \[0, 320\)"):
        llama.generate(PROMPT, SamplingParams(allowed_token_ids=[400]), use_tqdm=False)
    with pytest.raises(ValueError, match=r"allowed_token_ids=\[\] allows no token"):
        SamplingParams(allowed_token_ids=[])
    with pytest.raises(ValueError, match="stop / bad strings need a tokenizer"):
        llama.generate(PROMPT, SamplingParams(bad_words=["x"]), use_tqdm=False)
    assert SamplingParams(bad="a", bad_words=["b", "a"]).bad_strings == ["a", "b"]
    batch = llama.generate(prompt_token_ids=[PROMPT, PROMPT[:3]], sampling_params=SamplingParams(max_tokens=4),
                           use_tqdm=False)  # fmt: skip
    assert [o.outputs[0].token_ids for o in batch] == [o.outputs[0].token_ids for o in llama.generate(
        [PROMPT, PROMPT[:3]], SamplingParams(max_tokens=4), use_tqdm=False)]  # fmt: skip
    one = llama.generate(prompt_token_ids=PROMPT, sampling_params=SamplingParams(max_tokens=4), use_tqdm=False)
    assert one.prompt_token_ids == PROMPT and one.outputs[0].token_ids == batch[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="with prompt_token_ids, inputs must be None or the prompts' texts"):
        llama.generate([PROMPT], prompt_token_ids=[PROMPT, PROMPT])


# ---- text: a real BPE tokenizer -------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path):
    from jaxllm.tokenizer import gguf_tokenizer

    return gguf_tokenizer(smollm2_path)


def _detokenize(detokenizer, prompt_ids, output_ids, skip=False, spaces=True):
    seq = Sequence(seq_id=0, request=None, index=0, token_ids=list(prompt_ids), num_prompt_tokens=len(prompt_ids),
                   seed=0)  # fmt: skip
    detokenizer.start(seq)
    for token in output_ids:
        seq.token_ids.append(token)
        detokenizer.step(seq, skip, spaces)
    return seq


def test_spaces_between_special_tokens_go_between_tokens_only(smollm2_tokenizer):
    tok = smollm2_tokenizer
    detokenizer = Detokenizer(tok)
    end, start = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|im_start|>")
    hello, again = tok.encode("Hello world", add_special_tokens=False), tok.encode(" again", add_special_tokens=False)
    seq = _detokenize(detokenizer, hello, [end, start] + again)
    assert seq.text == "<|im_end|> <|im_start|>  again" == detokenizer.decode(seq.output_token_ids, False, True)
    # A prompt that ends with a special token: no space before the output either.
    assert _detokenize(detokenizer, hello + [start], hello).text == "Hello world"
    assert _detokenize(detokenizer, hello, [end], spaces=False).text == "<|im_end|>"
    assert _detokenize(detokenizer, hello, hello).text == tok.decode(hello + hello)[len("Hello world") :]
    # The tokens before a stop string: those whose text ends where it starts.
    seq = _detokenize(detokenizer, hello, again + hello)
    assert seq.text == " againHello world"
    assert tokens_before(detokenizer, seq, seq.text.index("Hello"), False, True) == len(again)
    assert tokens_before(detokenizer, seq, seq.text.index("ello"), False, True) == len(again)


def test_stop_strings_trim_their_tokens_and_bad_words_are_banned_after_a_space(smollm2_llm):
    tok = smollm2_llm.tokenizer
    prompt = "The capital of France is Paris. The capital of Germany is"
    free = _generate(smollm2_llm, prompt, max_tokens=12, ignore_eos=True)
    # A stop string that starts inside a token: the tokens before that token remain.
    words = free.text.split()
    stop = words[1][1:] + " " + words[2]
    index = free.text.index(stop)
    out = _generate(smollm2_llm, prompt, max_tokens=12, ignore_eos=True, stop=stop)
    assert out.text == free.text[:index] and out.stop_reason == stop and out.finish_reason == "stop"
    assert free.token_ids[: len(out.token_ids)] == out.token_ids and len(out.token_ids) < len(free.token_ids)
    assert len(tok.decode(out.token_ids)) <= index < len(tok.decode(free.token_ids[: len(out.token_ids) + 1]))
    kept = _generate(smollm2_llm, prompt, max_tokens=12, ignore_eos=True, stop=stop, include_stop_str_in_output=True)
    assert kept.text == free.text[: index + len(stop)] and tok.decode(kept.token_ids).endswith(stop)
    # Streaming: tokens published before the stop string was seen are retracted at the end.
    params = SamplingParams(max_tokens=12, ignore_eos=True, stop=stop)
    published = [list(step.outputs[0].token_ids) for step in smollm2_llm.generate_async(prompt, params, streaming=True)]
    assert published[-1] == out.token_ids and max(map(len, published)) >= len(out.token_ids)
    # Bad words: "Berlin" is banned as " Berlin" too (byte-level BPE spells them differently).
    assert "Berlin" in free.text
    spellings = smollm2_llm._requests._bad_word_spellings("Berlin")
    assert spellings == [tuple(tok.encode("Berlin", add_special_tokens=False)),
                         tuple(tok.encode(" Berlin", add_special_tokens=False))]  # fmt: skip
    assert SamplingParams(bad="Berlin").bad_strings == SamplingParams(bad_words=["Berlin"]).bad_strings
    banned = _generate(smollm2_llm, prompt, max_tokens=12, ignore_eos=True, bad_words=["Berlin"])
    assert "Berlin" not in banned.text
