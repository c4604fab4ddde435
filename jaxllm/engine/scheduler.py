"""Continuous batching: which prefill chunks and decodes run in the next step (plain Python).

Each step has a token budget (`max_num_tokens`) and a sequence budget (`max_batch_size`).
Running sequences go first, oldest first: a decode costs one token, an unfinished prefill takes
what the budget leaves (chunked prefill). Then waiting sequences are admitted in order while the
budget and free pages allow; without chunked prefill a prompt is admitted only when all of it fits
in one step. A sequence admitted without pages first takes the cached pages of its prefix (block
reuse), and computes only the rest. When a running sequence needs a page and none is free, the most
recently admitted running sequence is preempted: its pages are freed (its full pages stay cached,
so its return may reuse them) and it goes back to the front of the queue, to be recomputed from its
tokens later (its generated tokens are kept, so its output is unchanged).
"""

from __future__ import annotations

import collections
import dataclasses

from jaxllm.engine.block_manager import BlockManager
from jaxllm.engine.sequence import Sequence, SequenceStatus


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_tokens: int
    max_batch_size: int
    enable_chunked_prefill: bool = True


@dataclasses.dataclass
class ScheduledStep:
    items: list[tuple[Sequence, int]]  # (sequence, tokens it computes this step), running order
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 and s.num_computed + 1 == s.num_tokens for s, n in self.items)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = SequenceStatus.WAITING
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence (finished or aborted) and free its pages."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's pages and requeue it at the front, to be recomputed."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_preemptions += 1
        self.add(seq, front=True)

    def drop_all_pages(self) -> None:
        """The KV cache was lost (rebuilt after a failed step): every sequence gives back its pages
        (running ones are preempted; waiting samples drop the prompt pages they share) and every
        cached page is forgotten."""
        for seq in list(self.running):
            self.preempt(seq)
        for seq in self.waiting:
            if seq.block_table:
                self.block_manager.free(seq)
        self.block_manager.clear_cache()

    def schedule(self) -> ScheduledStep:
        cfg, bm = self.config, self.block_manager
        budget = cfg.max_num_tokens
        items: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        scheduled: set[int] = set()

        index = 0
        while index < len(self.running) and budget > 0 and len(items) < cfg.max_batch_size:
            seq = self.running[index]
            want = seq.num_uncomputed
            if want > budget and not cfg.enable_chunked_prefill:
                index += 1
                continue
            n = min(want, budget)
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
            budget -= n
            index += 1

        while self.waiting and budget > 0 and len(items) < cfg.max_batch_size and not preempted:
            seq = self.waiting[0]
            cached = bm.match_prefix(seq)  # pages of its prefix it can reuse instead of computing
            want = seq.num_uncomputed - len(cached) * bm.block_size
            if want > budget and not cfg.enable_chunked_prefill:
                break
            n = min(want, budget)
            if not bm.can_allocate(bm.blocks_needed(seq, n, cached)):
                break
            self.waiting.popleft()
            bm.allocate(seq, n, cached)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            items.append((seq, n))
            scheduled.add(seq.seq_id)
            budget -= n
        return ScheduledStep(items, preempted)
