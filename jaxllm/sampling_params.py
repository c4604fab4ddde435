"""SamplingParams: TensorRT-LLM's field names and defaults, validated at construction.

Where TensorRT-LLM and vLLM differ, jaxllm does what the user evidently means:
  * `SamplingParams()` is greedy, and so is `temperature=0` (or `top_k=1`).
  * A positive temperature with no top_k/top_p/min_p samples the full distribution.
  * Setting only top_k/top_p/min_p samples at temperature 1.
  * `logprobs=k` returns, per generated token, the sampled token's log-probability and the k most
    likely tokens (vLLM's convention); log-probabilities are those of the model's distribution
    before temperature, penalties and truncation. `return_log_probs=True` (TensorRT-LLM's older
    name) is `logprobs=True`.
  * `end_id=-1` never stops at an end token (TensorRT-LLM's idiom; `ignore_eos=True` alike).
  * vLLM's `bad_words` (TensorRT-LLM's `bad`) and `allowed_token_ids` are accepted too. A bad word
    is banned as written and, where the tokenizer spells it otherwise after a space (byte-level
    BPE), with a leading space as well (as vLLM does): `bad="Paris"` bans " Paris" too.
  * `guided_decoding=GuidedDecodingParams(json=..., regex=..., grammar=..., choice=..., json_object=True,
    structural_tag=...)` constrains the output (jaxllm/guided.py; the LLM needs a guided_decoding_backend).
  * `use_beam_search=True` searches `best_of` beams (the beam width, at most LLM(max_beam_width)) and
    returns the `n` best by cumulative log-probability / generated length ** length_penalty
    (jaxllm/engine/beam_search.py: Hugging Face transformers' algorithm). TensorRT-LLM's defaults:
    length_penalty 0.0 (no length normalisation) and early_stopping 1 (stop once `best_of`
    hypotheses are finished); early_stopping 0 judges heuristically whether a running beam may
    still win, and "never" (or any other int, as TensorRT-LLM reads it) runs on until none can.
    beam_search_diversity_rate r ranks each beam's k-th best token r * k lower. Greedy only: no
    temperature, truncation, penalties, bans, stop strings, min_tokens, grammars or logits processors.
Fields of TensorRT-LLM that jaxllm does not implement (lookahead, top-p decay, ...) are accepted by
name so scripts construct unchanged, and raise NotImplementedError naming the feature when set.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, Callable, List, Optional, Union

import numpy as np

from jaxllm.guided import GuidedDecodingParams

MAX_LOGPROBS = 20  # the largest `logprobs` / `prompt_logprobs`; fixed so the step has one shape


def _check_int(name: str, value, low: int | None = None, high: int | None = None, allow_none=True):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name}={value} is out of range; allowed: >= {low}" + (f" and <= {high}" if high else ""))
    if high is not None and value > high:
        raise ValueError(f"{name}={value} is out of range; allowed: <= {high}")


def _check_float(name: str, value, low=None, high=None, low_open=False, allow_none=True):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} must be finite")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and value > high
    if bad_low or bad_high:
        lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = "" if high is None else f"<= {high}"
        raise ValueError(f"{name}={value} is out of range; allowed: {' and '.join(x for x in (lo, hi) if x)}")


def _check_int_list(name: str, value):
    if value is None:
        return
    if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise TypeError(f"{name} must be a list of ints, got {value!r}")
    if any(v < 0 for v in value):
        raise ValueError(f"{name} holds negative token ids: {[v for v in value if v < 0]}")


def _check_bias(value) -> None:
    """embedding_bias: numbers, each finite in float32 or -inf (a ban), and not every one a ban (its
    length is checked against the vocabulary at generate)."""
    try:
        with np.errstate(over="ignore"):
            bias = np.asarray(value, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError) as e:
        raise TypeError(f"embedding_bias must be a float array-like, one entry per vocabulary token ({e})") from None
    bad = np.flatnonzero(np.isnan(bias) | (bias == np.inf))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"embedding_bias[{i}]={float(bias[i])} is not finite in float32 ({bad.size} such entries); "
                         "allowed: finite values, and -inf to ban a token")  # fmt: skip
    if bias.size and np.isneginf(bias).all():
        raise ValueError(f"embedding_bias is -inf for all {bias.size} tokens, which bans every token; allowed: "
                         "-inf bans that leave at least one token to sample")  # fmt: skip


def _check_strs(name: str, value):
    if value is None:
        return
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or any(not isinstance(s, str) for s in items):
        raise TypeError(f"{name} must be a str or a list of str, got {value!r}")
    if any(s == "" for s in items):
        raise ValueError(f"{name} must not contain empty strings")


class LogitsProcessor(abc.ABC):
    """TensorRT-LLM's base class of a request's logits processor (`SamplingParams.logits_processor`);
    any callable of the same signature serves as well."""

    @abc.abstractmethod
    def __call__(self, req_id: int, logits: np.ndarray, token_ids: List[List[int]], stream_ptr: Optional[int],
                 client_id: Optional[int]) -> Optional[np.ndarray]:  # fmt: skip
        """Edit `logits` ([1, vocab] float32) in place, or return the new values.

        Args:
          req_id: the request's id; token_ids: its tokens so far, prompt included (one beam);
          stream_ptr, client_id: None in jaxllm (no CUDA stream, no client ids).
        """


class BatchedLogitsProcessor(abc.ABC):
    """TensorRT-LLM's base class of the LLM's batched logits processor (`LLM(batched_logits_processor=
    ...)`), called once per step for the requests that set `apply_batched_logits_processor`; any
    callable of the same signature serves as well."""

    @abc.abstractmethod
    def __call__(self, req_ids: List[int], logits: List[np.ndarray], token_ids: List[List[List[int]]],
                 stream_ptr: Optional[int], client_ids: List[Optional[int]]) -> Optional[list]:  # fmt: skip
        """Edit each request's `logits` ([1, vocab] float32) in place, or return a list of new values
        (None keeps a row); the other arguments as `LogitsProcessor`'s, one entry per request."""


