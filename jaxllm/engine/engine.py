"""The engine: one background thread that owns the device, the KV cache and every request's state.

Callers (any thread, or asyncio code through the futures) hand requests in through a queue; the
thread admits them between steps, runs `Scheduler.schedule` -> `ModelRunner.run` -> postprocess,
and posts each request's news to its RequestOutput. Faults stay contained: a logits processor that
raises fails its own request only; an error of the model step fails the requests of that step, not
the loop (their futures raise, the KV cache is rebuilt, and the other running requests are
recomputed). Aborts land at once, even while a step runs on the device: the engine thread waits for
a step's outputs on its wake event while a reader thread (`StepReader`) reads them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import queue
import random
import threading
import time
import traceback
from typing import Any

import jax
import numpy as np

from jaxllm.disaggregated_params import DisaggregatedParams
from jaxllm.engine import kv_transfer
from jaxllm.engine.block_manager import BlockManager
from jaxllm.engine.detokenizer import Detokenizer, find_stop_string
from jaxllm.engine.runner import ModelRunner, PendingStep, StepRequest
from jaxllm.engine.scheduler import ScheduledStep, Scheduler
from jaxllm.engine.sequence import Request, Sequence, SequenceStatus
from jaxllm.outputs import Delta, Logprob, Update

logger = logging.getLogger(__name__)

STATS_HISTORY = 1000  # iteration stats kept for get_stats


class EngineShutdown(RuntimeError):
    """The engine was shut down before the request finished."""


def derive_seed(base: int, index: int) -> int:
    """Seed of sample `index` of a request seeded with `base` (sample 0 uses `base` itself)."""
    if index == 0:
        return base
    x = (base + 0x9E3779B97F4A7C15 * index) & 0xFFFFFFFFFFFFFFFF  # splitmix64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


class StepReader:
    """A thread that reads dispatched steps' outputs to the host (blocking inside XLA, the GIL
    released), so that the engine thread waits on its wake event instead and can act on aborts
    while a step runs. One read at a time: the engine waits for each before the next."""

    def __init__(self, wake: threading.Event):
        self._wake = wake
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # (PendingStep, Future), or None to stop
        self._thread = threading.Thread(target=self._run, name="jaxllm-step-reader", daemon=True)
        self._thread.start()

    def read(self, pending: PendingStep) -> concurrent.futures.Future:
        """Start reading `pending`; the future holds its host outputs (`PendingStep.result`), and
        the wake event is set once it is done."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((pending, done))
        return done

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            pending, done = job
            try:
                done.set_result(pending.result())
            except BaseException as e:  # the engine thread re-raises it as the step's error
                done.set_exception(e)
            self._wake.set()

    def close(self, timeout: float | None = 30.0) -> None:
        self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)


def is_context_only(request: Request) -> bool:
    params = request.disaggregated_params
    return params is not None and params.request_type == "context_only"


