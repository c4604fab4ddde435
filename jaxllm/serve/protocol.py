"""OpenAI's request and error schemas, and the way a request becomes a `SamplingParams`.

Requests are pydantic models that ignore fields they do not know (clients send many), so that a
request is refused only for a field it sets to something jaxllm cannot honour. The range checks are
`SamplingParams`' own: its ValueError/TypeError message becomes the 400 the client reads. Defaults
are OpenAI's where they differ from jaxllm's: temperature 1 (sampling), 16 tokens for a completion,
the rest of the context for a chat message. vLLM's extensions (top_k, min_p, repetition_penalty,
min_tokens, ignore_eos, stop_token_ids, skip_special_tokens; use_beam_search with length_penalty
and early_stopping, its beam width best_of or else n, greedy unless a temperature is given) are
accepted under their names.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from jaxllm.sampling_params import GuidedDecodingParams, SamplingParams

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class ServeError(Exception):
    """An error the client is told about in OpenAI's schema: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """Fields /v1/completions and /v1/chat/completions share."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    n: int = 1
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None  # accepted and unused, as OpenAI's abuse-tracking field is here
    # vLLM's extensions
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_tokens: Optional[int] = None
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False  # each choice also carries its token ids (and the prompt's, unstreamed)
    # Guided decoding (the server's LLM needs a guided_decoding_backend): OpenAI's response_format
    # ({"type": "json_schema", "json_schema": {"schema": ...}} | {"type": "json_object"} | {"type":
    # "text"}), and vLLM's guided_json / guided_regex / guided_choice / guided_grammar.
    response_format: Optional[dict[str, Any]] = None
    guided_json: Optional[Union[str, dict[str, Any]]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    # vLLM's beam search extension (the server's LLM needs max_beam_width): best_of (else n) beams,
    # the n best returned.
    use_beam_search: bool = False
    length_penalty: Optional[float] = None
    early_stopping: Optional[Union[bool, str, int]] = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerationRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = None
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    def prompts(self) -> list[Union[str, dict]]:
        """Each prompt as `generate_async` takes it: a str, or {"prompt_token_ids": [...]}."""
        if self.echo:
            raise ServeError(400, "echo is not supported", param="echo")
        if self.suffix is not None:
            raise ServeError(400, "suffix is not supported", param="suffix")
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ServeError(400, "prompt must not be empty", param="prompt")
        if all(isinstance(t, int) for t in p):
            return [{"prompt_token_ids": list(p)}]
        return [x if isinstance(x, str) else {"prompt_token_ids": list(x)} for x in p]


class ChatCompletionRequest(_GenerationRequest):
    messages: list[dict[str, Any]]
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    tools: Optional[list[dict[str, Any]]] = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[dict[str, Any]]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    tokens: list[int] = Field(default_factory=list)


def _embedding_bias(logit_bias: dict[str, float], vocab_size: int) -> np.ndarray:
    """OpenAI's logit_bias ({"token id": bias in [-100, 100]}) as SamplingParams.embedding_bias."""
    bias = np.zeros(vocab_size, np.float32)
    for key, value in logit_bias.items():
        try:
            token = int(key)
        except ValueError:
            raise ServeError(400, f"logit_bias keys are token ids, got {key!r}", param="logit_bias") from None
        if not 0 <= token < vocab_size:
            raise ServeError(400, f"logit_bias token {token} is out of range; allowed: 0 to {vocab_size - 1}",
                             param="logit_bias")  # fmt: skip
        if not -100 <= value <= 100:
            raise ServeError(400, f"logit_bias[{key}]={value} is out of range; allowed: -100 to 100", param="logit_bias")
        bias[token] = value
    return bias


def sampling_params(request: _GenerationRequest, max_tokens: Optional[int], num_logprobs: Optional[int],
                    vocab_size: int) -> SamplingParams:  # fmt: skip
    """The request's SamplingParams; `max_tokens` is the one to use (the request's or the default),
    `num_logprobs` the top log-probabilities per token (None: none). Every returned request carries
    its timing metrics (return_perf_metrics) for /metrics."""
    temperature = 1.0 if request.temperature is None else request.temperature
    beam = request.use_beam_search
    if beam and request.temperature is None:
        temperature = 0.0  # beam search is greedy (a given temperature > 0 is refused)
    best_of = getattr(request, "best_of", None)
    if beam and best_of is None:
        best_of = request.n
    try:
        return SamplingParams(
            max_tokens=max_tokens, n=request.n, temperature=temperature, top_p=request.top_p, top_k=request.top_k,
            min_p=request.min_p, seed=request.seed, stop=request.stop, stop_token_ids=request.stop_token_ids,
            presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
            repetition_penalty=request.repetition_penalty, min_tokens=request.min_tokens,
            ignore_eos=request.ignore_eos, skip_special_tokens=request.skip_special_tokens,
            include_stop_str_in_output=request.include_stop_str_in_output, logprobs=num_logprobs,
            embedding_bias=None if not request.logit_bias else _embedding_bias(request.logit_bias, vocab_size),
            best_of=best_of, return_perf_metrics=True, guided_decoding=guided_decoding(request),
            use_beam_search=beam, length_penalty=request.length_penalty, early_stopping=request.early_stopping,
        )  # fmt: skip
    except (ValueError, TypeError, NotImplementedError) as e:
        raise ServeError(400, str(e)) from None


def guided_decoding(request: _GenerationRequest) -> Optional[GuidedDecodingParams]:
    """The request's output constraint: response_format, or one of vLLM's guided_* fields."""
    given = {name: getattr(request, name) for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
             if getattr(request, name) is not None}  # fmt: skip
    fmt = request.response_format
    if fmt is not None and fmt.get("type", "text") != "text":
        given["response_format"] = fmt
    if len(given) > 1:
        raise ServeError(400, f"give one output constraint; got {', '.join(given)}", param=next(iter(given)))
    if not given:
        return None
    name, value = next(iter(given.items()))
    try:
        if name == "response_format":
            if value["type"] == "json_object":
                return GuidedDecodingParams(json_object=True)
            if value["type"] != "json_schema":
                raise ServeError(400, f"response_format.type={value['type']!r} is not supported; allowed: 'text', "
                                      "'json_object', 'json_schema'", param="response_format")  # fmt: skip
            spec = value.get("json_schema") or {}
            if "schema" not in spec:
                raise ServeError(400, "response_format.json_schema needs a 'schema'", param="response_format")
            return GuidedDecodingParams(json=spec["schema"])
        field = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}[name]  # fmt: skip
        return GuidedDecodingParams(**{field: value})
    except ValueError as e:
        raise ServeError(400, str(e), param=name) from None


def finish_reason(reason: Optional[str]) -> Optional[str]:
    """jaxllm's finish reason as OpenAI's ('cancelled' is reported as 'abort', vLLM's word)."""
    return {"cancelled": "abort"}.get(reason, reason)

