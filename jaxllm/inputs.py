"""Prompt forms accepted by generate / generate_async / preprocess, and their validation.

A prompt is a string, a list of token ids, or a dict with "prompt" (text) or "prompt_token_ids".
A batch is a list (or tuple) of prompts. Everything is checked here, before any device work:
empty prompts, token ids outside the vocabulary, prompts and max_tokens beyond max_seq_len, a
dict's text and token ids that disagree, an embedding_bias that is not finite or bans every token.

A dict with both "prompt" and "prompt_token_ids" is generated from its token ids, as TensorRT-LLM
and vLLM do (the text only labels the output); neither framework checks that the two agree, and a
mismatch silently answers another prompt than the one shown, so with a tokenizer jaxllm refuses ids
that are not the text's tokens (with or without special tokens). Without one it cannot tell, and
the ids are used as given.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from jaxllm.sampling_params import SamplingParams


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


def check_lengths(ids: Sequence[int], params: SamplingParams, max_seq_len: int, max_input_len: int | None,
                  where: str = "prompt", num_virtual_tokens: int = 0) -> None:  # fmt: skip
    """The prompt (and a prompt adapter's virtual tokens, which take KV positions too) plus max_tokens
    must fit max_seq_len."""
    if max_input_len is not None and len(ids) > max_input_len:
        raise ValueError(f"{where}: {len(ids)} tokens exceed max_input_len={max_input_len}")
    used = len(ids) + num_virtual_tokens
    if used + params.max_tokens > max_seq_len:
        virtual = f" + {num_virtual_tokens} virtual tokens" if num_virtual_tokens else ""
        raise ValueError(
            f"{where}: prompt length {len(ids)}{virtual} + max_tokens {params.max_tokens} exceeds "
            f"max_seq_len={max_seq_len}; allowed: at most {max(0, max_seq_len - used)} new tokens for this prompt"
        )


def check_params_against_model(params: SamplingParams, vocab_size: int, tokenizer, where: str) -> None:
    for name in ("stop_token_ids", "bad_token_ids"):
        ids = getattr(params, name) or []
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise ValueError(f"{where}: {name} {bad} are outside the vocabulary [0, {vocab_size})")
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
    if banned.all():
        raise ValueError(f"{where}: embedding_bias (-inf entries) and bad_token_ids ban all {vocab_size} tokens of "
                         "the vocabulary; allowed: bans that leave at least one token to sample")  # fmt: skip
    if (params.stop or params.bad) and tokenizer is None:
        raise ValueError(f"{where}: stop / bad strings need a tokenizer (skip_tokenizer_init=True was given)")
    if params.stop and not params.detokenize:
        raise ValueError(f"{where}: stop strings are matched on text; they need detokenize=True")