# TensorRT-LLM fields jaxllm does not implement: name -> the default that means "off".
_UNSUPPORTED = {
    "top_p_min": None,
    "top_p_reset_ids": None,
    "top_p_decay": None,
    "no_repeat_ngram_size": None,
    "beam_width_array": None,
    "return_encoder_output": False,
    "additional_model_outputs": None,
    "lookahead_config": None,
}


@dataclasses.dataclass(kw_only=True)
class SamplingParams:
    """Sampling parameters for text generation (TensorRT-LLM's `SamplingParams`)."""

    end_id: Optional[int] = None
    pad_id: Optional[int] = None
    max_tokens: int = 32
    bad: Optional[Union[str, List[str]]] = None
    bad_token_ids: Optional[List[int]] = None
    stop: Optional[Union[str, List[str]]] = None
    stop_token_ids: Optional[List[int]] = None
    include_stop_str_in_output: bool = False
    embedding_bias: Any = None  # [vocab_size] float array-like, added to the logits
    logits_processor: Optional[Union[Callable, List[Callable]]] = None
    # The LLM's batched_logits_processor edits this request's logits (TensorRT-LLM's rule: a request
    # with its own logits_processor is given to that one instead).
    apply_batched_logits_processor: bool = False

    n: int = 1
    best_of: Optional[int] = None
    use_beam_search: bool = False

    top_k: Optional[int] = None
    top_p: Optional[float] = None
    top_p_min: Optional[float] = None
    top_p_reset_ids: Optional[int] = None
    top_p_decay: Optional[float] = None
    seed: Optional[int] = None
    temperature: Optional[float] = None
    min_tokens: Optional[int] = None
    beam_search_diversity_rate: Optional[float] = None
    repetition_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    prompt_ignore_length: Optional[int] = None  # accepted off only (None or <= 0): penalties see the whole prompt
    length_penalty: Optional[float] = None
    early_stopping: Optional[Union[int, bool, str]] = None
    no_repeat_ngram_size: Optional[int] = None
    min_p: Optional[float] = None
    beam_width_array: Optional[List[int]] = None

    logprobs: Optional[int] = None
    logprobs_mode: Any = "raw"  # TensorRT-LLM's LogprobMode: "raw" (the model's distribution) only
    prompt_logprobs: Optional[int] = None
    return_log_probs: bool = False  # TensorRT-LLM's older name: True is logprobs=True
    return_context_logits: bool = False
    return_generation_logits: bool = False
    exclude_input_from_output: bool = True
    return_encoder_output: bool = False
    return_perf_metrics: bool = False
    additional_model_outputs: Any = None

    lookahead_config: Any = None
    guided_decoding: Optional[GuidedDecodingParams] = None  # jaxllm/guided.py; needs LLM(guided_decoding_backend=...)

    ignore_eos: bool = False
    detokenize: bool = True
    add_special_tokens: bool = True
    truncate_prompt_tokens: Optional[int] = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    # vLLM's names: bad_words are banned as `bad` strings are; only allowed_token_ids may be sampled.
    bad_words: Optional[List[str]] = None
    allowed_token_ids: Optional[List[int]] = None

    def __post_init__(self):
        if self.pad_id is None:
            self.pad_id = self.end_id
        if self.best_of is None:
            self.best_of = self.n
        # logprobs=True means the sampled token's log-probability alone (TensorRT-LLM's top-1).
        if isinstance(self.logprobs, bool):
            self.logprobs = int(self.logprobs) if self.logprobs else None
        if isinstance(self.prompt_logprobs, bool):
            self.prompt_logprobs = int(self.prompt_logprobs) if self.prompt_logprobs else None
        if not isinstance(self.return_log_probs, bool):
            raise TypeError(f"return_log_probs must be a bool, got {self.return_log_probs!r}")
        if self.return_log_probs and self.logprobs is None:
            self.logprobs = 1
        self._validate()

    def _validate(self) -> None:
        if self.guided_decoding is not None and not isinstance(self.guided_decoding, GuidedDecodingParams):
            raise TypeError(f"guided_decoding must be a GuidedDecodingParams, got {type(self.guided_decoding).__name__}")
        for name, off in _UNSUPPORTED.items():
            if getattr(self, name) != off:
                raise NotImplementedError(f"SamplingParams.{name} is not supported by jaxllm (got {getattr(self, name)!r})")
        for name in ("end_id", "pad_id"):
            value = getattr(self, name)
            _check_int(name, value)
            if value is not None and value < -1:
                raise ValueError(f"{name}={value} is out of range; allowed: a token id >= 0, or -1 (never stop at "
                                 "an end token)")  # fmt: skip
        _check_int("max_tokens", self.max_tokens, 1, allow_none=False)
        _check_int("n", self.n, 1, allow_none=False)
        _check_int("best_of", self.best_of, 1)
        if self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) cannot be less than n ({self.n})")
        if not isinstance(self.use_beam_search, bool):
            raise TypeError(f"use_beam_search must be a bool, got {self.use_beam_search!r}")
        self._validate_beam_search()
        if self.best_of > 1 and self.is_greedy and not self.use_beam_search:
            raise ValueError(
                f"greedy decoding returns one sequence; got best_of={self.best_of} (n={self.n}). "
                "Set temperature > 0 (or top_k/top_p) to sample several, or n=1."
            )
        _check_int("top_k", self.top_k, 0)
        _check_float("top_p", self.top_p, 0.0, 1.0)
        _check_float("min_p", self.min_p, 0.0, 1.0)
        _check_float("temperature", self.temperature, 0.0)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        _check_int("min_tokens", self.min_tokens, 0)
        if self.min_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) cannot exceed max_tokens ({self.max_tokens})")
        _check_float("repetition_penalty", self.repetition_penalty, 0.0, low_open=True)
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_int("prompt_ignore_length", self.prompt_ignore_length)
        if self.prompt_ignore_length is not None and self.prompt_ignore_length > 0:
            raise NotImplementedError(f"SamplingParams.prompt_ignore_length={self.prompt_ignore_length} is not supported "
                                      "by jaxllm (penalties count every prompt token); allowed: None or <= 0")  # fmt: skip
        mode = getattr(self.logprobs_mode, "value", self.logprobs_mode)
        if mode != "raw":
            raise NotImplementedError(f"SamplingParams.logprobs_mode={self.logprobs_mode!r} is not supported by jaxllm; "
                                      "allowed: 'raw' (log-probabilities of the model's distribution, before "
                                      "temperature, penalties and truncation)")  # fmt: skip
        _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        _check_int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS)
        _check_int("truncate_prompt_tokens", self.truncate_prompt_tokens, 1)
        _check_int_list("stop_token_ids", self.stop_token_ids)
        _check_int_list("bad_token_ids", self.bad_token_ids)
        _check_int_list("allowed_token_ids", self.allowed_token_ids)
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("allowed_token_ids=[] allows no token; allowed: None or a non-empty list of token ids")
        if self.embedding_bias is not None:
            _check_bias(self.embedding_bias)
        _check_strs("stop", self.stop)
        _check_strs("bad", self.bad)
        _check_strs("bad_words", self.bad_words)
        processors = self.logits_processor
        if processors is not None:
            for p in processors if isinstance(processors, (list, tuple)) else [processors]:
                if not callable(p):
                    raise TypeError(f"logits_processor must be callable (or a list of callables), got {p!r}")
        for name in ("include_stop_str_in_output", "apply_batched_logits_processor", "return_context_logits",
                     "return_generation_logits",
                     "exclude_input_from_output", "return_perf_metrics", "ignore_eos", "detokenize",
                     "add_special_tokens", "skip_special_tokens", "spaces_between_special_tokens"):  # fmt: skip
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def _validate_beam_search(self) -> None:
        beam_only = {"length_penalty": self.length_penalty, "early_stopping": self.early_stopping,
                     "beam_search_diversity_rate": self.beam_search_diversity_rate}  # fmt: skip
        if not self.use_beam_search:
            for name, value in beam_only.items():
                if value is not None:
                    raise ValueError(f"{name}={value!r} applies to beam search only; set use_beam_search=True "
                                     "(with best_of, the beam width) or leave it None")  # fmt: skip
            return
        width = self.best_of
        if 2 * width > MAX_LOGPROBS:
            raise ValueError(f"use_beam_search: best_of={width} (the beam width) is out of range; allowed: "
                             f"<= {MAX_LOGPROBS // 2}")  # fmt: skip
        _check_float("length_penalty", self.length_penalty)
        _check_float("beam_search_diversity_rate", self.beam_search_diversity_rate, 0.0)
        stopping = self.early_stopping
        if not (stopping is None or isinstance(stopping, (bool, int)) or stopping == "never"):
            raise ValueError(f"early_stopping={stopping!r} is not allowed; allowed: True / 1, False / 0, "
                             "'never' (or any other int), or None (1)")  # fmt: skip
        refused = {
            "temperature > 0": self.temperature not in (None, 0) and not self.is_greedy,
            "top_k": self.top_k not in (None, 0, 1),
            "top_p": self.top_p not in (None, 1.0),
            "min_p": bool(self.min_p),
            "repetition / presence / frequency penalties": self.uses_penalties,
            "stop strings (stop)": bool(self.stop),
            "bad / bad_words / bad_token_ids": bool(self.bad or self.bad_words or self.bad_token_ids),
            "allowed_token_ids": self.allowed_token_ids is not None,
            "embedding_bias": self.embedding_bias is not None,
            "min_tokens": bool(self.min_tokens),
            "logits_processor / apply_batched_logits_processor": bool(self.logits_processor)
            or self.apply_batched_logits_processor,
            "guided_decoding": self.guided_decoding is not None,
            "return_generation_logits": self.return_generation_logits,
            "prompt_logprobs / return_context_logits": self.prompt_logprobs is not None or self.return_context_logits,
        }
        for name, on in refused.items():
            if on:
                raise ValueError(f"use_beam_search=True searches greedily over the model's log-probabilities; "
                                 f"{name} is not allowed with it")  # fmt: skip
        if self.logprobs is not None and self.logprobs > 2 * width:
            raise ValueError(f"use_beam_search: logprobs={self.logprobs} is out of range; allowed: <= {2 * width} "
                             "(twice the beam width: the candidates each beam step reads)")  # fmt: skip

    @property
    def beam_early_stopping(self):
        """early_stopping as the search reads it: True, False or "never" (TensorRT-LLM's ints: 1, 0, other)."""
        stopping = 1 if self.early_stopping is None else self.early_stopping
        if stopping is True or stopping is False or stopping == "never":
            return stopping
        return {1: True, 0: False}.get(stopping, "never")

    # ---- derived views used by the engine ---------------------------------------------------
    @property
    def is_greedy(self) -> bool:
        if self.temperature == 0 or self.top_k == 1:
            return True
        return self.temperature is None and self.top_k is None and self.top_p is None and self.min_p is None

    @property
    def effective_temperature(self) -> float:
        return 0.0 if self.is_greedy else (1.0 if self.temperature is None else float(self.temperature))

    @property
    def stop_strings(self) -> list[str]:
        return [] if self.stop is None else ([self.stop] if isinstance(self.stop, str) else list(self.stop))

    @property
    def bad_strings(self) -> list[str]:
        """`bad` and `bad_words`, in order, once each."""
        strings = []
        for value in (self.bad, self.bad_words):
            if value is not None:
                strings += [value] if isinstance(value, str) else list(value)
        return list(dict.fromkeys(strings))

    @property
    def uses_penalties(self) -> bool:
        """Repetition, presence or frequency penalty in effect (they read the tokens so far)."""
        return self.repetition_penalty not in (None, 1.0) or bool(self.presence_penalty) or bool(self.frequency_penalty)

    @property
    def wants_logits(self) -> bool:
        """The host needs each sampled row's logits (generation logits returned, or logits processors)."""
        return self.return_generation_logits or bool(self.logits_processors) or self.apply_batched_logits_processor

    @property
    def logits_processors(self) -> list[Callable]:
        p = self.logits_processor
        return [] if p is None else (list(p) if isinstance(p, (list, tuple)) else [p])
