"""DisaggregatedParams: split one request's prefill and decode across two LLM instances.

TensorRT-LLM's names. A `context_only` request runs the prompt's prefill on one `LLM`, samples the
first token and returns, in `CompletionOutput.disaggregated_params`, that token (`first_gen_tokens`),
the context request's id (`ctx_request_id`) and an `opaque_state` (bytes) that tells another `LLM`
where to fetch the prompt's KV pages. A `generation_only` request on that other `LLM` (same
process or another one, same model, dtype and KV layout) passes the same prompt with those
parameters: it receives the pages, continues from the first token, and its output is the tokens one
aggregated request would have produced. `context_and_generation` (or None) is an ordinary request.
The transfer itself lives in jaxllm/engine/kv_transfer.py.

The request side lives here too: `context_state` checks a request's parameters against its prompt
and the model before it is queued, `ContextFetches` fetches a generation_only request's pages and
`check_fetched` checks them before the engine takes them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import TYPE_CHECKING, Any, Callable, List, Optional

from jaxllm.engine import kv_state, kv_transfer
from jaxllm.outputs import Update

if TYPE_CHECKING:
    from jaxllm.engine.sequence import Request
    from jaxllm.inputs import PreprocessedInputs

REQUEST_TYPES = ("context_only", "generation_only", "context_and_generation")


@dataclasses.dataclass(kw_only=True)
class DisaggregatedParams:
    request_type: Optional[str] = None
    first_gen_tokens: Optional[List[int]] = None
    ctx_request_id: Optional[int] = None
    opaque_state: Optional[bytes] = None
    draft_tokens: Optional[List[int]] = None
    disagg_request_id: Optional[int] = None

    def __post_init__(self):
        if self.request_type is not None:
            if not isinstance(self.request_type, str) or self.request_type.lower() not in REQUEST_TYPES:
                raise ValueError(
                    f"DisaggregatedParams.request_type={self.request_type!r} is invalid; allowed: "
                    f"{', '.join(map(repr, REQUEST_TYPES))} or None"
                )
            self.request_type = self.request_type.lower()
        if self.first_gen_tokens is not None and (
            not isinstance(self.first_gen_tokens, (list, tuple))
            or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.first_gen_tokens)
        ):
            raise TypeError(f"DisaggregatedParams.first_gen_tokens must be a list of token ids, got {self.first_gen_tokens!r}")
        if self.opaque_state is not None and not isinstance(self.opaque_state, (bytes, bytearray)):
            raise TypeError(f"DisaggregatedParams.opaque_state must be bytes, got {type(self.opaque_state).__name__}")
        if self.draft_tokens:
            raise ValueError("DisaggregatedParams.draft_tokens: speculative decoding is not supported; allowed: None")


def context_state(dp: DisaggregatedParams | None, pre: "PreprocessedInputs", extras: dict, *, vocab_size: int,
                  multi_process: bool, cluster_key, fingerprint: str) -> dict | None:  # fmt: skip
    """Validate a request's DisaggregatedParams against its prompt and the model; returns the context
    state a generation_only request fetches its pages with (None otherwise).

    Args:
      dp: the request's parameters; pre: its prompt; extras: its request-level arguments (adapters).
      vocab_size: the model's; multi_process: whether the LLM spans several processes.
      cluster_key, fingerprint: the receiving engine's (kv_state.TransferSettings).
    """
    if dp is None or dp.request_type in (None, "context_and_generation"):
        return None
    params = pre.sampling_params
    if params.best_of != 1:
        raise ValueError(f"a {dp.request_type} request takes n=1 and best_of=1; got n={params.n}, "
                         f"best_of={params.best_of}")  # fmt: skip
    if multi_process:
        raise ValueError("disaggregated serving is not supported by a multi-process LLM; run one LLM per process")
    if dp.request_type == "context_only":
        return None
    if dp.opaque_state is None or not dp.first_gen_tokens:
        raise ValueError(
            "a generation_only request needs its context state: pass the disaggregated_params of the "
            "context_only request's output (first_gen_tokens, ctx_request_id, opaque_state)"
        )
    if len(dp.first_gen_tokens) != 1 or not 0 <= dp.first_gen_tokens[0] < vocab_size:
        raise ValueError(f"first_gen_tokens={dp.first_gen_tokens!r} is invalid; allowed: one token id in "
                         f"[0, {vocab_size})")  # fmt: skip
    state = kv_state.decode_state(dp.opaque_state, cluster_key)
    if state["fingerprint"] != fingerprint:
        raise ValueError("the context state comes from an LLM with another model, KV dtype or head layout; "
                         "both LLMs must load the same model with the same KV cache dtype")  # fmt: skip
    if dp.ctx_request_id is not None and dp.ctx_request_id != state["ctx_request_id"]:
        raise ValueError(f"ctx_request_id={dp.ctx_request_id} does not match the context state's "
                         f"{state['ctx_request_id']}")  # fmt: skip
    if state["num_tokens"] != len(pre.prompt_token_ids):
        raise ValueError(f"the prompt has {len(pre.prompt_token_ids)} tokens, the context request's had "
                         f"{state['num_tokens']}; a generation_only request takes the same prompt")  # fmt: skip
    ours = kv_state.adapter_ids(extras.get("lora_request"), extras.get("prompt_adapter_request"))
    if ours != state["adapters"]:
        raise ValueError(f"the context was computed with (LoRA id, prompt adapter id) = {tuple(state['adapters'])}, "
                         f"this request has {tuple(ours)}; a generation_only request takes the same adapters")  # fmt: skip
    return state


def check_fetched(request: "Request", meta: dict, arrays: list, layout: "kv_state.KVLayout",
                  vocab_size: int) -> None:  # fmt: skip
    """Check the pages a generation_only request fetched (`kv_transfer.fetch`) against the request,
    before anything is written into the cache; raises KVTransferError."""
    num_virtual = request.prompt_adapter.num_virtual_tokens if request.prompt_adapter is not None else 0
    wanted = len(request.prompt_token_ids) + num_virtual
    num_tokens = kv_state.check_meta(meta, layout, vocab_size)
    if num_tokens != wanted:
        raise kv_state.KVTransferError(f"the context holds {num_tokens} KV positions; this request's "
                                          f"prompt and prompt adapter make {wanted}")  # fmt: skip
    layout.check_pages(arrays, num_tokens)
    if meta["prompt_token_ids"] != request.prompt_token_ids:
        raise kv_state.KVTransferError("the prompt differs from the context request's prompt")
    first = request.disaggregated_params.first_gen_tokens[0]
    if meta["first_token"] != first:
        raise kv_state.KVTransferError(f"first_gen_tokens=[{first}] differs from the context's first "
                                          f"token {meta['first_token']}")  # fmt: skip


class ContextFetches:
    """One LLM's generation_only requests whose context pages are being fetched, on a pool of four
    threads: each fetch is checked (`check_fetched`) and handed to the engine (`submit_with_kv`),
    or fails its request. Nothing is written into the cache here: the engine does that.

    Args:
      lock: the LLM's shutdown lock, held by the callers of `start` and `detach`, so that shutting
        the LLM down and ending its fetches is one step.
    """

    def __init__(self, lock):
        self._lock = lock
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # Requests being fetched (request id -> (request, its socket or None)): `fail` answers them and
        # ends their connections, however stalled the peer.
        self._fetching: dict[int, tuple[Request, Any]] = {}

    def start(self, engine, requests: list["Request"], vocab_size: int) -> None:
        """(the lock held) Fetch these requests' pages in the background, for `engine` (whose model
        has `vocab_size` tokens)."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="jaxllm-kv-fetch")
        for request in requests:
            self._fetching[request.request_id] = (request, None)
            self._pool.submit(self._fetch_and_submit, engine, request, vocab_size)

    def detach(self) -> tuple:
        """(the lock held) Take the pool and the requests being fetched, for `fail`: from here their
        fetch threads hand nothing to the engine."""
        detached = (self._pool, self._fetching)
        self._pool, self._fetching = None, {}
        return detached

    @staticmethod
    def fail(detached: tuple, error: Callable[[], BaseException]) -> None:
        """Answer the detached requests with error() and end their connections."""
        pool, fetching = detached
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        for request, sock in fetching.values():  # queued or mid-fetch: answered now, their connections ended
            if sock is not None:
                kv_transfer.hang_up(sock)
            request.output._post(Update(finished=True, error=error()))

    def _fetch_and_submit(self, engine, request: "Request", vocab_size: int) -> None:
        """(a fetch thread) Fetch a generation_only request's pages, check them, and hand them to the
        engine; or fail the request."""
        settings = engine.transfer

        def on_connect(sock) -> None:
            with self._lock:
                if request.request_id in self._fetching:
                    self._fetching[request.request_id] = (request, sock)
                    return
            kv_transfer.hang_up(sock)  # shut down while connecting

        try:
            with self._lock:
                if request.request_id not in self._fetching:
                    return  # shutdown has answered it
            meta, arrays = kv_transfer.fetch(request.context_state, settings.layout, key=settings.cluster_key,
                                             io_timeout_s=settings.io_timeout_s, on_connect=on_connect)  # fmt: skip
            check_fetched(request, meta, arrays, settings.layout, vocab_size)
            error = None
        except Exception as e:
            error = e
        with self._lock:
            if self._fetching.pop(request.request_id, None) is None:
                return  # shutdown has answered it
        try:
            if error is None:
                engine.submit_with_kv(request, meta, arrays)  # from here the engine answers it
                return
        except Exception as e:
            error = e
        request.output._post(Update(finished=True, error=error))
