"""Prompt forms accepted by generate / generate_async / preprocess, their validation, and building
a Request from one (`RequestFactory`: stop tokens, bans, bias, request-level arguments, adapters).

A prompt is a string, a list of token ids, or a dict with "prompt" (text) or "prompt_token_ids".
A batch is a list (or tuple) of prompts. Everything is checked here, before any device work:
empty prompts, token ids outside the vocabulary, prompts that leave no room below max_seq_len, a
dict's text and token ids that disagree, an embedding_bias that is not finite or bans every token.
A prompt whose max_tokens reaches past max_seq_len is served: it generates what fits and finishes
with "length", with a warning (TensorRT-LLM clips max_tokens so; vLLM stops at the limit too).

A dict with both "prompt" and "prompt_token_ids" is generated from its token ids, as TensorRT-LLM
and vLLM do (the text only labels the output); neither framework checks that the two agree, and a
mismatch silently answers another prompt than the one shown, so with a tokenizer jaxllm refuses ids
that are not the text's tokens (with or without special tokens). Without one it cannot tell, and
the ids are used as given.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Any, Callable, Optional, Sequence

import numpy as np

from jaxllm.adapters import LoRARequest, PromptAdapterRequest
from jaxllm.config import ModelConfig
from jaxllm.disaggregated_params import DisaggregatedParams
from jaxllm.engine.sequence import BiasRow, Request
from jaxllm.layers.sampling import BAN_WIDTH
from jaxllm.llm_args import KvCacheRetentionConfig
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import SamplingParams
from jaxllm.scheduling_params import SchedulingParams

logger = logging.getLogger(__name__)

# The seed's request-level arguments of generate / generate_async and the type each takes.
REQUEST_EXTRAS = {
    "lora_request": LoRARequest,
    "prompt_adapter_request": PromptAdapterRequest,
    "kv_cache_retention_config": KvCacheRetentionConfig,
    "disaggregated_params": DisaggregatedParams,
    "scheduling_params": SchedulingParams,
    "cache_salt": str,
}


@dataclasses.dataclass(frozen=True)
class PreprocessedInputs:
    """A tokenized, validated prompt with its SamplingParams (what `LLM.preprocess` returns)."""

    prompt: Optional[str]
    prompt_token_ids: tuple[int, ...]
    sampling_params: SamplingParams


def is_single_prompt(inputs: Any) -> bool:
    if isinstance(inputs, (str, dict, PreprocessedInputs)):
        return True
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, (int, np.integer)) for t in inputs):
        return not any(isinstance(t, bool) for t in inputs)
    return False


def as_prompt_list(inputs: Any) -> tuple[list, bool]:
    """(list of single prompts, whether the caller passed one prompt)."""
    if is_single_prompt(inputs):
        return [inputs], True
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ValueError("inputs is an empty list; pass a prompt or a non-empty list of prompts")
        return list(inputs), False
    raise TypeError(
        f"inputs must be a str, a list of token ids, a dict with 'prompt' or 'prompt_token_ids', "
        f"or a list of these; got {type(inputs).__name__}"
    )


def with_prompt_token_ids(inputs: Any, prompt_token_ids: Any) -> Any:
    """generate's inputs from vLLM's older keywords: `prompt_token_ids` (a list of token ids, or a list
    of them) alone, or with the prompts' texts in `inputs` (they label the outputs, as a dict
    prompt's "prompt" does)."""
    if prompt_token_ids is None:
        if inputs is None:
            raise TypeError("generate() needs inputs (prompts), or prompt_token_ids")
        return inputs
    if inputs is None:
        return prompt_token_ids
    if isinstance(inputs, str) and is_single_prompt(prompt_token_ids):
        return {"prompt": inputs, "prompt_token_ids": prompt_token_ids}
    texts_ok = isinstance(inputs, (list, tuple)) and all(isinstance(t, str) for t in inputs)
    ids_ok = isinstance(prompt_token_ids, (list, tuple)) and not is_single_prompt(prompt_token_ids)
    if not (texts_ok and ids_ok and len(inputs) == len(prompt_token_ids)):
        raise ValueError("with prompt_token_ids, inputs must be None or the prompts' texts: one str for one list of "
                         "token ids, or a list of str as long as the list of token id lists")  # fmt: skip
    return [{"prompt": t, "prompt_token_ids": ids} for t, ids in zip(inputs, prompt_token_ids)]


