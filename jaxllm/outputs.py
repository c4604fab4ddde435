"""Request results: RequestOutput (also the future `generate_async` returns), CompletionOutput, Logprob.

The engine thread never touches what a caller sees. It posts immutable `Delta`s (new tokens, text,
log-probabilities, a finish reason) into the request's queue; the caller's thread applies them
when it reads (`result`, iteration, `aresult`). Each streamed item therefore carries exactly the
deltas of one engine step, and `text_diff`s add up to the final text whatever the caller's pace.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import importlib.util
import threading
from typing import Any, Callable, Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class Logprob:
    """A token's log-probability and its rank (1 = most likely) in the model's distribution."""

    logprob: float
    rank: Optional[int] = None


TokenLogprobs = list  # per token: dict[token_id, Logprob]


class _ReadAsDict:
    """Read access by key as well as by attribute (`m["timing_metrics"]`, `m.get(...)`): perf
    metrics were plain dicts before they were dataclasses, and code reading them so still works."""

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)]

    def __getitem__(self, key: str):
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def get(self, key: str, default: Any = None):
        return getattr(self, key) if key in self.keys() else default

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TimingMetrics(_ReadAsDict):
    """When a request reached each point (time.monotonic() seconds; TensorRT-LLM's TimingMetrics)."""

    arrival_time: Optional[float] = None
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class KvCacheMetrics(_ReadAsDict):
    """A request's KV pages (TensorRT-LLM's KvCacheMetrics): pages it was given (new ones plus
    reused ones), those taken from the prefix cache or shared with a sibling sample, and its
    prompt's full pages the cache did not have; hit rate = reused / (reused + missed)."""

    num_total_allocated_blocks: int = 0
    num_new_allocated_blocks: int = 0
    num_reused_blocks: int = 0
    num_missed_blocks: int = 0
    kv_cache_hit_rate: float = 0.0


@dataclasses.dataclass(frozen=True)
class RequestPerfMetrics(_ReadAsDict):
    """A finished request's performance metrics (`SamplingParams.return_perf_metrics`;
    TensorRT-LLM's RequestPerfMetrics, without its speculative-decoding part).

    first_iter / last_iter: the engine iterations (get_stats' `iter`) that first and last
    scheduled it; iter: the iteration these metrics were taken at (its last).
    """

    timing_metrics: TimingMetrics = dataclasses.field(default_factory=TimingMetrics)
    kv_cache_metrics: KvCacheMetrics = dataclasses.field(default_factory=KvCacheMetrics)
    first_iter: Optional[int] = None
    last_iter: Optional[int] = None
    iter: Optional[int] = None


def as_logits(values: np.ndarray):
    """Logits as TensorRT-LLM returns them, a torch.Tensor (CPU, float32, sharing the numpy memory),
    where torch is installed; otherwise the numpy array. torch is not a dependency of jaxllm: it is
    imported here, on the caller's thread, only when installed and logits were asked for."""
    if importlib.util.find_spec("torch") is None:
        return values
    import torch

    return torch.from_numpy(np.ascontiguousarray(values))


@dataclasses.dataclass
class CompletionOutput:
    """One generated sequence of a request (TensorRT-LLM's CompletionOutput)."""

    index: int
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[TokenLogprobs] = None
    prompt_logprobs: Optional[TokenLogprobs] = None
    finish_reason: Optional[str] = None  # stop | length | cancelled
    # The stop_token_ids token or stop string that ended it; None for any other end (an end token:
    # end_id or EOS, max_tokens, ...).
    stop_reason: Optional[int | str] = None
    # [num_tokens, vocab] float32, when return_generation_logits: a torch.Tensor where torch is
    # installed (TensorRT-LLM's type), else a numpy array (`as_logits`).
    generation_logits: Any = None
    disaggregated_params: Any = None
    request_perf_metrics: Optional[RequestPerfMetrics] = None  # when return_perf_metrics
    # Streaming: what the last applied step added.
    _last_text_len: int = dataclasses.field(default=0, repr=False)
    _last_token_len: int = dataclasses.field(default=0, repr=False)
    _last_logprobs_len: int = dataclasses.field(default=0, repr=False)

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def text_diff(self) -> str:
        return self.text[self._last_text_len :]

    @property
    def token_ids_diff(self) -> list[int]:
        return self.token_ids[self._last_token_len :]

    @property
    def logprobs_diff(self) -> TokenLogprobs:
        return [] if self.logprobs is None else self.logprobs[self._last_logprobs_len :]


@dataclasses.dataclass(frozen=True)
class Delta:
    """What one engine step adds to one CompletionOutput."""

    index: int
    token_ids: tuple[int, ...] = ()
    # Tokens published before that the end leaves out (a stop string's first tokens), taken off the
    # end of token_ids, logprobs and generation_logits before token_ids are added.
    num_retracted: int = 0
    text: str | None = None  # the full text so far (replacing), or None when detokenize=False
    logprobs: tuple = ()  # per new token: dict[token_id, Logprob]
    cumulative_logprob: Optional[float] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[int | str] = None
    generation_logits: Any = None  # rows for the new tokens
    prompt_logprobs: Any = None
    perf_metrics: Optional[RequestPerfMetrics] = None
    disaggregated_params: Any = None  # context_only: where the context's KV pages wait


@dataclasses.dataclass(frozen=True)
class Update:
    """One engine step's news for a request: deltas, and whether the request is finished."""

    deltas: tuple[Delta, ...] = ()
    finished: bool = False
    error: BaseException | None = None
    context_logits: Any = None
    drop_indices: tuple[int, ...] | None = None  # best_of > n: keep only these outputs at the end


class RequestError(RuntimeError):
    """A request failed inside the engine (the engine itself keeps serving)."""


class RequestOutput:
    """The output of one request; as returned by `generate_async`, also its future.

    Attributes (TensorRT-LLM's): request_id, prompt, prompt_token_ids, outputs, context_logits
    ([prompt tokens, vocab] float32, when return_context_logits: a torch.Tensor where torch is
    installed, else a numpy array), finished. Methods: result(timeout), aresult(timeout), `await`,
    iteration (streaming), abort(), aborted().
    """

    def __init__(self, request_id: int, prompt: Optional[str], prompt_token_ids: list[int], num_outputs: int,
                 streaming: bool = False, abort_fn: Callable[[int], None] | None = None):  # fmt: skip
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.outputs = [CompletionOutput(index=i) for i in range(num_outputs)]
        self.context_logits = None
        self.finished = False
        self.streaming = streaming
        self.disaggregated_params = None
        self._abort_fn = abort_fn
        self._aborted = False
        self._error: BaseException | None = None
        self._pending: collections.deque[Update] = collections.deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._done_posting = False

    # ---- engine side (any thread) ----------------------------------------------------------
    def _post(self, update: Update) -> None:
        with self._cond:
            if self._done_posting:
                return
            self._pending.append(update)
            if update.finished:
                self._done_posting = True
            waiters, self._waiters = self._waiters, []
            self._cond.notify_all()
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_set_done, fut)

    # ---- caller side -----------------------------------------------------------------------
    def _apply(self, update: Update) -> None:
        for out in self.outputs:
            out._last_text_len, out._last_token_len = len(out.text), len(out.token_ids)
            out._last_logprobs_len = len(out.logprobs or [])
        for d in update.deltas:
            out = self.outputs[d.index]
            if d.num_retracted:
                keep = len(out.token_ids) - d.num_retracted
                del out.token_ids[keep:]
                if out.logprobs is not None:
                    out.logprobs = out.logprobs[: len(out.logprobs) - d.num_retracted]
                if out.generation_logits is not None:
                    out.generation_logits = out.generation_logits[: len(out.generation_logits) - d.num_retracted]
            out.token_ids.extend(d.token_ids)
            if d.text is not None:
                out.text = d.text
            if d.logprobs:
                out.logprobs = (out.logprobs or []) + list(d.logprobs)
            if d.cumulative_logprob is not None:
                out.cumulative_logprob = d.cumulative_logprob
            if d.finish_reason is not None:
                out.finish_reason, out.stop_reason = d.finish_reason, d.stop_reason
            if d.generation_logits is not None:
                rows = np.asarray(d.generation_logits)
                old = out.generation_logits
                out.generation_logits = as_logits(rows if old is None else np.concatenate([np.asarray(old), rows]))
            if d.prompt_logprobs is not None:
                out.prompt_logprobs = d.prompt_logprobs
            if d.perf_metrics is not None:
                out.request_perf_metrics = d.perf_metrics
            if d.disaggregated_params is not None:
                out.disaggregated_params = self.disaggregated_params = d.disaggregated_params
        if update.context_logits is not None:
            self.context_logits = as_logits(update.context_logits)
        if update.drop_indices is not None:
            self.outputs = [self.outputs[i] for i in update.drop_indices]
            for new_index, out in enumerate(self.outputs):
                out.index = new_index
        if update.error is not None:
            self._error = update.error
        if update.finished:
            self.finished = True

    def _next_update(self, timeout: float | None) -> Update | None:
        with self._cond:
            if not self._pending and not self._cond.wait_for(lambda: bool(self._pending), timeout):
                raise TimeoutError(f"request {self.request_id} did not produce output within {timeout} s")
            return self._pending.popleft()

    def _raise_if_failed(self) -> None:
        """Raise RequestError from the engine's error, naming it and where it happened (its notes)."""
        error = self._error
        if error is not None:
            where = "".join(f" ({note})" for note in getattr(error, "__notes__", ()))
            raise RequestError(f"request {self.request_id} failed: {type(error).__name__}: {error}{where}") from error

    def result(self, timeout: float | None = None) -> "RequestOutput":
        """Block until the request finishes; return self with the complete outputs."""
        while not self.finished:
            self._apply(self._next_update(timeout))
        self._raise_if_failed()
        return self

    async def _await_update(self, timeout: float | None) -> Update:
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._pending:
                    return self._pending.popleft()
                fut = loop.create_future()
                self._waiters.append((loop, fut))
            try:
                await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(f"request {self.request_id} did not produce output within {timeout} s") from None

    async def aresult(self, timeout: float | None = None) -> "RequestOutput":
        while not self.finished:
            self._apply(await self._await_update(timeout))
        self._raise_if_failed()
        return self

    def __await__(self):
        return self.aresult().__await__()

    def __iter__(self):
        return self

    def __next__(self) -> "RequestOutput":
        if self.finished:
            self._raise_if_failed()
            raise StopIteration
        self._apply(self._next_update(None))
        self._raise_if_failed()
        return self

    def __aiter__(self):
        return self

    async def __anext__(self) -> "RequestOutput":
        if self.finished:
            self._raise_if_failed()
            raise StopAsyncIteration
        self._apply(await self._await_update(None))
        self._raise_if_failed()
        return self

    def abort(self) -> None:
        """Cancel the request; its outputs finish with finish_reason 'cancelled'."""
        self._aborted = True
        if self._abort_fn is not None and not self._done_posting:
            self._abort_fn(self.request_id)

    def aborted(self) -> bool:
        return self._aborted

    def done(self) -> bool:
        return self.finished or self._done_posting

    @property
    def outputs_text(self) -> list[str]:
        return [o.text for o in self.outputs]

    def __repr__(self) -> str:
        return (
            f"RequestOutput(request_id={self.request_id}, prompt={self.prompt!r}, "
            f"prompt_token_ids={self.prompt_token_ids}, outputs={self.outputs}, finished={self.finished})"
        )


def _set_done(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
