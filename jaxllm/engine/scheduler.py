"""Continuous batching: which prefill chunks and decodes run in the next step (plain Python).

Each step has a token budget (`max_num_tokens`) and a sequence budget (`max_batch_size`).
Running sequences go first, in priority order (`SchedulingParams.priority`, highest first; earlier
admitted first among equals): a decode costs one token, an unfinished prefill takes what the budget
leaves (chunked prefill). Then waiting sequences are admitted while the budget and free pages
allow: parallel samples that already share their prompt's pages first, then highest priority
first, first-come-first-served among equals. The queue is strict: a waiting sequence that does not
fit holds back those behind it. Without chunked prefill a prompt is admitted only when all of it
fits in one step (a longer prompt is refused at submission, jaxllm/inputs.py); only a sequence
longer than max_num_tokens, a preempted one whose prompt and output are recomputed, is still
computed in chunks, since no step could hold it. A sequence admitted without pages first takes the
cached pages of its prefix (block reuse), and computes only the rest.

When a running sequence needs a page and none is free, the lowest-priority running sequence is
preempted (the most recently admitted among equals): its pages are freed (its full pages stay
cached, so its return may reuse them) and it goes back to the queue, where it keeps its original
place among its priority, to be recomputed from its tokens later (its generated tokens are kept,
so its output is unchanged). A step that preempts admits nothing.

The capacity policy (TensorRT-LLM's names) decides admission: MAX_UTILIZATION (jaxllm's default)
admits while this step's pages fit, as above, and while the pages every sequence will surely still
take fit (`SureGrowth`: a request nothing can end before max_tokens, ignore_eos without stops, takes
pages up to its end and then gives them back; any other, up to its min_tokens), so that requests of
known length are not admitted only to be preempted and recomputed when the cache fills;
GUARANTEED_NO_EVICT admits a sequence only when the pages of its whole length (prompt plus
max_tokens, up to max_seq_len) fit beside those every running sequence may still take, so running
sequences never run out of pages (fewer run at once);
STATIC_BATCH admits only when nothing runs, so a batch starts and finishes together (parallel
samples of a running request still join it).
The waiting-queue policy 'fcfs' (TensorRT-LLM's default) ignores request priorities: every
order above is then the order of arrival.
With chunked prefill, the EQUAL_PROGRESS chunking policy has the prompts being computed share a
step's token budget a page at a time, in rounds (first come, first served takes them in turn, each
as much as the budget leaves), so that prompts arriving together progress together.

The scheduler is the only user of the BlockManager: the engine's other page moves (a computed
chunk registered in the prefix cache, parallel samples sharing their prompt's pages, the pages of
a multi-step decode, an imported context's pages) go through the methods below.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import sys

from typing import Callable

import numpy as np

from jaxllm.engine.block_manager import BlockManager
from jaxllm.engine.sequence import Sequence, SequenceStatus


# Under a decode cap (engine/decode_cap.py) a sequence left out of this many steps in a row runs in the
# next one. Otherwise those with the most tokens still to come run first: the longest requests of a
# draining batch end it, and holding them back lengthens its tail (the 1,000-request ShareGPT-like
# mix on an H100, the decodes replayed with the measured costs of each bucket: 14.4 s without a cap,
# 13.9 s capped by least recently run, 12.5 s by most tokens to come; benchmarks/RESULTS.md).
CAP_MAX_SKIPS = 1

# Whether MAX_UTILIZATION admits only what the pages of every sequence's sure growth leave room for
# (SureGrowth); tests that need preemption with requests of known length switch it off.
PROJECT_SURE_GROWTH = True


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_tokens: int
    max_batch_size: int
    enable_chunked_prefill: bool = True
    capacity_policy: str = "MAX_UTILIZATION"  # or "GUARANTEED_NO_EVICT", "STATIC_BATCH"
    max_seq_len: int | None = None  # a sequence's most tokens (GUARANTEED_NO_EVICT's reservations)
    priorities: bool = True  # False (the 'fcfs' waiting-queue policy): SchedulingParams.priority is ignored
    equal_progress: bool = False  # prompts share a step's budget page by page (EQUAL_PROGRESS chunking)


@dataclasses.dataclass
class ScheduledStep:
    items: list[tuple[Sequence, int]]  # (sequence, tokens it computes this step), running order
    preempted: list[Sequence]
    starved: bool = False  # (scheduled ahead) a running sequence's pages did not fit: it was left out
    # Speculative decoding: per item, whether it verifies drafts (its n tokens then take n rows of
    # one token each); None when none does.
    verifying: list[bool] | None = None

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 and s.num_computed + 1 == s.num_tokens for s, n in self.items)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, admission=None):
        self.config = config
        self.block_manager = block_manager
        # Optional gate (engine/adapter_slots.py): admit(seq) -> False keeps a sequence waiting
        # (its adapters have no device slot yet); release(seq) when it stops running.
        self.admission = admission
        self.waiting: list[Sequence] = []  # admission order: by queue_key
        self.running: list[Sequence] = []  # scheduling order: priority, then admission; victims from the end
        self.num_growing = 0  # running sequences that may grow surely (SureGrowth is gathered only then)
        self.num_steps = 0  # steps scheduled (Sequence.last_step's clock)
        self._arrivals = itertools.count()

    def priority(self, seq: Sequence) -> float:
        """`seq`'s request priority, or one for all under the 'fcfs' waiting-queue policy."""
        return seq.request.priority if self.config.priorities else 0.0

    def queue_key(self, seq: Sequence) -> tuple:
        """Waiting order: sequences that hold pages (parallel samples sharing their prompt's pages)
        first, as the rest of a request already running; then higher priority first, then the
        request's arrival, then the sample index. A page holder behind a sequence that cannot get
        pages could otherwise hold them for ever."""
        return not seq.block_table, -self.priority(seq), seq.request.arrival_order, seq.index

    def _stamp_arrival(self, seq: Sequence) -> None:
        """Number a request the first time any of its sequences reaches the scheduler (the FCFS tie-break)."""
        if seq.request.arrival_order is None:
            seq.request.arrival_order = next(self._arrivals)

    def add(self, seq: Sequence) -> None:
        """Queue a sequence (new, a parallel sample, or preempted) at its place in the waiting order."""
        self._stamp_arrival(seq)
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=self.queue_key)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence (finished or aborted) and free its pages."""
        seq.drop_drafts()
        if seq in self.running:
            self._stop_running(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        if self.admission is not None:
            self.admission.release(seq)

    def detach(self, seq: Sequence) -> None:
        """Drop a finished sequence from the running set but leave it its pages (a parked context)."""
        self._stop_running(seq)

    def add_running(self, seq: Sequence) -> None:
        """Run a sequence that already holds pages for all its computed tokens (an imported context)."""
        self._stamp_arrival(seq)
        self._start_running(seq)

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's pages and requeue it, to be recomputed."""
        seq.drop_drafts()
        self._stop_running(seq)
        self.block_manager.free(seq)
        if self.admission is not None:
            self.admission.release(seq)
        seq.num_preemptions += 1
        self.add(seq)

    def drop_all_pages(self) -> None:
        """The KV cache was lost (rebuilt after a failed step): every sequence gives back its pages
        (running ones are preempted; waiting samples drop the prompt pages they share) and every
        cached page is forgotten."""
        for seq in list(self.running):
            self.preempt(seq)
        for seq in self.waiting:
            if seq.block_table:
                self.block_manager.free(seq)
        self.waiting.sort(key=self.queue_key)  # their keys changed with their pages
        self.block_manager.clear_cache()

    def _start_running(self, seq: Sequence) -> None:
        """Insert a newly admitted sequence after every running one of its priority or higher."""
        seq.status = SequenceStatus.RUNNING
        at = bisect.bisect_right(self.running, -self.priority(seq), key=lambda s: -self.priority(s))
        self.running.insert(at, seq)
        self.num_growing += self.may_grow(seq)

    def _stop_running(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.num_growing -= self.may_grow(seq)

    def schedule(self, ahead: bool = False, cap: Callable[[int], int] | None = None) -> ScheduledStep:
        """The next step. `ahead` (the overlap scheduler, before the step in flight is read): a
        running sequence whose last token surely ends it is left out, and one whose pages do not
        fit is left out too (`starved`: nothing is admitted then) instead of preempting another,
        whose tokens in flight are not read yet. `cap` (engine/decode_cap.py): when no waiting
        sequence can be admitted (`_admits_none`) and every running sequence decodes, cap(n) of the
        n run (`_capped`)."""
        cfg, bm = self.config, self.block_manager
        budget = cfg.max_num_tokens
        items: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        scheduled: set[int] = set()
        starved = False
        self.num_steps += 1
        chosen = self._capped(cap) if cap is not None and self._admits_none() else None

        # EQUAL_PROGRESS: a page of each prompt first, the rest of the budget in rounds (`_share_rest`).
        unit = bm.block_size if cfg.equal_progress and cfg.enable_chunked_prefill else None

        index = 0
        rows = 0  # the step's rows: one a sequence, and one more per draft token verified
        while index < len(self.running) and budget > 0 and rows < cfg.max_batch_size:
            seq = self.running[index]
            if seq.num_draft:  # speculative decoding: verify the drafts that fit, drop the rest
                keep = min(seq.num_draft, budget - 1, cfg.max_batch_size - rows - 1)
                if keep > 0 and not bm.can_allocate(bm.blocks_needed(seq, 1 + keep)):
                    keep = 0  # drafts never preempt: the step decodes it plainly
                seq.drop_drafts(seq.num_draft - keep)
            want = seq.num_uncomputed
            # (want 0: a beam holding its candidates until its request's other beams have theirs)
            if (want == 0 or seq.ends_ahead or (want > budget and self._in_one_step(want))
                    or (chosen is not None and seq.seq_id not in chosen)):  # fmt: skip
                index += 1
                continue
            n = min(want, budget, unit or want)
            if seq.num_draft >= n:  # (EQUAL_PROGRESS's unit): verify the drafts of its n rows only
                seq.drop_drafts(seq.num_draft - (n - 1))
            if not bm.holds(seq, n):  # it needs pages this step (most decodes don't)
                if ahead and not bm.can_allocate(bm.blocks_needed(seq, n)):
                    starved = True
                    index += 1
                    continue
                while not bm.can_allocate(bm.blocks_needed(seq, n)):
                    victim = next((s for s in reversed(self.running) if s.seq_id not in scheduled), None)
                    self.preempt(victim)
                    preempted.append(victim)
                    if victim is seq:
                        break
                if seq.status is not SequenceStatus.RUNNING:
                    continue  # preempted itself; the next running sequence now sits at `index`
                bm.allocate(seq, n)
            items.append((seq, n))
            scheduled.add(seq.seq_id)
            seq.last_step = self.num_steps
            budget -= n
            rows += n if seq.num_draft else 1
            index += 1

        static = cfg.capacity_policy == "STATIC_BATCH" and bool(self.running)
        growth = None  # (MAX_UTILIZATION) the running sequences' sure growth, gathered at the first admission
        while self.waiting and budget > 0 and rows < cfg.max_batch_size and not preempted and not starved:
            seq = self.waiting[0]
            if static and not seq.block_table:  # (a parallel sample of a running request holds pages)
                break
            bm.onboard(seq)  # its prefix's pages in the host tier, back on the device
            cached = bm.match_prefix(seq)  # pages of its prefix it can reuse instead of computing
            partial = bm.match_partial(seq, cached)  # and the leading tokens of the next page
            want = seq.num_uncomputed - len(cached) * bm.block_size - (partial[1] if partial else 0)
            if want > budget and self._in_one_step(want):
                break
            n = min(want, budget, unit or want)
            if not bm.can_allocate(bm.blocks_needed(seq, n, cached, partial)):
                break
            if cfg.capacity_policy == "GUARANTEED_NO_EVICT" and not self._fits_to_the_end(seq, want, cached):
                break
            if (cfg.capacity_policy == "MAX_UTILIZATION" and PROJECT_SURE_GROWTH
                    and (self.num_growing or self.may_grow(seq))):  # fmt: skip
                growth = growth or SureGrowth(self)
                if not growth.admits(seq, want, cached, partial):
                    break
            if self.admission is not None and not self.admission.admit(seq):
                break
            self.waiting.pop(0)
            bm.allocate(seq, n, cached, partial)
            self._start_running(seq)
            seq.last_step = self.num_steps
            if growth is not None:
                growth.add(seq)
            items.append((seq, n))
            scheduled.add(seq.seq_id)
            budget -= n
            rows += 1
        if unit is not None:
            self._share_rest(items, budget, unit)
        for seq in self.running:  # drafts of sequences left out of the step
            if seq.num_draft and seq.seq_id not in scheduled:
                seq.drop_drafts()
        return ScheduledStep(items, preempted, starved)

    def _admits_none(self) -> bool:
        """Whether no waiting sequence can be admitted this step: none waits, or the first in the
        queue (which holds back those behind it) needs more pages than are free for its uncomputed
        tokens, its cached prefix aside (a prefix hit may still admit it: the step is then capped
        and mixed, which is correct, only not what the cap is for)."""
        if not self.waiting:
            return True
        bm, head = self.block_manager, self.waiting[0]
        return not bm.can_allocate(bm.blocks_needed(head, min(head.num_uncomputed, self.config.max_num_tokens)))

    def _capped(self, cap: Callable[[int], int]) -> set[int] | None:
        """The seq_ids a capped decode step runs: when every running sequence decodes (one token to
        compute, no drafts, no beams) and cap(n) < n of them would run, cap(n) of them: first those
        left out of the last CAP_MAX_SKIPS steps, then those with the most tokens still to come
        (to max_tokens), then the least recently run, then by the running order; else None."""
        decoding = []
        for seq in self.running:
            if seq.ends_ahead:
                continue
            if seq.num_uncomputed != 1 or seq.num_draft or seq.request.beam is not None:
                return None
            decoding.append(seq)
        n = min(len(decoding), self.config.max_batch_size, self.config.max_num_tokens)
        keep = cap(n) if n else n
        if keep >= n:
            return None

        def turn(i: int) -> tuple:
            seq = decoding[i]
            skipped = self.num_steps - 1 - seq.last_step  # steps since it last ran
            return skipped < CAP_MAX_SKIPS, seq.num_output_tokens - seq.request.params.max_tokens, seq.last_step, i

        order = sorted(range(len(decoding)), key=turn)
        return {decoding[i].seq_id for i in order[:keep]}

    def _share_rest(self, items: list[tuple[Sequence, int]], budget: int, unit: int) -> None:
        """(EQUAL_PROGRESS) Give the scheduled prompts the rest of the step's `budget`, `unit` tokens
        each per round, while their pages fit."""
        bm = self.block_manager
        grew = True
        while budget > 0 and grew:
            grew = False
            for i, (seq, n) in enumerate(items):
                more = min(unit, seq.num_uncomputed - n, budget)
                if more <= 0 or not bm.can_allocate(bm.blocks_needed(seq, n + more)):
                    continue
                bm.allocate(seq, n + more)
                items[i] = (seq, n + more)
                budget -= more
                grew = True

    def _in_one_step(self, num_tokens: int) -> bool:
        """Whether `num_tokens` uncomputed tokens of a sequence must run in one step: without chunked
        prefill, when one step can hold them."""
        return not self.config.enable_chunked_prefill and num_tokens <= self.config.max_num_tokens

    def _fits_to_the_end(self, seq: Sequence, want: int, cached: list[int]) -> bool:
        """(GUARANTEED_NO_EVICT) Whether the pages of `seq`'s whole length (its `want` uncomputed
        tokens and every token it may still sample) fit beside the pages each running sequence may
        still take up to its own end."""
        bm, max_seq_len = self.block_manager, self.config.max_seq_len

        def rest(s: Sequence) -> int:  # tokens `s` may still sample
            return max(0, s.tokens_left(max_seq_len)) if max_seq_len else 0

        reserved = sum(bm.blocks_needed(s, s.num_uncomputed + rest(s)) for s in self.running)
        return bm.can_allocate(reserved + bm.blocks_needed(seq, want + rest(seq), cached))

    @staticmethod
    def may_grow(seq: Sequence) -> bool:
        """Whether `seq` may grow surely (SureGrowth): its request runs to max_tokens or has min_tokens."""
        return seq.request.runs_to_max_tokens or bool(seq.request.params.min_tokens)

    # ---- the engine's other page moves -------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.block_manager.block_size

    def mark_computed(self, seq: Sequence, num_tokens: int) -> None:
        """`seq` computed `num_tokens` more tokens: its full pages join the prefix cache (before a
        finish frees them)."""
        seq.num_computed += num_tokens
        self.block_manager.register_computed(seq)

    def start_siblings(self, first: Sequence) -> None:
        """Queue samples 1..best_of-1 of a request whose prompt sample 0 has just computed; each
        shares the prompt's full pages and recomputes only the partial last page (at least one
        token, for its own first logits)."""
        for sibling in first.request.sequences[1:]:
            if sibling.status is SequenceStatus.WAITING and sibling.num_computed == 0 and not sibling.block_table:
                sibling.num_computed = self.block_manager.share_prefix(first, sibling, first.num_prompt_tokens - 1)
                self.add(sibling)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Queue `child` (beam search: `parent`'s tokens and one more): it shares `parent`'s full
        computed pages (copy-on-write: the partial last page is recomputed into a page of its own)."""
        child.num_computed = self.block_manager.share_prefix(parent, child, parent.num_computed)
        self.add(child)

    def prompt_pages(self, seq: Sequence, num_tokens: int) -> list[int]:
        """The pages of `seq` that hold its first `num_tokens` tokens."""
        return seq.block_table[: -(-num_tokens // self.block_size)]

    def reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Give a running sequence the pages of `num_tokens` tokens from its first uncomputed one
        (a draft model's drafts), if they fit; False: nothing given."""
        bm = self.block_manager
        if not bm.can_allocate(bm.blocks_needed(seq, num_tokens)):
            return False
        bm.allocate(seq, num_tokens)
        return True

    def take_import_pages(self, seq: Sequence, num_tokens: int) -> bool:
        """Give a new sequence (in no queue) pages for the `num_tokens` K/V positions of an imported
        context, if the pages of one more token fit and its adapters get device slots; False: it
        waits. A failure after this gives them back with `remove`."""
        bm = self.block_manager
        if not bm.can_allocate(bm.blocks_needed(seq, num_tokens + 1)):
            return False
        if self.admission is not None and not self.admission.admit(seq):  # its adapters need device slots
            return False
        try:
            bm.allocate(seq, num_tokens)
        except BaseException:
            self.remove(seq)  # gives back its adapter slots
            raise
        return True

    # ---- multi-step decoding -----------------------------------------
    def multi_steps(self, scheduled: ScheduledStep, decode_steps: int, max_seq_len: int, arrived: bool,
                    serves: Callable[[], bool]) -> int:  # fmt: skip
        """How many decodes the scheduled step runs in one dispatch (multi-step decoding):
        `decode_steps` when only decodes are scheduled (so no waiting sequence could be admitted
        this step), no request has `arrived` since the schedule (it would wait for the whole run),
        each sequence has its first token and needs nothing from the host between steps (no
        penalties, banned words or tokens, grammar, logits processors or logits returned), some sequence
        wants at least two more tokens, and the runner `serves` the batch that way; else 1. Gives
        each sequence the pages of the tokens it may still keep (up to max_tokens and
        max_seq_len); past them a row computes into the null page."""
        if decode_steps == 1 or not scheduled.is_decode_only or scheduled.preempted or arrived:
            return 1
        wants = []
        for seq, _ in scheduled.items:
            request = seq.request
            first = request.multi_step_from
            if first is None:
                first = request.multi_step_from = multi_step_from(request)
            if first < 0 or seq.guide is not None or len(seq.token_ids) - seq.num_prompt_tokens < first:
                return 1
            wants.append(min(decode_steps, seq.tokens_left(max_seq_len)))
        if max(wants) < 2 or not serves():
            return 1
        if not self._give_pages(scheduled, wants):
            return 1
        return decode_steps

    def _give_pages(self, scheduled: ScheduledStep, wants: list[int]) -> bool:
        """Give each scheduled sequence the pages of its `wants` more tokens, if all fit."""
        bm = self.block_manager
        needs = [(seq, n) for (seq, _), n in zip(scheduled.items, wants)]
        if not bm.can_allocate(sum(bm.blocks_needed(seq, n) for seq, n in needs)):
            return False
        for seq, n in needs:
            bm.allocate(seq, n)
        return True


def multi_step_from(request) -> int:
    """The output tokens a sequence of `request` must have before a multi-step decode may run it
    (its first token, and min_tokens), or -1 if it never may: it needs the host between decodes
    (logits, penalties, banned words or tokens, beam search, a context-only request's stop).
    Fixed for its life: the scheduler asks once (`Request.multi_step_from`)."""
    params = request.params
    if (params.wants_logits or params.uses_penalties or request.bad_word_ids or request.bias_row is not None
            or request.beam is not None or request.is_context_only):  # fmt: skip
        return -1
    return max(1, params.min_tokens or 0)


class SureGrowth:
    """(MAX_UTILIZATION) The pages the running sequences will surely still take, projected step by
    step: each computes its uncomputed tokens now, then samples a token a step (`_entry`); a
    sequence whose end is sure gives its pages back then, one whose end is unknown keeps them, with
    its sure growth (min_tokens). A waiting sequence is admitted when
    the peak of that projection with it added fits in the free pages. A projection, not a guarantee
    (a sequence left out of a step, or verifying drafts, grows at another rate; pages shared with
    another sequence are not given back at its end): a page that runs out still preempts.

    A sequence of sure end is (steps to its end, pages its uncomputed tokens still need, pages held,
    u): t tokens later it needs floor((t + u) / page) pages more, u = page - 1 - the free slots of its
    last page (0..page-1). The projection's need at each end (`needs`, sorted by step) is counted
    exactly from a table of how many sequences have each u; a candidate is checked against it in
    O(running) and, once admitted, folded in. Where the free pages hold every sequence's growth to
    its end even if none ended (`bound`, kept in O(1)), a candidate is admitted without that check
    (the exact peak is never above it) and folded in only before the next exact check."""

    def __init__(self, scheduler: Scheduler | None, block_size: int | None = None):
        self.scheduler = scheduler
        self.page = block_size or scheduler.block_manager.block_size
        self.max_seq_len = (scheduler.config.max_seq_len if scheduler is not None else None) or sys.maxsize
        self.open_pages = 0  # pages of the uncomputed tokens and sure growth of sequences of unknown end
        self.any_growth = False
        self.pending: list[tuple[int, int, int, int]] = []  # admitted entries not yet folded in
        entries = []
        for seq in scheduler.running if scheduler is not None else ():
            entry, open_pages, grows = self._entry(seq, len(seq.block_table), seq.num_tokens)
            if entry is not None:
                entries.append(entry)
            self.open_pages += open_pages
            self.any_growth |= grows
        self._fold(entries)

    @classmethod
    def of(cls, block_size: int, ending: list[tuple[int, int, int, int]], open_pages: int = 0) -> "SureGrowth":
        """A projection of given sequences of sure end (steps, base, held, u) and `open_pages` (tests)."""
        growth = cls(None, block_size)
        growth.open_pages = open_pages
        growth._fold(ending)
        return growth

    def _entry(self, seq: Sequence, held: int, tokens: int, base: int | None = None):
        """(its entry if its end is sure, else None; its pages if not; whether it surely grows) for
        `seq` holding `held` pages and to hold `tokens` tokens (`base` more pages for them). A
        request nothing can end sooner (Request.runs_to_max_tokens) samples up to max_tokens or
        max_seq_len, then ends; any other at least up to its min_tokens, its end unknown."""
        page, request = self.page, seq.request
        if base is None:
            base = max(0, -(-tokens // page) - held)
        u = page - 1 - min(page - 1, (held + base) * page - tokens)
        outputs = seq.num_output_tokens
        steps = max(0, min(request.params.max_tokens - outputs, self.max_seq_len - seq.num_tokens))
        if request.runs_to_max_tokens:
            return (steps, base, held, u), 0, steps > 0
        steps = min(steps, max(0, (request.params.min_tokens or 0) - outputs))
        return None, base + (steps + u) // page, steps > 0

    def _fold(self, entries: list[tuple[int, int, int, int]]) -> None:
        """Set the projection to sequences of sure end `entries`: per sequence its arrays, and the
        need at each one's end, sorted by step (at step t = steps[k] those with steps >= t run, each t
        tokens longer; the rest have ended and given their pages back)."""
        page = self.page
        table = np.asarray(entries, dtype=np.int64).reshape(-1, 4)
        self.steps, self.base, self.held, self.u = table[np.argsort(table[:, 0], kind="stable")].T.copy()
        n = len(self.steps)
        first_alive = np.searchsorted(self.steps, self.steps, side="left")
        base_alive = np.concatenate([np.cumsum(self.base[::-1])[::-1], [0]])[first_alive]
        held_ended = np.concatenate([[0], np.cumsum(self.held)])[first_alive]
        # at_least[k, r]: how many sequences from k on have u >= r; floor((t + u) / page) is t // page,
        # plus one where u >= page - t % page.
        counts = np.zeros((n + 1, page + 1), dtype=np.int64)
        counts[np.arange(n), self.u] = 1
        at_least = np.cumsum(np.cumsum(counts[::-1], axis=0)[::-1][:, ::-1], axis=1)[:, ::-1]
        grown = (n - first_alive) * (self.steps // page) + at_least[first_alive, page - self.steps % page]
        self.needs = base_alive + grown - held_ended
        self.all_ended = -int(self.held.sum())
        # Every sequence's pages at its end beyond those it holds: no step needs more (ended ones
        # only give pages back).
        self.bound = int((self.base + (self.steps + self.u) // page).sum())

    def _need_at(self, t: int) -> int:
        """The projection's need at step `t` (sequences of sure end only)."""
        alive = self.steps >= t
        return int((self.base + (t + self.u) // self.page)[alive].sum() - self.held[~alive].sum())

    def _with(self, entry: tuple[int, int, int, int]):
        """(needs at the existing ends, need at the entry's end, all ended) with sequence `entry` added."""
        steps, base, held, u = entry
        grown = np.where(self.steps <= steps, base + (self.steps + u) // self.page, -held)
        return self.needs + grown, self._need_at(steps) + self._end_growth(entry), self.all_ended - held

    def _end_growth(self, entry: tuple[int, int, int, int]) -> int:
        """The pages sequence `entry` takes by its end beyond those it holds."""
        steps, base, _, u = entry
        return base + (steps + u) // self.page

    def peak(self) -> int:
        """The most pages the projection needs beyond those free now, at any step."""
        self._fold_pending()
        return max(int(self.needs.max(initial=0)), self.all_ended) + self.open_pages

    def _fold_pending(self) -> None:
        for entry in self.pending:
            self.needs, self.all_ended = self._fold_one(entry, *self._with(entry))
        self.pending = []

    def admits(self, seq: Sequence, want: int, cached: list[int], partial) -> bool:
        """Whether waiting `seq` (its `want` uncomputed tokens after its `cached` prefix pages and
        `partial` page) fits beside the running sequences' sure growth at every step to come."""
        bm = self.scheduler.block_manager
        reused = len(cached) * bm.block_size + (partial[1] if partial else 0)
        entry, open_pages, grows = self._entry(seq, len(seq.block_table) + len(cached),
                                               seq.num_computed + reused + want,
                                               bm.blocks_needed(seq, want, cached, partial))  # fmt: skip
        if not (grows or self.any_growth):
            return True  # nothing surely grows: this step's pages decide, as they did
        growth = open_pages if entry is None else self._end_growth(entry)
        if self.bound + growth + self.open_pages <= bm.num_free_blocks:
            return True  # every sequence's whole growth fits: the exact peak does too
        self._fold_pending()
        if entry is None:
            return self.peak() + open_pages <= bm.num_free_blocks
        needs, own, all_ended = self._with(entry)
        return max(int(needs.max(initial=0)), own, all_ended) + self.open_pages <= bm.num_free_blocks

    def add(self, seq: Sequence) -> None:
        """Fold in a sequence just admitted, with the pages it now holds."""
        entry, open_pages, grows = self._entry(seq, len(seq.block_table), seq.num_tokens)
        self.open_pages += open_pages
        self.any_growth |= grows
        if entry is not None:
            self._add_entry(entry)

    def _add_entry(self, entry: tuple[int, int, int, int]) -> None:
        """Count a sequence of sure end in `bound` now; fold it into the projection later."""
        self.bound += self._end_growth(entry)
        self.pending.append(entry)

    def _fold_one(self, entry: tuple[int, int, int, int], needs, own: int, all_ended: int):
        """Insert sequence `entry` in the arrays at its end's place; (needs with its own, all_ended)."""
        at = int(np.searchsorted(self.steps, entry[0], side="right"))
        for name, value in zip(("steps", "base", "held", "u"), entry):
            setattr(self, name, np.insert(getattr(self, name), at, value))
        return np.insert(needs, at, own), all_ended