def params_list(sampling_params, n: int) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * n
    if isinstance(sampling_params, (list, tuple)):
        if len(sampling_params) != n:
            raise ValueError(f"got {len(sampling_params)} SamplingParams for {n} prompts; pass one, or one per prompt")
        for i, p in enumerate(sampling_params):
            if not isinstance(p, SamplingParams):
                raise TypeError(f"sampling_params[{i}] must be a SamplingParams, got {type(p).__name__}")
        return list(sampling_params)
    raise TypeError(f"sampling_params must be a SamplingParams or a list of them, got {type(sampling_params).__name__}")


def per_prompt(value, n: int, name: str) -> list:
    """One value for every prompt, from one value (shared) or a list of n values."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"got {len(value)} {name} for {n} prompts; pass one, or one per prompt")
        return list(value)
    return [value] * n


def request_extras(n: int, **extras) -> list[dict]:
    """Validate the request-level arguments and spread them over n prompts (one value shared, or
    a list of one per prompt): a list of n {name: value} dicts."""
    per = {}
    for name, value in extras.items():
        kind = REQUEST_EXTRAS[name]
        values = per_prompt(value, n, name)
        for i, v in enumerate(values):
            if v is None:
                continue
            where = f"{name}[{i}]" if isinstance(value, (list, tuple)) else name
            if not isinstance(v, kind):
                raise TypeError(f"{where} must be a {kind.__name__} or None, got {type(v).__name__}")
            if name == "cache_salt" and not v:
                raise ValueError(f"{where}={v!r} is invalid; allowed: a non-empty str or None")
        per[name] = values
    return [{name: values[i] for name, values in per.items()} for i in range(n)]


def tokenize_prompt(prompt: Any, params: SamplingParams, tokenizer, vocab_size: int,
                    where: str = "prompt") -> tuple[Optional[str], list[int]]:  # fmt: skip
    """(text or None, token ids) of one prompt, validated."""
    if isinstance(prompt, dict):
        unknown = set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data", "mm_processor_kwargs"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: 'prompt', 'prompt_token_ids'")
        if prompt.get("multi_modal_data") is not None:
            raise NotImplementedError(f"{where}: multi_modal_data is not supported (text models only)")
        if "prompt_token_ids" in prompt and prompt["prompt_token_ids"] is not None:
            text, ids = prompt.get("prompt"), prompt["prompt_token_ids"]
        elif "prompt" in prompt:
            text, ids = prompt["prompt"], None
        else:
            raise ValueError(f"{where}: a dict prompt needs 'prompt' or 'prompt_token_ids'")
    elif isinstance(prompt, str):
        text, ids = prompt, None
    elif isinstance(prompt, (list, tuple)):
        text, ids = None, prompt
    else:
        raise TypeError(f"{where}: must be a str, a list of token ids or a dict, got {type(prompt).__name__}")
    if ids is None:
        if not isinstance(text, str):
            raise TypeError(f"{where}: 'prompt' must be a str, got {type(text).__name__}")
        if text == "":
            raise ValueError(f"{where}: the prompt is empty")
        if tokenizer is None:
            raise ValueError(f"{where}: a text prompt needs a tokenizer (the LLM was made with skip_tokenizer_init=True)")
        ids = tokenizer.encode(text, add_special_tokens=params.add_special_tokens)
    ids = list(ids)
    if not ids:
        raise ValueError(f"{where}: the prompt has no tokens")
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, (int, np.integer))]
    if bad:
        raise TypeError(f"{where}: token ids must be ints, got {bad[:5]}")
    out_of_range = [int(t) for t in ids if not 0 <= t < vocab_size]
    if out_of_range:
        raise ValueError(f"{where}: token ids {out_of_range[:5]} are outside the vocabulary [0, {vocab_size})")
    ids = [int(t) for t in ids]
    if isinstance(prompt, dict) and text is not None:
        check_text_matches_ids(text, ids, params, tokenizer, where)
    if params.truncate_prompt_tokens is not None:
        ids = ids[-params.truncate_prompt_tokens :]
    return text, ids


def check_text_matches_ids(text: Any, ids: list[int], params: SamplingParams, tokenizer, where: str) -> None:
    """A dict prompt's "prompt" must be a str whose tokens are `ids` (checked when there is a tokenizer)."""
    if not isinstance(text, str):
        raise TypeError(f"{where}: 'prompt' must be a str or None, got {type(text).__name__}")
    if tokenizer is None:
        return
    def tokens(special: bool) -> list[int]:
        return [int(t) for t in tokenizer.encode(text, add_special_tokens=special)]

    first = tokens(params.add_special_tokens)
    if ids == first or ids == tokens(not params.add_special_tokens):  # the other only when needed
        return
    at = next((i for i, (a, b) in enumerate(zip(first, ids)) if a != b), min(len(first), len(ids)))
    raise ValueError(
        f"{where}: 'prompt' and 'prompt_token_ids' disagree: the text tokenizes to {len(first)} tokens "
        f"{_excerpt(first, at)} and prompt_token_ids has {len(ids)} {_excerpt(ids, at)} (they differ from position "
        f"{at}); pass one of them, or token ids that are the text's tokens"
    )