class Engine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, tokenizer, max_seq_len: int, vocab_size: int,
                 transfer: kv_transfer.TransferSettings | None = None, overlap: bool = True):  # fmt: skip
        self.runner = runner
        # Multi-step decoding: the most decodes per dispatch (the runner compiles that variant; 1 turns it off here).
        self.decode_steps = runner.config.decode_steps
        # The overlap scheduler: the next multi-step decode starts before this one's tokens are read
        # (`_follow_on`); the dispatch in flight, (scheduled, steps, pending), is the next step's.
        self.overlap = overlap
        self._inflight: tuple[ScheduledStep, int, PendingStep] | None = None
        self.num_follow_ons = 0  # dispatches the overlap scheduler started ahead
        self.scheduler = scheduler
        self.block_manager: BlockManager = scheduler.block_manager
        self.tokenizer = tokenizer
        self.detokenizer = Detokenizer(tokenizer) if tokenizer is not None else None
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self.requests: dict[int, Request] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        # Held while something enters the inbox and while shutdown stops the engine: nothing enters it
        # after shutdown has drained it (a request put there then would never be answered).
        self._intake_lock = threading.Lock()
        # Aborts have their own queue: the engine thread takes them between steps and while a step
        # runs (`_read`), when the other messages wait for the step's end.
        self._aborts: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._stats: collections.deque[dict] = collections.deque(maxlen=STATS_HISTORY)
        self._stats_lock = threading.Lock()
        self._iteration = 0
        self._next_seq_id = 0
        self._seed_rng = random.Random(int.from_bytes(os.urandom(8), "little"))
        self.max_active = 0
        # Disaggregated serving: contexts parked for other LLMs, and the server that hands them out.
        self.transfer = transfer
        self.parked: dict[int, kv_transfer.ParkedContext] = {}
        self._transfer_server: kv_transfer.KVTransferServer | None = None
        self._pending_imports: collections.deque = collections.deque()  # (request, meta, arrays) awaiting pages
        if transfer is not None:
            kv_transfer.register_local(transfer.llm_id, self)
        self._reader = StepReader(self._wake)
        self._thread = threading.Thread(target=self._loop, name="jaxllm-engine", daemon=True)
        self._thread.start()

    # ---- caller side (thread-safe) -----------------------------------------------------------
    def _put(self, kind: str, item: Any, stopped: Exception) -> None:
        with self._intake_lock:
            if self._stop.is_set():
                raise stopped
            self._inbox.put((kind, item))
        self._wake.set()

    def submit(self, *requests: Request) -> None:
        """Queue requests; those of one call reach the scheduler in the same iteration (a batch's
        composition, and so its rounding, does not depend on when the engine thread wakes)."""
        self._put("add", requests, EngineShutdown("the LLM has been shut down"))

    def submit_with_kv(self, request: Request, meta: dict, arrays: list) -> None:
        """A generation_only request with its context's pages (portable layout, kv_transfer.py)."""
        self._put("import", (request, meta, arrays), EngineShutdown("the LLM has been shut down"))

    def export_kv(self, ctx_request_id: int, secret: str, timeout: float = 60.0) -> tuple[dict, list]:
        """Hand a parked context's pages to another LLM (any thread but this engine's): (meta, arrays)."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        stopped = kv_transfer.KVTransferError("the context LLM has been shut down")
        self._put("export", (ctx_request_id, secret, done), stopped)
        try:
            return done.result(timeout)
        except concurrent.futures.TimeoutError:
            raise kv_transfer.KVTransferError(f"the context LLM did not hand out context {ctx_request_id} "
                                              f"within {timeout:.0f} s") from None  # fmt: skip

    def abort(self, request_id: int) -> None:
        """Cancel a request (RequestOutput.abort marks its output aborted first): it resolves within
        one engine step, or at once while a step runs on the device."""
        self._aborts.put(request_id)
        self._wake.set()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the thread; every request still queued, running or waiting for pages fails with
        EngineShutdown, every parked context is released, and the transfer server closes."""
        with self._intake_lock:
            self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self._reader.close(timeout)
        self._drain_inbox(stopping=True)
        self._take_aborts()
        for request in list(self.requests.values()):
            self._fail(request, EngineShutdown("the LLM was shut down before this request finished"))
        self.requests.clear()
        while self._pending_imports:
            request, _, _ = self._pending_imports.popleft()
            request.output._post(Update(finished=True, error=EngineShutdown("the LLM was shut down before this "
                                                                            "request received its pages")))  # fmt: skip
        for ctx_request_id in list(self.parked):
            self._release_parked(ctx_request_id)
        if self._transfer_server is not None:
            self._transfer_server.close()
        self.runner.close()

    def stats(self) -> list[dict]:
        """Iteration stats collected since the last call (TensorRT-LLM's get_stats keys)."""
        with self._stats_lock:
            items = list(self._stats)
            self._stats.clear()
        return items

    # ---- engine thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox()
            self._take_aborts()
            self._expire_parked()
            self._retry_imports()
            if not self.scheduler.has_work() and self._inflight is None:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as e:  # a bug in postprocessing: fail what is running, keep serving
                logger.error("engine step failed:\n%s", traceback.format_exc())
                self._inflight = None  # its sequences are failed below; its results are not read
                for request in {s.request for s in self.scheduler.running}:
                    self._fail(request, e)

    def _drain_inbox(self, stopping: bool = False) -> None:
        """Take in what callers queued; `stopping` (shutdown, the thread gone): refuse imports and exports."""
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                for request in item:
                    self._add(request)
            elif kind == "import" and stopping:
                item[0].output._post(Update(finished=True, error=EngineShutdown("the LLM has been shut down")))
            elif kind == "import":
                self._pending_imports.append(item)
            elif kind == "export":
                ctx_request_id, secret, done = item
                try:
                    if stopping:
                        raise kv_transfer.KVTransferError("the context LLM has been shut down")
                    done.set_result(self._export(ctx_request_id, secret))
                except Exception as e:
                    done.set_exception(e)

    def _add(self, request: Request) -> None:
        params = request.params
        base_seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
        for index in range(params.best_of):
            seq = self._new_sequence(request, index, derive_seed(base_seed, index))
            if self.detokenizer is not None:
                self.detokenizer.start(seq)
            request.sequences.append(seq)
        # Parallel samples wait until sample 0 has computed the prompt, then share its full pages.
        self.scheduler.add(request.sequences[0])
        self.requests[request.request_id] = request
        if request.output.aborted():  # its abort was taken while a step ran, before this arrived
            self._abort(request.request_id)

    def _new_sequence(self, request: Request, index: int, seed: int) -> Sequence:
        """Sample `index` of `request`. A prompt adapter's virtual tokens lead it as ids vocab_size + i
        (runner.py maps them to the adapter's rows of the device table)."""
        num_virtual = request.prompt_adapter.num_virtual_tokens if request.prompt_adapter is not None else 0
        seq = Sequence(
            seq_id=self._next_seq_id,
            request=request,
            index=index,
            token_ids=[self.vocab_size + i for i in range(num_virtual)] + list(request.prompt_token_ids),
            num_prompt_tokens=num_virtual + len(request.prompt_token_ids),
            seed=seed,
            num_virtual_tokens=num_virtual,
        )
        self._next_seq_id += 1
        return seq

    def _take_aborts(self) -> None:
        while True:
            try:
                request_id = self._aborts.get_nowait()
            except queue.Empty:
                return
            self._abort(request_id)

    def _abort(self, request_id: int) -> None:
        request = self.requests.get(request_id)
        if request is None:
            return
        request.aborted = True
        deltas = []
        for seq in request.sequences:
            if not seq.finished:
                self._finish(seq, "cancelled", None)
            deltas.append(self._delta(seq, final=True))
        self._close(request, Update(tuple(deltas), finished=True))

    def _fail(self, request: Request, error: BaseException) -> None:
        for seq in request.sequences:
            if not seq.finished:
                self.scheduler.remove(seq)
                seq.status = SequenceStatus.FINISHED
        self._close(request, Update(finished=True, error=error))

    def _close(self, request: Request, update: Update) -> None:
        self.requests.pop(request.request_id, None)
        request.output._post(update)

    def _finish(self, seq: Sequence, reason: str, stop_reason: Any) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        seq.status = SequenceStatus.FINISHED
        if is_context_only(seq.request) and reason != "cancelled" and seq.num_output_tokens == 1:
            self._park(seq)
        else:
            self.scheduler.remove(seq)

    # ---- one step ----------------------------------------------------------------------------
    def step(self) -> None:
        started = time.perf_counter()
        flight, self._inflight = self._inflight, None
        if flight is not None and all(seq.finished for seq, _ in flight[0].items):
            flight = None  # every sequence of it was aborted: the devices run it, nobody reads it
        if flight is not None:  # a multi-step decode the last step started (the overlap scheduler)
            scheduled, steps, pending = flight
            context, generation = [], [seq for seq, _ in scheduled.items if not seq.finished]
        else:
            scheduled, pending = self.scheduler.schedule(), None
            if not scheduled.items:
                self._wake.wait(0.01)
                return
            # For the stats, before the step moves them on: prefill chunks, and the decoding sequences' tokens.
            context = [(seq, n) for seq, n in scheduled.items if seq.num_computed < seq.num_prompt_tokens]
            generation = [seq for seq, _ in scheduled.items if seq.num_computed >= seq.num_prompt_tokens]
            steps = self._multi_steps(scheduled)
            step_requests = [self._step_request(seq, n) for seq, n in scheduled.items]
            for seq, _ in scheduled.items:
                if seq.request.first_scheduled_time is None:
                    seq.request.first_scheduled_time = time.monotonic()
        before = sum(len(seq.token_ids) for seq in generation)
        try:
            if pending is None:
                pending = self.runner.dispatch(step_requests, steps)
            if steps > 1 and self.overlap:
                self._inflight = self._follow_on(scheduled, steps, pending)
            out = self._read(pending)
            if steps == 1:
                self._apply_logits_processors(scheduled, step_requests, out)
        except Exception as e:
            logger.error("model step failed:\n%s", traceback.format_exc())
            self._inflight = None
            failed = {seq.request for seq, _ in scheduled.items if not seq.finished}
            for request in failed:
                self._fail(request, e)
            self.runner.reset_cache()
            for ctx_request_id in list(self.parked):  # their K/V was in the lost cache too
                self._release_parked(ctx_request_id)
            self.scheduler.drop_all_pages()  # their K/V, and every cached page's, was in the lost cache
            return
        if steps == 1:
            touched = self._postprocess(scheduled, step_requests, out)
        else:
            touched = self._postprocess_steps(scheduled, out, steps)
        decoded = (sum(len(seq.token_ids) for seq in generation) - before) / len(generation) if generation else 0.0
        self._record_stats(scheduled, context, started, decoded)  # before the outputs: a caller woken by them sees them
        self._publish(touched)

    def _read(self, pending: PendingStep) -> dict:
        """`pending`'s host outputs. Aborts that arrive while it runs land now: their requests
        resolve with the tokens they have, and the step's rows of them are dropped when read."""
        done = self._reader.read(pending)
        while not done.done():
            self._wake.wait()
            self._wake.clear()  # (a submit's wake too: `_loop` drains the inbox before it sleeps)
            self._take_aborts()
        return done.result()

    def _left(self, seq: Sequence) -> bool:
        """Whether `seq`'s request left the engine while its step ran (aborted, or failed in a
        logits processor): its pages are freed, and the step's results for it are dropped."""
        return seq.request.request_id not in self.requests

    def _multi_steps(self, scheduled: ScheduledStep) -> int:
        """How many decodes the scheduled step runs in one dispatch (multi-step decoding): the
        engine's `decode_steps` when only decodes are scheduled (so no waiting sequence could be
        admitted this step), no request has arrived since the schedule (it would wait for the whole
        run), each sequence has its first token and needs nothing from the host between steps (no
        penalties, banned words or tokens, logits processors or logits returned), and some
        sequence wants at least two more tokens; else 1. Gives each sequence the pages of the
        tokens it may still keep (up to max_tokens and max_seq_len); past them a row computes into
        the null page."""
        K = self.decode_steps
        if K == 1 or not scheduled.is_decode_only or scheduled.preempted or self._arrived():
            return 1
        wants = []
        for seq, _ in scheduled.items:
            params, request = seq.request.params, seq.request
            if (params.wants_logits or params.uses_penalties or request.bad_word_ids or request.bias_row is not None
                    or seq.num_output_tokens < max(1, params.min_tokens or 0) or is_context_only(request)):  # fmt: skip
                return 1
            wants.append(min(K, self._tokens_left(seq)))
        if max(wants) < 2 or not self.runner.multi_step_serves([self._step_request(s, 1) for s, _ in scheduled.items]):
            return 1
        if not self._give_pages(scheduled, wants):
            return 1
        return K

    def _arrived(self) -> bool:
        """Whether a request arrived since the schedule (queued, or a generation_only one awaiting
        pages): a multi-step dispatch would make it wait for its whole run."""
        return not self._inbox.empty() or bool(self._pending_imports)

    def _tokens_left(self, seq: Sequence, ahead: int = 0) -> int:
        """Tokens `seq` may still sample (up to max_tokens and max_seq_len) once `ahead` more are."""
        return min(seq.request.params.max_tokens - seq.num_output_tokens, self.max_seq_len - seq.num_tokens) - ahead

    def _give_pages(self, scheduled: ScheduledStep, wants: list[int], ahead: int = 0) -> bool:
        """Give each scheduled sequence the pages of `ahead` + its `wants` more tokens, if all fit."""
        bm = self.block_manager
        needs = [(seq, ahead + n) for (seq, _), n in zip(scheduled.items, wants)]
        if not bm.can_allocate(sum(bm.blocks_needed(seq, n) for seq, n in needs)):
            return False
        for seq, n in needs:
            bm.allocate(seq, n)
        return True

    def _follow_on(self, scheduled: ScheduledStep, steps: int, pending: PendingStep):
        """The overlap scheduler: start the next multi-step decode of the same sequences while
        `pending` (a multi-step decode of `steps`) still runs, its input tokens read from `pending`'s
        last samples on the device; returns the dispatch in flight, or None where the next step
        must be scheduled afresh: a request arrived or waits (it would wait a whole dispatch more),
        a sequence finished or will reach max_tokens / max_seq_len within `pending`, the pages do
        not fit, or the step needs what a follow-on cannot give (adapters). With several processes
        the followers replay it from their own copy of `pending`'s outputs (`ModelRunner.follow`).
        A sequence that stops on an EOS or stop word within `pending` has its follow-on tokens
        dropped when they are read (`_postprocess_steps`); the follow-on writes only positions past
        what `pending` computed (no page the prefix cache holds), and whatever gets the pages a
        finish frees runs after it on the devices (the KV cache threads through every dispatch)."""
        runner = self.runner
        if self._arrived() or self.scheduler.waiting or runner.adapters is not None:
            return None
        wants = []
        for seq, _ in scheduled.items:
            left = self._tokens_left(seq, steps)  # `pending` samples `steps` tokens for every sequence
            if seq.finished or left < 1:
                return None
            wants.append(min(self.decode_steps, left))
        if not self._give_pages(scheduled, wants, steps):
            return None
        requests = []
        for seq, _ in scheduled.items:
            r = self._step_request(seq, 1)  # as the next step would make it, `steps` tokens further on
            r.token_ids, r.start, r.counter = [0], r.start + steps, r.counter + steps
            requests.append(r)
        flight = scheduled, self.decode_steps, runner.dispatch(requests, self.decode_steps, after=pending)
        self.num_follow_ons += 1
        return flight

    def _step_request(self, seq: Sequence, n: int) -> StepRequest:
        request, params = seq.request, seq.request.params
        start = seq.num_computed
        samples = start + n == seq.num_tokens
        r = StepRequest(token_ids=seq.token_ids[start : start + n], start=start, block_table=list(seq.block_table),
                        lora_slot=seq.lora_slot, prompt_adapter_slot=seq.prompt_adapter_slot)  # fmt: skip
        num_virtual, num_prompt = seq.num_virtual_tokens, seq.num_prompt_tokens
        if not samples:
            r.temperature = 0.0
        else:
            r.temperature = params.effective_temperature
            r.top_k = params.top_k or 0
            r.top_p = 1.0 if params.top_p is None else float(params.top_p)
            r.min_p = params.min_p or 0.0
            r.seed = seq.seed
            r.counter = seq.num_output_tokens
            r.num_logprobs = params.logprobs or 0
            r.bias_slot = seq.bias_slot
            r.banned_tokens = self._banned_tokens(seq) or None
            r.prompt_len, r.first_position = num_prompt, num_virtual
            if params.uses_penalties:
                r.repetition_penalty = params.repetition_penalty or 1.0
                r.presence_penalty = params.presence_penalty or 0.0
                r.frequency_penalty = params.frequency_penalty or 0.0
            r.want_last_logits = params.wants_logits
        # Prompt log-probabilities and context logits cover the user's prompt: positions from
        # num_virtual on (a virtual position's row is computed and skipped; its next token is 0).
        first = max(start, num_virtual)
        end = min(start + n, num_prompt - 1)
        if (params.prompt_logprobs is not None and seq.index == 0 and first < end
                and len(request.prompt_logprobs) == first - num_virtual):  # fmt: skip
            r.prompt_logprobs_next = [0] * (first - start) + seq.token_ids[first + 1 : end + 1]
            r.num_logprobs = max(r.num_logprobs, params.prompt_logprobs)
        if params.return_context_logits and seq.index == 0 and first < min(start + n, num_prompt):
            # Only chunks that extend the rows gathered so far (a recompute after preemption doesn't).
            r.want_all_logits = sum(len(rows) for rows in request.context_logits_rows) == first - num_virtual
        return r

    def _banned_tokens(self, seq: Sequence) -> list[int]:
        """Tokens banned at this step only: the end tokens while min_tokens is not reached, and the
        last token of each multi-token bad word whose prefix the sequence just generated (banned
        single tokens live in the request's bias row, engine/runner.py)."""
        request, params = seq.request, seq.request.params
        banned: list[int] = []
        if params.min_tokens and seq.num_output_tokens < params.min_tokens:
            banned.extend(request.stop_token_ids)
        tokens = seq.token_ids[seq.num_virtual_tokens :]
        for word in request.bad_word_ids:
            prefix = list(word[:-1])
            if prefix and tokens[len(tokens) - len(prefix) :] == prefix:
                banned.append(word[-1])
        return sorted(set(banned))

    def _apply_logits_processors(self, scheduled: ScheduledStep, step_requests, out) -> None:
        """The slow path: a Python callable edits a row's logits, which is then sampled again. A
        processor that raises (or returns what does not fit the row) fails its own request only;
        the other rows are sampled as they would have been without it."""
        rows = [i for i, (seq, _) in enumerate(scheduled.items)
                if seq.request.params.logits_processors and step_requests[i].temperature is not None
                and step_requests[i].start + len(step_requests[i].token_ids) == seq.num_tokens
                and not self._left(seq)]  # fmt: skip
        if not rows:
            return
        logits = np.array(out["last_logits"][rows], dtype=np.float32)
        kept = []
        for j, i in enumerate(rows):
            seq = scheduled.items[i][0]
            if self._left(seq):  # another sample of its request failed just now
                continue
            try:
                self._run_logits_processors(seq, logits[j : j + 1])
            except Exception as e:
                logger.warning("request %d failed in its logits processor:\n%s", seq.request.request_id,
                               traceback.format_exc())  # fmt: skip
                self._fail(seq.request, e)
                continue
            kept.append(j)
        kept = [j for j in kept if not self._left(scheduled.items[rows[j]][0])]
        if not kept:
            return
        resampled = self.runner.resample(logits[kept], [step_requests[rows[j]] for j in kept])
        kept_rows = [rows[j] for j in kept]
        for key, values in resampled.items():
            if key in out:
                out[key] = np.array(out[key])
                out[key][kept_rows] = values

    @staticmethod
    def _run_logits_processors(seq: Sequence, row: np.ndarray) -> None:
        """Apply `seq`'s request's logits processors, in order, to its logits `row` ([1, V], in place);
        an exception they raise gets a note naming the processor and the request."""
        request = seq.request
        tokens = [seq.token_ids[seq.num_virtual_tokens :]]
        for processor in request.params.logits_processors:
            try:
                result = processor(request.request_id, row, tokens, None, None)
                if result is not None:
                    result = np.asarray(result, np.float32)
                    if result.size != row.size:
                        raise ValueError(f"a logits processor returned {result.shape} values for logits of "
                                         f"shape {row.shape}; return None (edit in place) or an array of that size")
                    row[...] = result.reshape(row.shape)
            except Exception as e:
                name = getattr(processor, "__qualname__", None) or type(processor).__name__
                e.add_note(f"raised by logits_processor {name} of request {request.request_id} at output token "
                           f"{seq.num_output_tokens} of sample {seq.index}")  # fmt: skip
                raise

    def _postprocess(self, scheduled: ScheduledStep, step_requests: list[StepRequest], out) -> set:
        touched = set()
        offset = 0
        for i, (seq, n) in enumerate(scheduled.items):
            request, params = seq.request, seq.request.params
            r = step_requests[i]
            if self._left(seq):
                offset += n
                continue
            start = seq.num_computed
            seq.num_computed += n
            self.block_manager.register_computed(seq)  # before a finish frees its pages
            touched.add(request)
            skip = max(0, seq.num_virtual_tokens - start)  # virtual positions at the chunk's start
            if r.prompt_logprobs_next is not None:
                self._collect_prompt_logprobs(request, out, offset + skip, start + skip - seq.num_virtual_tokens,
                                              len(r.prompt_logprobs_next) - skip)  # fmt: skip
            if r.want_all_logits:
                request.context_logits_rows.append(
                    np.asarray(out["all_logits"][offset + skip : offset + min(n, seq.num_prompt_tokens - start)])
                )
            offset += n
            if seq.num_computed < seq.num_tokens or seq.finished:
                continue  # a prefill chunk that does not reach the end samples nothing
            if seq.index == 0 and seq.num_output_tokens == 0:
                self._start_siblings(seq)
            top = None
            if params.logprobs:
                top = zip(out["top_ids"][i][: params.logprobs], out["top_logprobs"][i][: params.logprobs])
            logits_row = np.asarray(out["last_logits"][i]) if params.return_generation_logits else None
            self._append_token(seq, int(out["tokens"][i]), float(out["logprob"][i]), int(out["rank"][i]), top,
                               logits_row)  # fmt: skip
        return touched

    def _postprocess_steps(self, scheduled: ScheduledStep, out, steps: int) -> set:
        """A multi-step decode's results ([steps, rows]): each sequence takes its tokens in order
        until it stops; the rest of its row was computed past its end and is dropped."""
        touched = set()
        for i, (seq, _) in enumerate(scheduled.items):
            if seq.finished:  # stopped before this dispatch was read (it ran on from the last one)
                continue
            touched.add(seq.request)
            k_logprobs = seq.request.params.logprobs
            for k in range(steps):
                if seq.finished:
                    break
                seq.num_computed += 1
                self.block_manager.register_computed(seq)  # before a finish frees its pages
                top = zip(out["top_ids"][k][i][:k_logprobs], out["top_logprobs"][k][i][:k_logprobs]) if k_logprobs else None
                self._append_token(seq, int(out["tokens"][k][i]), float(out["logprob"][k][i]), int(out["rank"][k][i]), top)
        return touched

    def _append_token(self, seq: Sequence, token: int, logprob: float, rank: int, top=None, logits_row=None) -> None:
        """Add a sampled token to `seq`: log-probabilities, logits, timing, then the stop checks."""
        request, params = seq.request, seq.request.params
        seq.token_ids.append(token)
        seq.cumulative_logprob += logprob
        request.last_token_time = time.monotonic()
        if request.first_token_time is None:
            request.first_token_time = request.last_token_time
            request.first_token_rank = rank
        if params.logprobs is not None:
            entry = {token: Logprob(logprob, rank)}
            for r, (tid, lp) in enumerate(top or ()):
                entry.setdefault(int(tid), Logprob(float(lp), r + 1))
            if seq.logprobs is None:
                seq.logprobs = []
            seq.logprobs.append(entry)
        if logits_row is not None:
            seq.generation_logits.append(logits_row)
        self._check_stop(seq, token)
        if not seq.finished and is_context_only(request):
            self._finish(seq, "length", None)  # a context_only request ends at its first token

    def _start_siblings(self, first: Sequence) -> None:
        """Queue samples 1..best_of-1 of a request whose prompt sample 0 has just computed; each
        shares the prompt's full pages and recomputes only the partial last page (at least one
        token, for its own first logits)."""
        for sibling in first.request.sequences[1:]:
            if sibling.status is SequenceStatus.WAITING and sibling.num_computed == 0 and not sibling.block_table:
                sibling.num_computed = self.block_manager.share_prefix(first, sibling, first.num_prompt_tokens - 1)
                self.scheduler.add(sibling)

    def _collect_prompt_logprobs(self, request: Request, out, offset: int, start: int, count: int) -> None:
        """Entries for the user's prompt tokens start + 1 .. start + count, from the packed rows at `offset` on."""
        k = request.params.prompt_logprobs
        entries = request.prompt_logprobs
        for j in range(count):
            t = offset + j
            token = request.prompt_token_ids[start + j + 1]
            entry = {token: Logprob(float(out["prompt_logprob"][t]), int(out["prompt_rank"][t]))}
            for rank, (tid, lp) in enumerate(zip(out["prompt_top_ids"][t][:k], out["prompt_top_logprobs"][t][:k])):
                entry.setdefault(int(tid), Logprob(float(lp), rank + 1))
            entries.append(entry)

    def _check_stop(self, seq: Sequence, token: int) -> None:
        request, params = seq.request, seq.request.params
        n_out = seq.num_output_tokens
        if self.detokenizer is not None and params.detokenize:
            stop_token = token in request.stop_token_ids and n_out >= (params.min_tokens or 0)
            if not stop_token or params.include_stop_str_in_output:
                new = self.detokenizer.step(seq, params.skip_special_tokens, params.spaces_between_special_tokens)
                stops = params.stop_strings
                if stops and new and n_out >= (params.min_tokens or 0):
                    hit = find_stop_string(seq.text, len(new), stops)
                    if hit is not None:
                        index, stop = hit
                        seq.text = seq.text[: index + len(stop)] if params.include_stop_str_in_output else seq.text[:index]
                        self._finish(seq, "stop", stop)
                        return
        if token in request.stop_token_ids and n_out >= (params.min_tokens or 0):
            self._finish(seq, "stop", token)
        elif n_out >= params.max_tokens or seq.num_tokens >= self.max_seq_len:
            if self.detokenizer is not None and params.detokenize:
                self.detokenizer.flush(seq, params.skip_special_tokens, params.spaces_between_special_tokens)
            self._finish(seq, "length", None)

    # ---- disaggregated serving (kv_transfer.py) --------------------------------------------------
    def _park(self, seq: Sequence) -> None:
        """Keep a finished context_only sequence's pages for the LLM that continues it."""
        request, settings = seq.request, self.transfer
        self.scheduler.detach(seq)  # out of the running set, pages still held
        if self._transfer_server is None:
            self._transfer_server = kv_transfer.KVTransferServer(
                lambda ctx_request_id, secret: self.export_kv(ctx_request_id, secret, timeout=settings.io_timeout_s),
                settings.host, settings.port, cluster_key=settings.cluster_key, io_timeout_s=settings.io_timeout_s,
                max_connections=settings.max_connections,
            )  # fmt: skip
        secret = kv_transfer.new_secret()
        self.parked[request.request_id] = kv_transfer.ParkedContext(seq, secret, time.monotonic() + settings.timeout_s)
        state = kv_transfer.encode_state(
            settings.cluster_key, llm_id=settings.llm_id, pid=os.getpid(), endpoint=self._transfer_server.endpoint,
            ctx_request_id=request.request_id, secret=secret, fingerprint=settings.fingerprint,
            num_tokens=seq.num_prompt_tokens - seq.num_virtual_tokens, seed=seq.seed,
            adapters=kv_transfer.adapter_ids(request.lora_request, request.prompt_adapter_request),
        )  # fmt: skip
        request.disaggregated_result = DisaggregatedParams(
            request_type="context_only", first_gen_tokens=[seq.token_ids[-1]], ctx_request_id=request.request_id,
            opaque_state=state, disagg_request_id=request.disaggregated_params.disagg_request_id,
        )  # fmt: skip

    def _export(self, ctx_request_id: int, secret: str) -> tuple[dict, list]:
        """(engine thread) Gather a parked context's pages in the portable layout, then release them."""
        parked = self.parked.get(ctx_request_id)
        if parked is None or parked.secret != secret:
            raise kv_transfer.KVTransferError(
                f"no parked context {ctx_request_id} (never made, already fetched, or released after "
                f"{self.transfer.timeout_s:.0f} s)"
            )
        seq = parked.seq
        n = seq.num_prompt_tokens
        try:
            pages = self.runner.gather_pages(seq.block_table[: -(-n // self.block_manager.block_size)])
            arrays = [kv_transfer.to_portable(a, n, self.transfer.plan) for a in pages]
            jax.block_until_ready(arrays)  # read before the pages are reused
        finally:
            self._release_parked(ctx_request_id)
        meta = {"num_tokens": n, "prompt_token_ids": seq.token_ids[seq.num_virtual_tokens : n], "first_token": seq.token_ids[n],
                "first_logprob": seq.cumulative_logprob, "first_rank": seq.request.first_token_rank, "seed": seq.seed,
                "fingerprint": self.transfer.fingerprint}  # fmt: skip
        return meta, arrays

    def _release_parked(self, ctx_request_id: int) -> None:
        """Give a parked context's pages (and adapter slots) back: fetched, expired, lost or shut down."""
        parked = self.parked.pop(ctx_request_id)
        self.scheduler.remove(parked.seq)  # no longer running or waiting: frees its pages, releases its slots

    def _expire_parked(self) -> None:
        if not self.parked:
            return
        now = time.monotonic()
        for ctx_request_id, parked in list(self.parked.items()):
            if parked.deadline < now:
                logger.warning("releasing the pages of context request %d: not fetched within %.1f s",
                               ctx_request_id, self.transfer.timeout_s)  # fmt: skip
                self._release_parked(ctx_request_id)

    def _retry_imports(self) -> None:
        """Start the generation_only requests whose pages fit now (oldest first)."""
        while self._pending_imports:
            request, meta, arrays = self._pending_imports[0]
            if request.output.aborted():
                self._pending_imports.popleft()
                request.output._post(Update(finished=True, error=EngineShutdown("aborted before it started")))
                continue
            try:
                if not self._import(request, meta, arrays):
                    return  # no room yet: it waits, and so do the ones behind it
            except Exception as e:
                logger.error("importing context pages failed:\n%s", traceback.format_exc())
                self._fail(request, e)
            self._pending_imports.popleft()

    def _import(self, request: Request, meta: dict, arrays: list) -> bool:
        """(engine thread) Write a context's pages into fresh pages and continue from its first token.
        The pages are checked against this LLM's layout before any is taken; a failure after that
        gives them back before it propagates."""
        n = meta["num_tokens"]  # KV positions: a prompt adapter's virtual tokens, then the prompt
        bm, admission = self.block_manager, self.scheduler.admission
        seed = request.params.seed if request.params.seed is not None else int(meta["seed"])
        seq = self._new_sequence(request, 0, seed)  # (a retry makes a new one: sequence ids need not be dense)
        if seq.num_prompt_tokens != n:
            raise kv_transfer.KVTransferError(f"the context holds {n} KV positions, this request's prompt and "
                                              f"prompt adapter make {seq.num_prompt_tokens}")  # fmt: skip
        self.transfer.layout.check_pages(arrays, n)
        if not bm.can_allocate(bm.blocks_needed(seq, n + 1)):
            return False
        if admission is not None and not admission.admit(seq):  # its adapters need device slots
            return False
        try:
            bm.allocate(seq, n)
            num_pages = len(seq.block_table)
            # Lay the pages out where they are: on the host for TCP arrays, on the context's device otherwise.
            xp = np if isinstance(arrays[0], np.ndarray) else jax.numpy
            values = [kv_transfer.from_portable(a, self.transfer.plan, bm.block_size, num_pages, xp=xp) for a in arrays]
            self.runner.scatter_pages(seq.block_table, values, seq.token_ids[:n])
        except BaseException:
            self.scheduler.remove(seq)  # in no queue yet: gives back its pages and adapter slots
            raise
        seq.num_computed = n
        bm.register_computed(seq)  # the imported prompt pages are reusable like computed ones
        if self.detokenizer is not None:
            self.detokenizer.start(seq)
        request.sequences.append(seq)
        self.requests[request.request_id] = request
        request.first_scheduled_time = time.monotonic()
        self._append_token(seq, int(meta["first_token"]), float(meta["first_logprob"]), meta["first_rank"])
        if not seq.finished:
            self.scheduler.add_running(seq)
        self._publish({request})
        return True

    # ---- publishing ----------------------------------------------------------------------------
    def _delta(self, seq: Sequence, final: bool) -> Delta:
        params = seq.request.params
        new_tokens = seq.output_token_ids[seq.num_published_tokens :]
        logprobs, gen_logits = seq.logprobs, seq.generation_logits
        first = seq.num_published_tokens == 0
        prefix_ids = list(seq.request.prompt_token_ids) if (first and not params.exclude_input_from_output) else []
        text = None
        if params.detokenize and self.detokenizer is not None:
            text = seq.text
            if not params.exclude_input_from_output:
                text = self._prompt_text(seq.request) + text
        delta = Delta(
            index=seq.index,
            token_ids=tuple(prefix_ids + new_tokens),
            text=text,
            logprobs=tuple(logprobs[seq.num_published_tokens :]) if logprobs is not None else (),
            cumulative_logprob=seq.cumulative_logprob if new_tokens else None,
            finish_reason=seq.finish_reason if final else None,
            stop_reason=seq.stop_reason if final else None,
            generation_logits=np.stack(gen_logits[seq.num_published_tokens :]) if gen_logits and new_tokens else None,
            prompt_logprobs=self._prompt_logprobs_out(seq.request) if first else None,
            perf_metrics=self._perf_metrics(seq.request) if final and params.return_perf_metrics else None,
            disaggregated_params=seq.request.disaggregated_result if final else None,
        )
        seq.num_published_tokens = seq.num_output_tokens
        return delta

    @staticmethod
    def _perf_metrics(request: Request) -> dict:
        return {"timing_metrics": {"arrival_time": request.arrival_time,
                                   "first_scheduled_time": request.first_scheduled_time,
                                   "first_token_time": request.first_token_time,
                                   "last_token_time": request.last_token_time}}  # fmt: skip

    def _prompt_text(self, request: Request) -> str:
        if request.prompt is not None:
            return request.prompt
        return self.detokenizer.decode(request.prompt_token_ids, True, True)

    def _prompt_logprobs_out(self, request: Request):
        if request.params.prompt_logprobs is None:
            return None
        return [None] + list(request.prompt_logprobs)

    def _publish(self, touched: set) -> None:
        for request in touched:
            if request.request_id not in self.requests:
                continue
            done = request.finished
            if not done and not request.output.streaming:
                continue
            deltas = tuple(self._delta(seq, final=done) for seq in request.sequences)
            context_logits = None
            if done and request.context_logits_rows:
                context_logits = np.concatenate(request.context_logits_rows)[: len(request.prompt_token_ids)]
            drop = None
            if done and request.params.best_of > request.params.n:
                order = sorted(range(len(request.sequences)), key=lambda k: -request.sequences[k].cumulative_logprob)
                drop = tuple(sorted(order[: request.params.n]))
            update = Update(deltas, finished=done, context_logits=context_logits, drop_indices=drop)
            if done:
                self._close(request, update)
            else:
                request.output._post(update)

    def _record_stats(self, scheduled: ScheduledStep, ctx: list, started: float, decoded: float) -> None:
        """One iteration's stats; `ctx`: the (sequence, tokens) items that were prefill chunks;
        `decoded`: tokens each generation request took on average (more than 1 in a multi-step decode)."""
        self._iteration += 1
        active = len(self.scheduler.running)
        self.max_active = max(self.max_active, active)
        bm = self.block_manager
        try:
            mem = jax.local_devices()[0].memory_stats() or {}
        except Exception:
            mem = {}
        import resource

        stats = {
            "iter": self._iteration,
            "iterLatencyMS": (time.perf_counter() - started) * 1e3,
            "gpuMemUsage": int(mem.get("bytes_in_use", 0)),
            "cpuMemUsage": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "numActiveRequests": len({s.request.request_id for s in self.scheduler.running}),
            "numQueuedRequests": len({s.request.request_id for s in self.scheduler.waiting}),
            "maxNumActiveRequests": self.scheduler.config.max_batch_size,
            "numCompletedRequests": 0,
            "kvCacheStats": {
                "maxNumBlocks": bm.num_usable_blocks,
                "freeNumBlocks": bm.num_free_blocks,
                "usedNumBlocks": bm.num_used_blocks,
                "tokensPerBlock": bm.block_size,
                "allocTotalBlocks": bm.num_new + bm.num_reused,
                "allocNewBlocks": bm.num_new,
                "reusedBlocks": bm.num_reused,
                "missedBlocks": bm.num_missed,
                "cacheHitRate": bm.hit_rate,
            },
            "inflightBatchingStats": {
                "numScheduledRequests": len(scheduled.items),
                "numContextRequests": len(ctx),
                "numGenRequests": len(scheduled.items) - len(ctx),
                "numCtxTokens": sum(n for _, n in ctx),
                "numPausedRequests": len(scheduled.preempted),
                "microBatchId": 0,
                "avgNumDecodedTokensPerIter": decoded,
            },
        }
        with self._stats_lock:
            self._stats.append(stats)
