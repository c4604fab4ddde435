"""The OpenAI generation endpoints without HTTP: a request body becomes the prompts and the
SamplingParams to generate, and the finished outputs become the response body.

The server's routes (app.py) and `jaxllm batch` (jaxllm/batch/) both go through here, so a batch
line's response body is the one the server answers, and a refused line carries the server's 400
message. `prepare` takes the model's parts (tokenizer, max_seq_len, vocabulary size) rather than an
LLM, so that a batch job can validate and measure its requests before its engine exists.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from pydantic import BaseModel, ValidationError

from jaxllm import chat as chat_lib
from jaxllm.sampling_params import SamplingParams
from jaxllm.serve import protocol
from jaxllm.serve.protocol import ChatCompletionRequest, CompletionRequest, ServeError

# The generation routes and their request models.
ROUTES: dict[str, type[BaseModel]] = {"/v1/completions": CompletionRequest,
                                      "/v1/chat/completions": ChatCompletionRequest}


def parse(data: Any, model: type[BaseModel], model_name: str):
    """`data` (JSON text or bytes, or the decoded object) as the request `model`; ServeError 400 for
    bad JSON or fields, 404 when it names a model other than `model_name`."""
    if isinstance(data, (bytes, bytearray, str)):
        try:
            data = json.loads(data)
        except ValueError as e:
            raise ServeError(400, f"the body is not JSON: {e}") from None
    try:
        parsed = model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(x) for x in first["loc"]) or None
        raise ServeError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None
    name = getattr(parsed, "model", None)
    if name is not None and name != model_name:
        raise ServeError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                         param="model", code="model_not_found")  # fmt: skip
    return parsed


def chat_params(body: ChatCompletionRequest, prompt_len: int, max_seq_len: int, vocab_size: int) -> SamplingParams:
    """A chat request's SamplingParams; without max_(completion_)tokens it may take the rest of the
    context (`max_seq_len` less its `prompt_len` prompt tokens)."""
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None:
        max_tokens = max(max_seq_len - prompt_len, 1)
    num_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    if body.top_logprobs is not None and not body.logprobs:
        raise ServeError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    return protocol.sampling_params(body, max_tokens, num_logprobs, vocab_size)


def prepare(tokenizer, max_seq_len: int, vocab_size: int, body) -> tuple[list, SamplingParams]:
    """(prompts as `generate_async` takes them, SamplingParams) of a parsed completion or chat
    request, checked in the server's order; ServeError for what the server refuses."""
    if isinstance(body, ChatCompletionRequest):
        try:
            prompt = chat_lib.render(tokenizer, body.messages, tools=body.tools,
                                     add_generation_prompt=body.add_generation_prompt,
                                     continue_final_message=body.continue_final_message,
                                     chat_template_kwargs=body.chat_template_kwargs)  # fmt: skip
        except (ValueError, TypeError) as e:
            raise ServeError(400, str(e), param="messages") from None
        return [prompt], chat_params(body, len(prompt["prompt_token_ids"]), max_seq_len, vocab_size)
    max_tokens = protocol.COMPLETION_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    params = protocol.sampling_params(body, max_tokens, body.logprobs, vocab_size)
    return body.prompts(), params


def check_context(prompt_len: int, max_tokens: int, max_seq_len: int) -> None:
    """A request whose prompt and max_tokens together exceed the context is a 400, as vLLM's server
    answers it (the Python API clips max_tokens to what fits instead, as TensorRT-LLM's LLM does)."""
    if prompt_len + max_tokens > max_seq_len:
        raise ServeError(400, f"this model's maximum context length is {max_seq_len} tokens; the request asks for "
                              f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} in the completion); "
                              "allowed: a shorter prompt or a smaller max_tokens", param="max_tokens")  # fmt: skip


def submit(llm, prompt, params, streaming: bool) -> Any:
    """generate_async, the context checked first (`check_context`); the engine's ValueError /
    TypeError as a 400."""
    try:
        pre = llm.preprocess(prompt, params)
        check_context(len(pre.prompt_token_ids), params.max_tokens, llm.max_seq_len)
        return llm.generate_async(pre, streaming=streaming)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise ServeError(400, str(e)) from None


def request_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(outputs: list) -> dict:
    prompt = sum(len(o.prompt_token_ids or ()) for o in outputs)
    completion = sum(len(s.token_ids) for o in outputs for s in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def response_body(tokenizer, model_name: str, body, outputs: list, rid: str | None = None,
                  created: int | None = None) -> dict:  # fmt: skip
    """The unstreamed response to `body` from its finished RequestOutputs (one per prompt)."""
    chat = isinstance(body, ChatCompletionRequest)
    n = body.n
    num_logprobs = body.top_logprobs or 0 if chat else body.logprobs
    want_logprobs = body.logprobs if chat else body.logprobs is not None
    choices = []
    for p, out in enumerate(outputs):
        for seq in out.outputs:
            choice = {"index": p * n + seq.index, "finish_reason": protocol.finish_reason(seq.finish_reason)}
            logprobs = None
            if want_logprobs and seq.logprobs is not None:
                logprobs = (chat_logprobs(tokenizer, seq.token_ids, seq.logprobs, num_logprobs) if chat else
                            completion_logprobs(tokenizer, seq.token_ids, seq.logprobs, num_logprobs, 0))
            if chat:
                choice["message"] = {"role": "assistant", "content": seq.text}
            else:
                choice["text"] = seq.text
            choice["logprobs"] = logprobs
            if body.return_token_ids:
                choice["token_ids"] = list(seq.token_ids)
                choice["prompt_token_ids"] = list(out.prompt_token_ids or ())
            choices.append(choice)
    return {"id": rid or request_id(chat), "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()) if created is None else created, "model": model_name, "choices": choices,
            "usage": usage(outputs)}  # fmt: skip


# ---- log-probabilities in OpenAI's two forms ------------------------------------------------
def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)


def _ranked(entry: dict, k: int) -> list[tuple[int, float]]:
    """The k most likely (token, log-probability) pairs of one position's dict[token_id, Logprob]."""
    items = sorted(entry.items(), key=lambda kv: (kv[1].rank or 1 << 30, -kv[1].logprob))
    return [(t, lp.logprob) for t, lp in items[:k]]


def completion_logprobs(tokenizer, token_ids: list[int], logprobs: list, k: int, offset: int) -> dict:
    """/v1/completions' logprobs object; `offset` is the text length before these tokens."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, entry in zip(token_ids, logprobs):
        text = _token_text(tokenizer, token)
        out["tokens"].append(text)
        out["token_logprobs"].append(entry[token].logprob if token in entry else None)
        out["top_logprobs"].append({_token_text(tokenizer, t): lp for t, lp in _ranked(entry, k)})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(tokenizer, token_ids: list[int], logprobs: list, k: int) -> dict:
    """/v1/chat/completions' logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    content = []
    for token, entry in zip(token_ids, logprobs):
        text = _token_text(tokenizer, token)
        top = [{"token": (s := _token_text(tokenizer, t)), "logprob": lp, "bytes": list(s.encode())}
               for t, lp in _ranked(entry, k)]  # fmt: skip
        logprob = entry[token].logprob if token in entry else None
        content.append({"token": text, "logprob": logprob, "bytes": list(text.encode()), "top_logprobs": top})
    return {"content": content}