def _excerpt(ids: list[int], at: int, width: int = 4) -> str:
    start = max(0, at - width)
    head, tail = ("..., " if start else ""), (", ..." if at + width < len(ids) else "")
    return f"[{head}{', '.join(map(str, ids[start : at + width]))}{tail}]"


def check_lengths(ids: Sequence[int], max_seq_len: int, max_input_len: int | None, where: str = "prompt",
                  num_virtual_tokens: int = 0) -> None:  # fmt: skip
    """The prompt (and a prompt adapter's virtual tokens, which take KV positions too) must leave room
    for one new token below max_seq_len (max_tokens is clipped to what fits: `warn_if_clipped`)."""
    if max_input_len is not None and len(ids) > max_input_len:
        raise ValueError(f"{where}: {len(ids)} tokens exceed max_input_len={max_input_len}")
    used = len(ids) + num_virtual_tokens
    if used >= max_seq_len:
        virtual = f" + {num_virtual_tokens} virtual tokens" if num_virtual_tokens else ""
        raise ValueError(f"{where}: prompt length {len(ids)}{virtual} leaves no room for a new token within "
                         f"max_seq_len={max_seq_len}; allowed: at most {max_seq_len - 1 - num_virtual_tokens} "
                         "prompt tokens")  # fmt: skip


def warn_if_clipped(request_id: int, num_tokens: int, params: SamplingParams, max_seq_len: int) -> None:
    """Warn (once per request) when max_tokens reaches past max_seq_len for a prompt of `num_tokens`
    KV positions: the request generates max_seq_len - num_tokens tokens at most, then finishes with
    "length"."""
    if num_tokens + params.max_tokens > max_seq_len:
        logger.warning("request %d: prompt length %d + max_tokens %d exceeds max_seq_len=%d; max_tokens is clipped "
                       "to %d", request_id, num_tokens, params.max_tokens, max_seq_len, max_seq_len - num_tokens)

def check_params_against_model(params: SamplingParams, vocab_size: int, tokenizer, where: str) -> None:
    for name in ("stop_token_ids", "bad_token_ids"):
        ids = getattr(params, name) or []
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise ValueError(f"{where}: {name} {bad} are outside the vocabulary [0, {vocab_size})")
    allowed = params.allowed_token_ids or []
    bad = [t for t in allowed if t >= vocab_size]
    if bad:
        raise ValueError(f"{where}: allowed_token_ids {bad} are outside the vocabulary [0, {vocab_size})")
    for name in ("end_id", "pad_id"):
        value = getattr(params, name)
        if value is not None and value >= vocab_size:
            raise ValueError(f"{where}: {name}={value} is outside the vocabulary [0, {vocab_size})")
    if params.embedding_bias is not None:
        bias = np.asarray(params.embedding_bias, dtype=np.float32).reshape(-1)
        if bias.shape[0] != vocab_size:
            raise ValueError(f"{where}: embedding_bias has {bias.shape[0]} entries; the vocabulary has {vocab_size}")
    banned = np.isneginf(bias) if params.embedding_bias is not None else np.zeros(vocab_size, bool)
    banned[[t for t in params.bad_token_ids or [] if t < vocab_size]] = True
    if allowed:
        banned |= ~np.isin(np.arange(vocab_size), allowed)
    if banned.all():
        sources = ["embedding_bias (-inf entries)", "bad_token_ids"] + (["allowed_token_ids"] if allowed else [])
        raise ValueError(f"{where}: {', '.join(sources[:-1])} and {sources[-1]} ban all {vocab_size} tokens of the "
                         "vocabulary; allowed: bans that leave at least one token to sample")  # fmt: skip
    if (params.stop or params.bad_strings) and tokenizer is None:
        raise ValueError(f"{where}: stop / bad strings need a tokenizer (skip_tokenizer_init=True was given)")
    if params.stop and not params.detokenize:
        raise ValueError(f"{where}: stop strings are matched on text; they need detokenize=True")


