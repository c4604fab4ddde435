"""The engine's side of disaggregated serving (kv_transfer.py is the wire protocol).

A context_only request ends at its first token with its pages *parked*: kept for the LLM that
continues it, which fetches them through this LLM's transfer server (or in-process) with the
secret in the request's opaque_state; they are released once fetched, after the transfer
timeout, when the KV cache is lost, or at shutdown. A generation_only request arrives with its
context's pages (`import_`): it waits until pages fit, then continues from the context's first
token. Everything here runs on the engine thread.
"""

from __future__ import annotations

import collections
import logging
import os
import time
import traceback
from typing import Callable

import jax
import numpy as np

from jaxllm.disaggregated_params import DisaggregatedParams
from jaxllm.engine import kv_state, kv_transfer
from jaxllm.engine.postprocess import EngineShutdown, Postprocessor
from jaxllm.engine.runner import ModelRunner
from jaxllm.engine.scheduler import Scheduler
from jaxllm.engine.sequence import Request, Sequence
from jaxllm.outputs import Update

logger = logging.getLogger(__name__)


class Disaggregation:
    """Parked contexts and imports waiting for pages.

    Args:
      transfer: this LLM's transfer settings (None: it serves no disaggregated requests).
      new_sequence: `(request, index, seed) -> Sequence`, the engine's.
      export_kv: `Engine.export_kv`, which the transfer server calls from its threads.
    """

    def __init__(self, transfer: kv_state.TransferSettings | None, runner: ModelRunner, scheduler: Scheduler,
                 post: Postprocessor, new_sequence: Callable[[Request, int, int], Sequence],
                 export_kv: Callable[..., tuple[dict, list]]):  # fmt: skip
        self.transfer = transfer
        self.runner = runner
        self.scheduler = scheduler
        self.post = post
        self.new_sequence = new_sequence
        self.export_kv = export_kv
        self.parked: dict[int, kv_state.ParkedContext] = {}  # by the context request's id
        self.server: kv_transfer.KVTransferServer | None = None  # started by the first park
        self.pending_imports: collections.deque = collections.deque()  # (request, meta, arrays) awaiting pages

    # ---- the context side --------------------------------------------------------------------
    def park(self, seq: Sequence) -> None:
        """Keep a finished context_only sequence's pages for the LLM that continues it."""
        request, settings = seq.request, self.transfer
        self.scheduler.detach(seq)  # out of the running set, pages still held
        if self.server is None:
            self.server = kv_transfer.KVTransferServer(
                lambda ctx_request_id, secret: self.export_kv(ctx_request_id, secret, timeout=settings.io_timeout_s),
                settings.host, settings.port, cluster_key=settings.cluster_key, io_timeout_s=settings.io_timeout_s,
                max_connections=settings.max_connections,
            )  # fmt: skip
        secret = kv_state.new_secret()
        self.parked[request.request_id] = kv_state.ParkedContext(seq, secret, time.monotonic() + settings.timeout_s)
        state = kv_state.encode_state(
            settings.cluster_key, llm_id=settings.llm_id, pid=os.getpid(), endpoint=self.server.endpoint,
            ctx_request_id=request.request_id, secret=secret, fingerprint=settings.fingerprint,
            num_tokens=seq.num_prompt_tokens - seq.num_virtual_tokens, seed=seq.seed,
            adapters=kv_state.adapter_ids(request.lora_request, request.prompt_adapter_request),
        )  # fmt: skip
        request.disaggregated_result = DisaggregatedParams(
            request_type="context_only", first_gen_tokens=[seq.token_ids[-1]], ctx_request_id=request.request_id,
            opaque_state=state, disagg_request_id=request.disaggregated_params.disagg_request_id,
        )  # fmt: skip

    def export(self, ctx_request_id: int, secret: str) -> tuple[dict, list]:
        """Gather a parked context's pages in the portable layout, then release them: (meta, arrays)."""
        parked = self.parked.get(ctx_request_id)
        if parked is None or parked.secret != secret:
            raise kv_state.KVTransferError(
                f"no parked context {ctx_request_id} (never made, already fetched, or released after "
                f"{self.transfer.timeout_s:.0f} s)"
            )
        seq = parked.seq
        n = seq.num_prompt_tokens
        try:
            pages = self.runner.gather_pages(self.scheduler.prompt_pages(seq, n))
            arrays = [kv_state.to_portable(a, n, self.transfer.plan) for a in pages]
            jax.block_until_ready(arrays)  # read before the pages are reused
        finally:
            self.release(ctx_request_id)
        meta = {"num_tokens": n, "prompt_token_ids": seq.token_ids[seq.num_virtual_tokens : n], "first_token": seq.token_ids[n],
                "first_logprob": seq.cumulative_logprob, "first_rank": seq.request.first_token_rank, "seed": seq.seed,
                "fingerprint": self.transfer.fingerprint}  # fmt: skip
        return meta, arrays

    def release(self, ctx_request_id: int) -> None:
        """Give a parked context's pages (and adapter slots) back: fetched, expired, lost or shut down."""
        parked = self.parked.pop(ctx_request_id)
        self.scheduler.remove(parked.seq)  # no longer running or waiting: frees its pages, releases its slots

    def release_all(self) -> None:
        """Release every parked context (the KV cache was lost, or the engine stops)."""
        for ctx_request_id in list(self.parked):
            self.release(ctx_request_id)

    def expire(self) -> None:
        """Release the parked contexts nobody fetched within the transfer timeout."""
        if not self.parked:
            return
        now = time.monotonic()
        for ctx_request_id, parked in list(self.parked.items()):
            if parked.deadline < now:
                logger.warning("releasing the pages of context request %d: not fetched within %.1f s",
                               ctx_request_id, self.transfer.timeout_s)  # fmt: skip
                self.release(ctx_request_id)

    def close(self) -> None:
        """At shutdown: the imports still waiting fail, parked contexts are released, the server closes."""
        while self.pending_imports:
            request, _, _ = self.pending_imports.popleft()
            request.output._post(Update(finished=True, error=EngineShutdown("the LLM was shut down before this "
                                                                            "request received its pages")))  # fmt: skip
        self.release_all()
        if self.server is not None:
            self.server.close()

    # ---- the generation side -----------------------------------------------------------------
    def retry_imports(self) -> None:
        """Start the generation_only requests whose pages fit now (oldest first)."""
        while self.pending_imports:
            request, meta, arrays = self.pending_imports[0]
            if request.output.aborted():
                self.pending_imports.popleft()
                request.output._post(Update(finished=True, error=EngineShutdown("aborted before it started")))
                continue
            try:
                if not self.import_(request, meta, arrays):
                    return  # no room yet: it waits, and so do the ones behind it
            except Exception as e:
                logger.error("importing context pages failed:\n%s", traceback.format_exc())
                self.post.fail(request, e)
            self.pending_imports.popleft()

    def import_(self, request: Request, meta: dict, arrays: list) -> bool:
        """Write a context's pages into fresh pages and continue from its first token; False: no
        room yet. The pages are checked against this LLM's layout before any is taken; a failure
        after that gives them back before it propagates."""
        n = meta["num_tokens"]  # KV positions: a prompt adapter's virtual tokens, then the prompt
        seed = request.params.seed if request.params.seed is not None else int(meta["seed"])
        seq = self.new_sequence(request, 0, seed)  # (a retry makes a new one: sequence ids need not be dense)
        if seq.num_prompt_tokens != n:
            raise kv_state.KVTransferError(f"the context holds {n} KV positions, this request's prompt and "
                                              f"prompt adapter make {seq.num_prompt_tokens}")  # fmt: skip
        self.transfer.layout.check_pages(arrays, n)
        if not self.scheduler.take_import_pages(seq, n):
            return False
        try:
            num_pages = len(seq.block_table)
            # Lay the pages out where they are: on the host for TCP arrays, on the context's device otherwise.
            xp = np if isinstance(arrays[0], np.ndarray) else jax.numpy
            block_size = self.scheduler.block_size
            values = [kv_state.from_portable(a, self.transfer.plan, block_size, num_pages, xp=xp) for a in arrays]
            self.runner.scatter_pages(seq.block_table, values, seq.token_ids[:n])
        except BaseException:
            self.scheduler.remove(seq)  # in no queue yet: gives back its pages and adapter slots
            raise
        self.scheduler.mark_computed(seq, n)  # the imported prompt pages are reusable like computed ones
        post = self.post
        if post.detokenizer is not None:
            post.detokenizer.start(seq)
        request.sequences.append(seq)
        post.requests[request.request_id] = request
        request.first_scheduled_time = time.monotonic()
        post.append_token(seq, int(meta["first_token"]), float(meta["first_logprob"]), meta["first_rank"])
        if not seq.finished:
            self.scheduler.add_running(seq)
        post.publish({request})
        return True
