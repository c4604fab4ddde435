"""The engine: one background thread that owns the device, the KV cache and every request's state.

Callers (any thread, or asyncio code through the futures) hand requests in through a queue (the
inbox); the thread admits them between steps, and each step reads

    schedule (scheduler.py) -> dispatch (runner.py) -> postprocess -> publish (postprocess.py)

with iteration statistics recorded in between (stats.py). Multi-step decoding and the overlap
scheduler's follow-ons are the scheduler's decisions, dispatched here; disaggregated serving's
parked contexts and imports live in disaggregated.py. Faults stay contained: a logits processor
that raises fails its own request only (logits_processors.py); an error of the model step fails
the requests of that step, not the loop (their futures raise, the KV cache is rebuilt, and the
other running requests are recomputed). Aborts land at once, even while a step runs on the
device: the engine thread waits for a step's outputs on its wake event while a reader thread
(`StepReader`, step_reader.py) reads them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import gc
import logging
import os
import queue
import random
import threading
import time
import traceback
from typing import Any

from jaxllm.engine import kv_state, kv_transfer
from jaxllm.engine.beam_search import BeamSearch
from jaxllm.engine.block_manager import BlockManager
from jaxllm.engine.decode_cap import DecodeCap
from jaxllm.engine.detokenizer import Detokenizer
from jaxllm.engine.disaggregated import Disaggregation
from jaxllm.engine.logits_processors import apply_logits_processors
from jaxllm.engine.postprocess import EngineShutdown, Postprocessor
from jaxllm.engine.runner import ModelRunner, PendingStep
from jaxllm.engine.step_inputs import StepRequest
from jaxllm.engine.scheduler import ScheduledStep, Scheduler
from jaxllm.engine.sequence import Request, Sequence
from jaxllm.engine.stats import IterationStats
from jaxllm.engine.step_reader import StepReader
from jaxllm.engine.step_trace import StepRecord, StepTrace, step_kind
from jaxllm.engine.step_request import step_request, verify_rows
from jaxllm.outputs import Update
from jaxllm.speculative import Speculation, eligible

__all__ = ["Engine", "EngineShutdown", "StepReader", "derive_seed"]

logger = logging.getLogger(__name__)


def derive_seed(base: int, index: int) -> int:
    """Seed of sample `index` of a request seeded with `base` (sample 0 uses `base` itself)."""
    if index == 0:
        return base
    x = (base + 0x9E3779B97F4A7C15 * index) & 0xFFFFFFFFFFFFFFFF  # splitmix64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


@contextlib.contextmanager
def _gc_threshold(gen0: int | None):
    """Python's gc generation-0 threshold set to `gen0` inside (None: unchanged), restored after."""
    if gen0 is None:
        yield
        return
    before = gc.get_threshold()
    gc.set_threshold(gen0, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


@dataclasses.dataclass
class Plan:
    """What one step runs: the scheduled items, how they are dispatched, and (once dispatched and
    advanced, `Engine._advance`) what its read needs to settle the sequences."""

    scheduled: ScheduledStep
    steps: int  # decodes per row in the dispatch (more than 1: multi-step decoding)
    requests: list[StepRequest]  # the rows
    context: list[tuple[Sequence, int]]  # prefill chunks (for the stats)
    pending: PendingStep | None = None  # its dispatch, until read
    starts: list[int] = dataclasses.field(default_factory=list)  # each row's num_computed before it
    before: list[int] = dataclasses.field(default_factory=list)  # each row's token count before it (stats)
    unfinished: set = dataclasses.field(default_factory=set)  # its requests not finished before it (stats)
    ahead_of_read: bool = False  # scheduled and dispatched before the last step was read
    queue: tuple = ((), ())  # the scheduler's (running, waiting) sequences right after it was scheduled (stats)
    guided_rows: list = dataclasses.field(default_factory=list)  # (row, sequence): bitmasks pending (_sample_guided)


class Engine:
    """The engine thread and what callers call on it (`submit`, `abort`, `stats`, `shutdown`).

    Args:
      runner: the device side: KV cache, programs, dispatch (runner.py).
      scheduler: admission, chunking, preemption and every page move (scheduler.py).
      tokenizer: None: no text (token ids only).
      max_seq_len: a sequence's most tokens, prompt included.
      vocab_size: the model's; a prompt adapter's virtual tokens take ids from here on.
      transfer: disaggregated serving's settings (None: this LLM parks and imports nothing).
      overlap: the overlap scheduler: schedule and dispatch each step before the last one's tokens
        are read, where that needs nothing from them on the host (`_may_run_ahead`).
      stats: where iteration statistics go (None: the defaults, no per-request statistics).
      stream_interval: streaming requests are updated every this many tokens (postprocess.py).
      print_iter_log: log one line per iteration (INFO).
      gc_gen0_threshold: Python's gc generation-0 threshold while the engine thread runs (None:
        unchanged), as TensorRT-LLM's garbage_collection_gen0_threshold: fewer collections of the
        engine's many short-lived objects.
    """

    # What a caller racing the LLM's shutdown may still touch once builder.dismantle has emptied the
    # rest: a submit raises EngineShutdown, an abort is a no-op.
    SURVIVES_SHUTDOWN = ("_intake_lock", "_stop", "_inbox", "_wake", "_aborts")

    def __init__(self, runner: ModelRunner, scheduler: Scheduler, tokenizer, max_seq_len: int, vocab_size: int,
                 transfer: kv_state.TransferSettings | None = None, overlap: bool = True,
                 stats: IterationStats | None = None, stream_interval: int = 1, print_iter_log: bool = False,
                 gc_gen0_threshold: int | None = None, speculation: Speculation | None = None,
                 decode_cap: DecodeCap | None = None):  # fmt: skip
        self.runner = runner
        # Speculative decoding (jaxllm/speculative.py): drafts given before each step scheduled after a read.
        # A draft model runs every step the target runs, on its tokens: one decode a dispatch, each
        # read before the next is scheduled.
        self.spec = speculation
        if speculation is not None and speculation.model is not None:
            overlap = False
        self.print_iter_log, self.gc_gen0_threshold = print_iter_log, gc_gen0_threshold
        # Multi-step decoding: the most decodes per dispatch (the runner compiles that variant; 1 turns it off here).
        self.decode_steps = runner.config.decode_steps if speculation is None or speculation.model is None else 1
        # The overlap scheduler: each step is scheduled and dispatched while the last one runs
        # (`_run_ahead`); the step in flight, not yet advanced or read, is the next one's.
        self.overlap = overlap
        # Decodes at the bucket below when no waiting request can be admitted (engine/decode_cap.py; None: off).
        self.decode_cap = decode_cap
        self._inflight: Plan | None = None
        self._no_run_ahead = False  # the last step scheduled ahead left a sequence out: the next one waits
        self.num_follow_ons = 0  # steps the overlap scheduler dispatched ahead of the last one's read
        self.scheduler = scheduler
        self.block_manager: BlockManager = scheduler.block_manager  # read-only here: the scheduler moves pages
        self.tokenizer = tokenizer
        self.detokenizer = Detokenizer(tokenizer) if tokenizer is not None else None
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        # The LLM's batched_logits_processor (engine/logits_processors.py), set by LLM() when given.
        self.batched_logits_processor = None
        self.post = Postprocessor(scheduler, self.detokenizer, max_seq_len, park=self._park,
                                  stream_interval=stream_interval, new_sequence=self._new_sequence,
                                  speculation=speculation)  # fmt: skip
        self.requests: dict[int, Request] = self.post.requests  # the requests in the engine, by request_id
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        # Held while something enters the inbox and while shutdown stops the engine: nothing enters it
        # after shutdown has drained it (a request put there then would never be answered).
        self._intake_lock = threading.Lock()
        # Aborts have their own queue: the engine thread takes them between steps and while a step
        # runs (`_read`), when the other messages wait for the step's end.
        self._aborts: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._stats = stats if stats is not None else IterationStats()
        self._trace: StepTrace | None = None  # trace_steps(): a record of every step (engine/step_trace.py)
        self._waited = 0.0  # seconds the current step waited for the devices' results
        self._dispatching = 0.0  # seconds the current step spent in the runner's dispatch calls
        self._next_seq_id = 0
        self._seed_rng = random.Random(int.from_bytes(os.urandom(8), "little"))
        # Disaggregated serving: contexts parked for other LLMs, and imports awaiting pages.
        self.transfer = transfer
        self.disaggregated = Disaggregation(transfer, runner, scheduler, self.post, self._new_sequence, self.export_kv)
        if transfer is not None:
            kv_transfer.register_local(transfer.llm_id, self)
        self._reader = StepReader(self._wake)
        self._thread = threading.Thread(target=self._loop, name="jaxllm-engine", daemon=True)
        self._thread.start()

    @property
    def parked(self) -> dict[int, kv_state.ParkedContext]:
        return self.disaggregated.parked

    @property
    def _pending_imports(self):
        return self.disaggregated.pending_imports

    @property
    def max_active(self) -> int:
        return self._stats.max_active

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
        stopped = kv_state.KVTransferError("the context LLM has been shut down")
        self._put("export", (ctx_request_id, secret, done), stopped)
        try:
            return done.result(timeout)
        except concurrent.futures.TimeoutError:
            raise kv_state.KVTransferError(f"the context LLM did not hand out context {ctx_request_id} "
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
            self.post.fail(request, EngineShutdown("the LLM was shut down before this request finished"))
        self.requests.clear()
        if self.transfer is not None:
            kv_transfer.unregister_local(self.transfer.llm_id, self)
        self.disaggregated.close()
        self.runner.close()

    def stats(self) -> list[dict]:
        """Iteration stats collected since the last call (TensorRT-LLM's get_stats keys)."""
        return self._stats.take()

    # ---- engine thread: the inbox --------------------------------------------------------------
    def _loop(self) -> None:
        with _gc_threshold(self.gc_gen0_threshold):
            self._serve()

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox()
            self._take_aborts()
            self.disaggregated.expire()
            self.disaggregated.retry_imports()
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
                    self.post.fail(request, e)

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
                self.disaggregated.pending_imports.append(item)
            elif kind == "export":
                ctx_request_id, secret, done = item
                try:
                    if stopping:
                        raise kv_state.KVTransferError("the context LLM has been shut down")
                    done.set_result(self.disaggregated.export(ctx_request_id, secret))
                except Exception as e:
                    done.set_exception(e)

    def _add(self, request: Request) -> None:
        params = request.params
        base_seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
        if params.use_beam_search:  # one beam at first; each step forks the next ones (postprocess.py)
            request.beam = BeamSearch(params.best_of, params.n, params.length_penalty or 0.0,
                                      params.beam_early_stopping, params.beam_search_diversity_rate or 0.0,
                                      min(params.max_tokens, self.max_seq_len - len(request.prompt_token_ids)),
                                      request.stop_token_ids)  # fmt: skip
        for index in range(1 if params.use_beam_search else params.best_of):
            seq = self._new_sequence(request, index, derive_seed(base_seed, index))
            if request.guide_grammar is not None:
                seq.guide = request.guided_decoder.matcher(request.guide_grammar)
            if self.detokenizer is not None:
                self.detokenizer.start(seq)
            request.sequences.append(seq)
        # Parallel samples wait until sample 0 has computed the prompt, then share its full pages.
        self.scheduler.add(request.sequences[0])
        self.requests[request.request_id] = request
        if request.output.aborted():  # its abort was taken while a step ran, before this arrived
            self.post.abort(request.request_id)

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

    def _park(self, seq: Sequence) -> None:
        """A finished context_only sequence keeps its pages for another LLM (disaggregated.py)."""
        self.disaggregated.park(seq)

    def _take_aborts(self) -> None:
        while True:
            try:
                request_id = self._aborts.get_nowait()
            except queue.Empty:
                return
            self.post.abort(request_id)

    def _arrived(self) -> bool:
        """Whether a request arrived since the schedule (queued, or a generation_only one awaiting
        pages): a multi-step dispatch would make it wait for its whole run."""
        return not self._inbox.empty() or bool(self.disaggregated.pending_imports)

    # ---- one step: schedule -> dispatch -> postprocess -> publish ------------------------------
    def step(self) -> None:
        """One iteration: schedule -> dispatch -> (the next step scheduled and dispatched ahead) ->
        read -> postprocess -> (stats) -> publish."""
        started = time.perf_counter()
        plan, self._inflight = self._inflight, None
        self._waited = self._dispatching = 0.0
        if plan is None:
            plan = self._schedule()
            if plan is None:
                self._wake.wait(0.01)
                return
            if not self._start(plan):
                return
        self._advance(plan)
        if self.overlap and self._may_run_ahead(plan):
            ahead = self._run_ahead(plan)
            if ahead is False:
                return  # its dispatch failed: both steps' requests failed
            self._inflight = ahead
        try:
            out = self._read(plan.pending)
        except Exception as e:
            self._step_failed([plan, self._inflight], e)
            return
        self._settle(plan)
        if self.spec is not None:
            self.spec.reset_counts()
        if plan.steps == 1:
            apply_logits_processors(plan.scheduled, plan.requests, out, self.runner.resample, self.post.left,
                                    self.post.fail, self.batched_logits_processor)  # fmt: skip
        touched = self.post.postprocess(plan.scheduled, plan.requests, out, plan.steps)
        shape = plan.pending.shape
        if self.decode_cap is not None and shape is not None and not plan.context and plan.scheduled.verifying is None:
            self.decode_cap.observe(shape.num_seqs, plan.steps, time.perf_counter() - started)
        if self._inflight is not None and self._inflight.guided_rows:
            self._sample_guided(self._inflight)
        # Before the outputs: a caller woken by them sees them (and their perf metrics' iterations).
        self._stats.record(self.scheduler, plan.scheduled, plan.context, plan.steps, plan.before, plan.unfinished,
                           started, plan.queue, self.spec.stats() if self.spec is not None else None)  # fmt: skip
        if self._trace is not None or self.print_iter_log:
            prefilling = {seq for seq, _ in plan.context}
            decoding = [(seq, n) for (seq, _), n in zip(plan.scheduled.items, plan.before) if seq not in prefilling]
            if self._trace is not None:
                decoded = sum(max(0, len(seq.token_ids) - n) for seq, n in decoding)
                self._trace.add(self._step_record(plan, started, len(decoding), decoded))
            if self.print_iter_log:
                self._log_iteration(plan, started, len(decoding))
        self.post.publish(touched)

    def trace_steps(self, on: bool = True) -> list[StepRecord]:
        """Start (or with on=False stop) recording every step (engine/step_trace.py); returns the
        records taken since the last call."""
        trace, self._trace = self._trace, (StepTrace() if on else None)
        return trace.take() if trace is not None else []

    def _step_record(self, plan: Plan, started: float, num_decoding: int, decoded: int) -> StepRecord:
        """The trace's record of the step of `plan` (begun at `started`; `decoded` tokens appended to
        its `num_decoding` decoding sequences)."""
        pending = plan.pending
        shape, steps = pending.shape, pending.decode_steps
        prompt = sum(n for _, n in plan.context)
        return StepRecord(
            kind=step_kind(prompt, num_decoding, steps), ahead=plan.ahead_of_read,
            decode_steps=steps, seqs=pending.num_requests, padded_seqs=shape.num_seqs if shape else 0,
            tokens=prompt + decoded, row_tokens=steps * pending.num_tokens,
            padded_tokens=steps * shape.num_tokens if shape else 0, prompt_tokens=prompt,
            wall_s=time.perf_counter() - started, wait_s=self._waited, dispatch_s=self._dispatching,
        )  # fmt: skip

    def _log_iteration(self, plan: Plan, started: float, num_decoding: int) -> None:
        """One line for the iteration just run (print_iter_log)."""
        logger.info("iter %d: %.2f ms, %d scheduled (%d context, %d tokens; %d generation), %d decodes a row, "
                    "%d running, %d waiting, %d preempted, %d/%d KV pages free", self._stats.iteration,
                    (time.perf_counter() - started) * 1e3, len(plan.scheduled.items), len(plan.context),
                    sum(n for _, n in plan.context), num_decoding, plan.steps, len(self.scheduler.running),
                    len(self.scheduler.waiting), len(plan.scheduled.preempted), self.block_manager.num_free_blocks,
                    self.block_manager.num_usable_blocks)  # fmt: skip

    def _schedule(self, ahead: bool = False) -> Plan | None:
        """The scheduler's next step (None when nothing can run); `ahead`: while the last step is
        in flight, not read (the overlap scheduler)."""
        if self.spec is not None and not ahead:
            self.spec.propose(self.scheduler.running, self.max_seq_len, self.scheduler.reserve)
        cap = self.decode_cap.rows if self.decode_cap is not None and not self._arrived() else None
        scheduled = self.scheduler.schedule(ahead, cap)
        if scheduled.starved:
            self._no_run_ahead = True
        if not scheduled.items:
            return None
        # For the stats, before the step moves them on: the prefill chunks.
        context = [(seq, n) for seq, n in scheduled.items if seq.num_computed < seq.num_prompt_tokens]
        # Made once, before multi_steps gives a multi-step decode its pages: each row's block table
        # is its sequence's own list, so the pages given then are in it when the step is packed.
        # A sequence verifying drafts takes a row per token (speculative.py).
        requests, guided_rows = [], []
        for seq, n in scheduled.items:
            if seq.num_draft:
                requests.extend(verify_rows(seq, n))
            else:
                # Ahead of the last step's read, a grammar has not seen that step's token yet: the
                # row's bitmask is filled after the read, and the step's sampler dispatched then.
                requests.append(step_request(seq, n, defer_bitmask=ahead))
                if requests[-1].bitmask_pending:
                    guided_rows.append((len(requests) - 1, seq))
        if len(requests) > len(scheduled.items):
            scheduled.verifying = [seq.num_draft > 0 for seq, _ in scheduled.items]
        steps = self.scheduler.multi_steps(
            scheduled, self.decode_steps, self.max_seq_len, self._arrived(),
            serves=lambda: self.runner.multi_step_serves(requests),
        )  # fmt: skip
        for seq, _ in scheduled.items:
            if seq.request.first_scheduled_time is None:
                seq.request.first_scheduled_time = time.monotonic()
        queue = (list(self.scheduler.running), list(self.scheduler.waiting))
        return Plan(scheduled, steps, requests, context, queue=queue, guided_rows=guided_rows)

    def _start(self, plan: Plan, after: Plan | None = None) -> bool:
        """Dispatch `plan` (its input tokens read from `after`'s samples where its rows say so);
        False: it failed, and its requests (and `after`'s) with it."""
        dispatching = time.perf_counter()
        try:
            plan.pending = self.runner.dispatch(plan.requests, plan.steps, after.pending if after else None)
            self._dispatching += time.perf_counter() - dispatching
            if self.spec is not None and self.spec.model is not None:
                self.spec.model.follow(plan.requests, plan.steps)
        except Exception as e:
            self._step_failed([after, plan], e)
            return False
        return True

    def _advance(self, plan: Plan) -> None:
        """Move the dispatched step's sequences on as if it had been read: each row's chunk is
        computed, and a row that samples holds placeholders for its samples (`Sequence.take_ahead`),
        so the next step can be scheduled before the read (`_run_ahead`); `_settle` undoes this
        before the read's results are taken in."""
        items = plan.scheduled.items
        plan.before = [len(seq.token_ids) - seq.num_draft for seq, _ in items]
        plan.unfinished = {seq.request for seq, _ in items if not seq.request.finished}
        plan.starts = [seq.num_computed for seq, _ in items]
        for row, (seq, n) in enumerate(items):
            if seq.finished:  # left, or stopped in the step before this one (which this one ran ahead of)
                continue
            if plan.steps == 1:
                seq.num_computed += n
                if seq.num_computed == seq.num_tokens:
                    seq.take_ahead(row, 1, self.max_seq_len)
            else:  # positions p .. p + k - 1 computed, samples p + 1 .. p + k
                k = min(plan.steps, seq.tokens_left(self.max_seq_len))
                seq.num_computed += k
                seq.take_ahead(row, k, self.max_seq_len)

    def _sample_guided(self, plan: Plan) -> None:
        """Fill the pending bitmasks of `plan` (dispatched ahead of the step just read, whose tokens
        its grammars have now taken) and dispatch its sampler: the host's grammar work runs while
        the device computes the step's forward. A sequence that ended in the step just read keeps
        every token allowed (its row is dropped when read)."""
        live = [(row, seq) for row, seq in plan.guided_rows if not seq.finished and seq.guide is not None]
        if live:  # (one GuidedDecoder an LLM: every row's)
            masks = live[0][1].request.guided_decoder.bitmasks([seq.guide for _, seq in live])
            for (row, _), mask in zip(live, masks):
                plan.requests[row].token_bitmask = mask
        for row, _ in plan.guided_rows:
            plan.requests[row].bitmask_pending = False
        plan.guided_rows = []
        try:
            self.runner.sample(plan.pending, plan.requests)
        except Exception as e:
            self._inflight = None
            self._step_failed([plan], e)

    def _settle(self, plan: Plan) -> None:
        """Undo `_advance` on the read step's sequences still running: its results are taken in
        (postprocess.py) from where they were before it."""
        for (seq, _), start in zip(plan.scheduled.items, plan.starts):
            if not seq.finished:
                seq.drop_ahead()
                seq.num_computed = start

    def _may_run_ahead(self, plan: Plan) -> bool:
        """Whether the next step may be scheduled before `plan` (dispatched, advanced) is read: no
        row of it needs the host between the two (logits processors, banned multi-token words, a
        logits or prompt log-probabilities returned, beam search, adapters, drafts to make
        while speculative decoding is on: jaxllm/speculative.py), and the last
        step scheduled ahead left no sequence out (then this one preempts as it must)."""
        if self._no_run_ahead:
            self._no_run_ahead = False
            return False
        if self.runner.adapters is not None or self.batched_logits_processor is not None:
            return False
        spec_on = self.spec is not None and self.spec.active(len(self.scheduler.running))
        for seq, _ in plan.scheduled.items:
            if seq.finished:
                continue
            if spec_on and eligible(seq, False):  # its next drafts need this step's tokens
                return False
            request, params = seq.request, seq.request.params
            if params.wants_logits or request.bad_word_ids or request.needs_prompt_logits or request.beam is not None:
                return False
        return True

    def _run_ahead(self, plan: Plan) -> Plan | None | bool:
        """The overlap scheduler: schedule and dispatch the next step while `plan` runs, its rows'
        input tokens that `plan` samples read from its samples on the device. A sequence that stops
        on an EOS or stop string in `plan` has its row of the next step dropped when read (its
        pages are freed at the stop; whatever gets them next runs after it on the devices, the KV
        cache threading through every dispatch). Returns the step in flight, None when nothing
        could be scheduled, False when its dispatch failed."""
        nxt = self._schedule(ahead=True)
        if nxt is None:
            return None
        if not self._start(nxt, after=plan):
            return False
        nxt.ahead_of_read = True
        self.num_follow_ons += 1
        return nxt

    def _step_failed(self, plans: list[Plan | None], error: Exception) -> None:
        """A model step raised: the requests of `plans` (the step, and the one dispatched ahead of
        its read) fail, and the KV cache is rebuilt, so every page's K/V is lost (parked contexts'
        and cached pages' too); the other running sequences are recomputed."""
        logger.error("model step failed:\n%s", traceback.format_exc())
        self._inflight = None
        failed = {seq.request for plan in plans if plan for seq, _ in plan.scheduled.items if not seq.finished}
        for request in failed:
            self.post.fail(request, error)
        for seq in self.scheduler.running:  # (none holds placeholders: they were the failed steps')
            seq.drop_ahead()
        self.runner.reset_cache()
        if self.spec is not None and self.spec.model is not None:
            self.spec.model.reset()
        self.disaggregated.release_all()
        self.scheduler.drop_all_pages()

    def _read(self, pending: PendingStep) -> dict:
        """`pending`'s host outputs. Aborts that arrive while it runs land now: their requests
        resolve with the tokens they have, and the step's rows of them are dropped when read."""
        waiting = time.perf_counter()
        done = self._reader.read(pending)
        while not done.done():
            self._wake.wait()
            self._wake.clear()  # (a submit's wake too: `_loop` drains the inbox before it sleeps)
            self._take_aborts()
        self._waited += time.perf_counter() - waiting
        return done.result()