class RequestFactory:
    """Makes one LLM's Requests: validates and tokenizes prompts, loads their adapters, and builds
    the Request with its stop tokens, bans and bias row, so that anything the engine cannot serve
    raises in the caller's thread.

    Args:
      config: the checkpoint's model config; tokenizer: the LLM's (None: token ids only).
      max_seq_len, max_input_len, max_batch_size: the engine's bounds.
      lora_cache, prompt_cache: the host adapter caches (None: adapters of that kind disabled).
      unchunked_max_num_tokens: max_num_tokens when chunked prefill is off (None: on). A prompt
        is then computed in one step, so a longer one could never be scheduled (and would hold
        back every request behind it): it is refused here, as TensorRT-LLM refuses it.
      batched_logits_processor: whether the LLM has one (requests may ask for it only then).
      max_logprobs: the most log-probabilities per token a request may ask for (vLLM's; None: the
        SamplingParams bound).
      max_beam_width: the widest beam search a request may ask for (LLM(max_beam_width)).
    """

    def __init__(self, config: ModelConfig, tokenizer, max_seq_len: int, max_input_len: int | None,
                 max_batch_size: int, lora_cache=None, prompt_cache=None,
                 unchunked_max_num_tokens: int | None = None, batched_logits_processor: bool = False,
                 max_logprobs: int | None = None, guided=None, max_beam_width: int = 1):  # fmt: skip
        self.config, self.tokenizer = config, tokenizer
        self.max_seq_len, self.max_input_len, self.max_batch_size = max_seq_len, max_input_len, max_batch_size
        self.lora_cache, self.prompt_cache = lora_cache, prompt_cache
        self.unchunked_max_num_tokens = unchunked_max_num_tokens
        self.batched_logits_processor = batched_logits_processor
        self.max_logprobs = max_logprobs
        self.guided = guided  # the LLM's GuidedDecoder (jaxllm/guided.py), or None
        self.max_beam_width = max_beam_width
        self._request_ids = itertools.count()

    def preprocess(self, prompt, params: SamplingParams, where: str) -> PreprocessedInputs:
        """One prompt tokenized and validated (a PreprocessedInputs is checked against max_batch_size only)."""
        if isinstance(prompt, PreprocessedInputs):
            params = prompt.sampling_params
        # A request's parallel samples are sequences of the running batch (TensorRT-LLM's bound too).
        max_batch_size = self.max_batch_size
        for name in ("n", "best_of"):
            if getattr(params, name) > max_batch_size:
                raise ValueError(f"{where}: {name}={getattr(params, name)} exceeds max_batch_size={max_batch_size}; "
                                 f"allowed: n <= best_of <= {max_batch_size} (or a larger LLM(max_batch_size=...))")
        if params.apply_batched_logits_processor and not self.batched_logits_processor:
            raise ValueError(f"{where}: apply_batched_logits_processor=True needs an LLM made with "
                             "LLM(..., batched_logits_processor=<callable>)")  # fmt: skip
        if params.use_beam_search and params.best_of > self.max_beam_width:
            raise ValueError(f"{where}: use_beam_search with best_of={params.best_of} (the beam width) exceeds "
                             f"max_beam_width={self.max_beam_width}; allowed: best_of <= max_beam_width (or a "
                             "larger LLM(max_beam_width=...))")  # fmt: skip
        if params.guided_decoding is not None and self.guided is None:
            raise ValueError(f"{where}: guided_decoding needs an LLM made with guided_decoding_backend='llguidance' "
                             "(or 'xgrammar')")  # fmt: skip
        if isinstance(prompt, PreprocessedInputs):
            return prompt
        vocab = self.config.vocab_size
        check_params_against_model(params, vocab, self.tokenizer, where)
        text, ids = tokenize_prompt(prompt, params, self.tokenizer, vocab, where)
        check_lengths(ids, self.max_seq_len, self.max_input_len, where)
        self._check_one_step(len(ids), where)
        self._check_logprobs(params, where)
        return PreprocessedInputs(text, tuple(ids), params)

    def _check_logprobs(self, params: SamplingParams, where: str) -> None:
        limit = self.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if limit is not None and value is not None and value is not True and value > limit:
                raise ValueError(f"{where}: {name}={value} exceeds the LLM's max_logprobs={limit}; allowed: at most "
                                 f"{limit} (LLM(max_logprobs=...) raises the bound)")  # fmt: skip

    def _check_one_step(self, num_prompt_tokens: int, where: str, virtual: str = "") -> None:
        """Without chunked prefill a prompt must fit one step's max_num_tokens."""
        limit = self.unchunked_max_num_tokens
        if limit is not None and num_prompt_tokens > limit:
            raise ValueError(f"{where}: the prompt has {num_prompt_tokens} tokens{virtual}, which should not exceed "
                             f"max_num_tokens={limit}: with enable_chunked_prefill=False a prompt is computed in "
                             f"one step; allowed: at most {limit} prompt tokens, or LLM(enable_chunked_prefill="
                             "True), which computes long prompts in chunks")  # fmt: skip

    def load_adapters(self, pre: PreprocessedInputs, extras: dict, where: str) -> None:
        """Resolve a prompt's lora_request / prompt_adapter_request to loaded adapters (into `extras`),
        reading them from disk unless cached; raises ValueError for anything the engine cannot serve."""
        lora_request = extras.get("lora_request")
        if lora_request is not None:
            if self.lora_cache is None:
                raise ValueError(f"{where}: lora_request={lora_request.lora_name!r} needs an LLM with LoRA enabled: "
                                 "LLM(..., enable_lora=True) or LLM(..., lora_config=LoraConfig(...))")  # fmt: skip
            extras["lora_adapter"] = self.lora_cache.get(lora_request.lora_int_id, lora_request.lora_path,
                                                         lora_request.lora_name)  # fmt: skip
        prompt_request = extras.get("prompt_adapter_request")
        if prompt_request is not None:
            if self.prompt_cache is None:
                raise ValueError(f"{where}: prompt_adapter_request={prompt_request.prompt_adapter_name!r} needs an LLM "
                                 "with prompt adapters enabled: LLM(..., enable_prompt_adapter=True, "
                                 "max_prompt_adapter_token=N)")  # fmt: skip
            adapter = self.prompt_cache.get(prompt_request.prompt_adapter_id, prompt_request.prompt_adapter_local_path,
                                            prompt_request.prompt_adapter_name)  # fmt: skip
            check_lengths(pre.prompt_token_ids, self.max_seq_len, self.max_input_len, where,
                          num_virtual_tokens=adapter.num_virtual_tokens)  # fmt: skip
            self._check_one_step(len(pre.prompt_token_ids) + adapter.num_virtual_tokens, where,
                                 f" (with {adapter.num_virtual_tokens} virtual tokens)")  # fmt: skip
            extras["prompt_adapter"] = adapter

    def make(self, pre: PreprocessedInputs, streaming: bool, extras: dict, abort_fn: Callable[[int], None],
             context_state: dict | None = None) -> Request:  # fmt: skip
        """The Request of one preprocessed prompt, its RequestOutput answered through `abort_fn`'s engine.

        Args:
          extras: its request-level arguments and loaded adapters (`request_extras`, `load_adapters`).
          context_state: a generation_only request's (disaggregated_params.context_state).
        """
        params = pre.sampling_params
        stop_ids = self._stop_token_ids(params)
        bad_word_ids, bias_row = self._bans(params, stop_ids)
        request_id = next(self._request_ids)
        prompt_adapter = extras.get("prompt_adapter")
        num_virtual = prompt_adapter.num_virtual_tokens if prompt_adapter is not None else 0
        warn_if_clipped(request_id, len(pre.prompt_token_ids) + num_virtual, params, self.max_seq_len)
        output = RequestOutput(request_id, pre.prompt, list(pre.prompt_token_ids), params.best_of, streaming,
                               abort_fn=abort_fn)  # fmt: skip
        request = Request(
            request_id=request_id,
            prompt=pre.prompt,
            prompt_token_ids=list(pre.prompt_token_ids),
            params=params,
            output=output,
            stop_token_ids=frozenset(stop_ids),
            bad_word_ids=bad_word_ids,
            bias_row=bias_row,
        )
        request.context_state = context_state
        if params.guided_decoding is not None:
            request.guide_grammar = self.guided.compile(params.guided_decoding)  # ValueError naming what is wrong
            request.guided_decoder = self.guided
        request.lora_request = extras.get("lora_request")
        request.prompt_adapter_request = extras.get("prompt_adapter_request")
        request.lora_adapter = extras.get("lora_adapter")
        request.prompt_adapter = extras.get("prompt_adapter")
        request.retention = extras.get("kv_cache_retention_config")
        request.cache_salt = extras.get("cache_salt")
        request.disaggregated_params = extras.get("disaggregated_params")
        scheduling = extras.get("scheduling_params")
        if scheduling is not None:
            request.priority = float(scheduling.priority)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = []
        return request

    def _stop_token_ids(self, params: SamplingParams) -> set[int]:
        """stop_token_ids, and the end token unless ignore_eos or end_id=-1 (end_id, else the model's and
        tokenizer's)."""
        tok = self.tokenizer
        stop_ids = set(params.stop_token_ids or [])
        if not params.ignore_eos and params.end_id != -1:
            if params.end_id is not None:
                stop_ids.add(params.end_id)
            else:
                stop_ids.update(self.config.eos_token_ids)
                if tok is not None and getattr(tok, "eos_token_id", None) is not None:
                    stop_ids.add(tok.eos_token_id)
        return stop_ids

    def _bans(self, params: SamplingParams, stop_ids: set[int]) -> tuple[tuple, BiasRow | None]:
        """(multi-token bad words, the bias row): single banned tokens, the tokens outside
        allowed_token_ids and embedding_bias become one row added to the logits; longer bad words are
        banned step by step (at most BAN_WIDTH at once, with the end tokens min_tokens holds back)."""
        bad_words = [(t,) for t in params.bad_token_ids or []]
        for word in params.bad_strings:
            bad_words += self._bad_word_spellings(word)
        banned_singles = sorted({w[0] for w in bad_words if len(w) == 1})
        multi_token_words = tuple(dict.fromkeys(w for w in bad_words if len(w) > 1))
        dynamic_bans = len(multi_token_words) + (len(stop_ids) if params.min_tokens else 0)
        if dynamic_bans > BAN_WIDTH:
            raise ValueError(f"a request may ban at most {BAN_WIDTH} tokens at one step: got {len(multi_token_words)} "
                             f"multi-token bad words and {len(stop_ids) if params.min_tokens else 0} end tokens held "
                             f"back by min_tokens={params.min_tokens}")  # fmt: skip
        if params.embedding_bias is None and not banned_singles and not params.allowed_token_ids:
            return multi_token_words, None
        vocab_size = self.config.vocab_size
        row = np.zeros(vocab_size, np.float32)
        if params.embedding_bias is not None:
            row += np.asarray(params.embedding_bias, np.float32).reshape(-1)
        row[banned_singles] = -np.inf
        if params.allowed_token_ids:
            row[~np.isin(np.arange(vocab_size), params.allowed_token_ids)] = -np.inf
        if np.isneginf(row).all():  # (bias and token id bans alone are checked in preprocessing)
            raise ValueError(f"the bad strings {params.bad_strings!r} with embedding_bias, bad_token_ids and "
                             f"allowed_token_ids ban all {vocab_size} tokens; allowed: bans that leave a token to "
                             "sample")  # fmt: skip
        return multi_token_words, BiasRow.of(row)

    def _bad_word_spellings(self, word: str) -> list[tuple[int, ...]]:
        """The token sequences that spell a bad word: as written and after a space (" word") where the
        tokenizer spells that otherwise, as byte-level BPE tokenizers do (their words carry their
        leading space). vLLM bans both spellings too, but skips a spaced one of another length, which
        would leave " Berlin" (one token of SmolLM2's) allowed when "Berlin" is two."""
        ids = tuple(self.tokenizer.encode(word, add_special_tokens=False))
        if not ids:
            return []
        spaced = tuple(self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        return [ids, spaced] if spaced and spaced != ids else [ids]
