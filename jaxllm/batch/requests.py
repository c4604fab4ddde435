"""A batch job's requests: the input lines read, named and checked before any engine starts.

Two input forms, one request a line (blank lines are skipped):
  OpenAI's Batch API:  {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
                       (url "/v1/completions" or "/v1/chat/completions"; the body as the server takes it)
  plain:               {"prompt": ...} or {"messages": [...]}, with any of the body's other fields
                       (max_tokens, temperature, ...) beside it; "custom_id" is optional.
A request without a custom_id is named after its line, `line-N` (1-based, blank lines counted), so
a second run of the same file names it the same. Two requests with one custom_id stop the job
before it starts. A line that cannot be served (not JSON, a bad field, a prompt the model cannot
take) becomes a `BatchItem` with its `error` (the server's ServeError), which the job writes as
that line's result.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable

from jaxllm.serve import endpoints
from jaxllm.serve.protocol import ChatCompletionRequest, ServeError

PLAIN_KEYS = ("prompt", "messages")
BATCH_KEYS = ("custom_id", "method", "url", "body")


@dataclasses.dataclass
class BatchItem:
    """One request of a job.

    index: its position among the job's requests; line: its line in the file (1-based).
    custom_id: its name in the output. url: the endpoint (ROUTES), None when unreadable.
    body: the parsed request (protocol's model); prompts / params: what the server would submit.
    prompt_lens: each prompt's token count. error: set when the server would refuse it.
    """

    index: int
    line: int
    custom_id: str
    url: str | None = None
    body: Any = None
    prompts: list = dataclasses.field(default_factory=list)
    params: Any = None
    prompt_lens: list[int] = dataclasses.field(default_factory=list)
    error: ServeError | None = None

    @property
    def chat(self) -> bool:
        return isinstance(self.body, ChatCompletionRequest)

    @property
    def num_sequences(self) -> int:
        return len(self.prompts) * (self.params.best_of if self.params is not None else 1)

    @property
    def seq_len(self) -> int:
        """The longest sequence it can make: prompt and max_tokens (0 for a refused request)."""
        if self.error is not None or not self.prompt_lens:
            return 0
        return max(self.prompt_lens) + self.params.max_tokens


def _raw_request(data: Any, line: int) -> tuple[str | None, str | None, Any, ServeError | None]:
    """(custom_id, url, body dict, error) of one decoded line in either form."""
    if not isinstance(data, dict):
        return None, None, None, ServeError(400, f"a request is a JSON object, got {type(data).__name__}")
    custom_id = data.get("custom_id")
    if custom_id is not None and (not isinstance(custom_id, str) or not custom_id):
        return None, None, None, ServeError(400, f"custom_id must be a non-empty string, got {custom_id!r}",
                                            param="custom_id")  # fmt: skip
    if any(k in data for k in ("method", "url", "body")):  # the Batch API form
        if data.get("method", "POST") != "POST":
            return custom_id, None, None, ServeError(400, f"method {data.get('method')!r} is not supported; allowed: "
                                                          "POST", param="method")  # fmt: skip
        url = data.get("url")
        if url not in endpoints.ROUTES:
            return custom_id, None, None, ServeError(400, f"url {url!r} is not supported; allowed: "
                                                          f"{', '.join(endpoints.ROUTES)}", param="url")  # fmt: skip
        body = data.get("body")
        if not isinstance(body, dict):
            return custom_id, url, None, ServeError(400, f"body must be a JSON object, got {type(body).__name__}",
                                                    param="body")  # fmt: skip
        return custom_id, url, body, None
    present = [k for k in PLAIN_KEYS if k in data]
    if len(present) != 1:
        return custom_id, None, None, ServeError(
            400, "a request needs the Batch API's custom_id, method, url and body, or exactly one of 'prompt' and "
                 f"'messages' (got keys {sorted(data)})")  # fmt: skip
    body = {k: v for k, v in data.items() if k != "custom_id"}
    url = "/v1/chat/completions" if present[0] == "messages" else "/v1/completions"
    return custom_id, url, body, None


def read_lines(source: str | Path | Iterable) -> list[tuple[int, Any, ServeError | None]]:
    """(line number, decoded value, decoding error) of every non-blank line of a JSONL file, or of
    every element of a list (dicts, or JSON text; a str that is not JSON is a plain prompt)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"input file {str(path)!r} does not exist")
        with path.open(encoding="utf-8") as f:
            texts = list(enumerate(f, 1))
    else:
        texts = []
        for number, value in enumerate(source, 1):
            if isinstance(value, str) and not value.lstrip().startswith("{"):
                value = {"prompt": value}
            texts.append((number, value))
    out = []
    for number, value in texts:
        if isinstance(value, str):
            if not value.strip():
                continue
            try:
                value = json.loads(value)
            except ValueError as e:
                out.append((number, None, ServeError(400, f"line {number} is not JSON: {e}")))
                continue
        out.append((number, value, None))
    return out


def load_items(source, model_name: str) -> list[BatchItem]:
    """The job's requests, named, with their bodies parsed (not yet prepared: see `prepare`).

    Raises ValueError when two requests share a custom_id."""
    items: list[BatchItem] = []
    seen: dict[str, int] = {}
    for number, value, error in read_lines(source):
        custom_id = url = body = None
        if error is None:
            custom_id, url, body, error = _raw_request(value, number)
        item = BatchItem(index=len(items), line=number, custom_id=custom_id or f"line-{number}", url=url)
        if error is None:
            try:
                item.body = endpoints.parse(body, endpoints.ROUTES[url], model_name)
                if item.body.stream:
                    raise ServeError(400, "stream=true is not supported in a batch job", param="stream")
            except ServeError as e:
                error = e
        item.error = error
        if item.custom_id in seen:
            raise ValueError(f"custom_id {item.custom_id!r} appears on lines {seen[item.custom_id]} and {number}; "
                             "each request's custom_id must be unique")  # fmt: skip
        seen[item.custom_id] = number
        items.append(item)
    if not items:
        raise ValueError("the batch has no requests")
    return items


def prepare(items: list[BatchItem], tokenizer, max_seq_len: int, vocab_size: int,
            max_input_len: int | None = None) -> None:
    """Render and measure every readable request as the server would (endpoints.prepare), against a
    model of `max_seq_len` tokens; a request it refuses gets its error."""
    from jaxllm.inputs import check_lengths

    for item in items:
        if item.error is not None:
            continue
        try:
            item.prompts, item.params = endpoints.prepare(tokenizer, max_seq_len, vocab_size, item.body)
            item.prompt_lens = [_prompt_len(tokenizer, p, item.params) for p in item.prompts]
            for ids_len in item.prompt_lens:
                check_lengths(range(ids_len), max_seq_len, max_input_len, "prompt")
                endpoints.check_context(ids_len, item.params.max_tokens, max_seq_len)
        except ServeError as e:
            item.error = e
        except (ValueError, TypeError, NotImplementedError) as e:  # as endpoints.submit reports them
            item.error = ServeError(400, str(e))


def _prompt_len(tokenizer, prompt, params) -> int:
    if isinstance(prompt, dict):
        return len(prompt["prompt_token_ids"])
    if tokenizer is None:
        raise ValueError("prompt: a text prompt needs a tokenizer (the LLM was made with skip_tokenizer_init=True)")
    return len(tokenizer.encode(prompt, add_special_tokens=params.add_special_tokens))
