"""The scheduler as plain Python: priority order of admission and scheduling, preemption victims, prefix reuse."""

from jaxllm.engine.block_manager import BlockManager
from jaxllm.engine.scheduler import Scheduler, SchedulerConfig
from jaxllm.engine.sequence import Request, Sequence, SequenceStatus
from jaxllm.sampling_params import SamplingParams

PAGE = 4


class Sim:
    """A scheduler and block manager driven like the engine drives them, with a fake model step."""

    def __init__(self, num_pages=64, max_num_tokens=64, max_batch_size=8, max_tokens=3, enable_reuse=True):
        self.bm = BlockManager(num_pages, PAGE, enable_reuse=enable_reuse)
        self.scheduler = Scheduler(SchedulerConfig(max_num_tokens, max_batch_size), self.bm)
        self.max_tokens = max_tokens
        self.finished: list[int] = []
        self.first_scheduled: list[int] = []
        self.steps = []

    def submit(self, tokens, priority=0.5, seq_id=None, params=None, stop_token_ids=frozenset({2})) -> Sequence:
        """A request that may end at an end token (2) by default, so its length is unknown to the
        scheduler; `stop_token_ids=frozenset()` with `params` of its max_tokens: one of known length."""
        seq_id = len(self.steps) * 1000 + len(self.scheduler.waiting) if seq_id is None else seq_id
        request = Request(request_id=seq_id, prompt=None, prompt_token_ids=list(tokens),
                          params=params or SamplingParams(), output=None, priority=priority,
                          stop_token_ids=stop_token_ids)  # fmt: skip
        seq = Sequence(seq_id=seq_id, request=request, index=0, token_ids=list(tokens), num_prompt_tokens=len(tokens),
                       seed=0)  # fmt: skip
        request.sequences.append(seq)
        self.scheduler.add(seq)
        return seq

    def step(self):
        out = self.scheduler.schedule()
        self.steps.append([(s.seq_id, n) for s, n in out.items])
        for seq, n in out.items:
            if seq.seq_id not in self.first_scheduled:
                self.first_scheduled.append(seq.seq_id)
            seq.num_computed += n
            self.bm.register_computed(seq)
            if seq.num_computed == seq.num_tokens:
                seq.token_ids.append(7)
                if seq.num_output_tokens >= self.max_tokens:
                    seq.status = SequenceStatus.FINISHED
                    self.scheduler.remove(seq)
                    self.finished.append(seq.seq_id)
        return out

    def run(self, limit=500):
        for _ in range(limit):
            if not self.scheduler.has_work():
                return
            self.step()
        raise AssertionError("did not finish")


def test_waiting_requests_are_admitted_by_priority_then_arrival():
    sim = Sim(max_batch_size=1)
    for i, priority in enumerate([0.5, 0.2, 0.5, 0.9, 0.2, 0.9]):
        sim.submit([10 + i] * 5, priority, seq_id=i)
    sim.run()
    assert sim.finished == [3, 5, 0, 2, 1, 4]


def test_running_sequences_are_scheduled_by_priority_within_the_budget():
    sim = Sim(max_num_tokens=2, max_tokens=4)
    low = sim.submit([1], 0.1, seq_id=0)
    mid = sim.submit([2], 0.5, seq_id=1)
    sim.step()  # both admitted (one token each)
    high = sim.submit([3], 0.9, seq_id=2)
    sim.step()  # the budget holds two decodes; newcomers wait
    assert sim.steps[-1] == [(1, 1), (0, 1)]
    assert sim.scheduler.running == [mid, low]
    sim.scheduler.remove(low)  # make room: `high` joins ahead of `mid`
    sim.step()
    assert sim.steps[-1] == [(1, 1), (2, 1)] and sim.scheduler.running == [high, mid]
    sim.step()
    assert sim.steps[-1] == [(2, 1), (1, 1)]


def test_the_victim_is_the_lowest_priority_and_keeps_its_place_in_the_queue():
    # 6 usable pages; three sequences of 7 tokens (2 pages each) that grow past 8 tokens (3 pages).
    sim = Sim(num_pages=7, max_tokens=6, enable_reuse=False)
    a = sim.submit(range(0, 7), 0.5, seq_id=0)
    b = sim.submit(range(10, 17), 0.2, seq_id=1)
    c = sim.submit(range(20, 27), 0.5, seq_id=2)
    sim.step()
    assert [s.seq_id for s in sim.scheduler.running] == [0, 2, 1]
    for _ in range(3):
        out = sim.step()
        if out.preempted:
            break
    assert out.preempted == [b] and b.num_preemptions == 1  # lowest priority, though admitted before c
    late = sim.submit(range(30, 33), 0.2, seq_id=3)  # same priority as b, arrived later
    assert sim.scheduler.waiting == [b, late]
    sim.run()
    assert sim.finished.index(1) < sim.finished.index(3)
    assert a.finished and c.finished and sim.bm.num_free_blocks == sim.bm.num_usable_blocks


def test_equal_priorities_preempt_the_most_recently_admitted():
    sim = Sim(num_pages=7, max_tokens=6, enable_reuse=False)
    first = sim.submit(range(0, 7), seq_id=0)
    sim.step()
    second = sim.submit(range(10, 17), seq_id=1)
    third = sim.submit(range(20, 27), seq_id=2)
    preempted = []
    for _ in range(20):
        preempted += sim.step().preempted
    assert preempted and preempted[0] is third and first.num_preemptions == 0
    sim.run()
    assert sim.finished[0] == 0 and second.finished


def test_admission_reuses_the_cached_prefix():
    sim = Sim(max_tokens=2)
    prefix = list(range(100, 112))  # three pages
    sim.submit(prefix + [1, 2], seq_id=0)
    sim.run()
    second = sim.submit(prefix + [3, 4, 5], seq_id=1)
    exact = sim.submit(prefix, seq_id=2)
    sim.step()
    # The second computes only its suffix; the exact three-page prompt recomputes its last page.
    assert sim.steps[-1] == [(1, 3), (2, 4)]
    assert second.block_table[:2] == exact.block_table[:2] and second.num_computed == 15 and exact.num_computed == 12
    assert sim.bm.num_reused == 5
    sim.run()


def test_admission_accounts_for_the_evictable_pages_it_takes_back():
    sim = Sim(num_pages=5, max_tokens=1)  # 4 usable pages
    sim.submit(range(9), seq_id=0)
    sim.run()  # 2 cached pages (evictable) + 2 plain free
    seq = sim.submit(list(range(9)) + [50, 51, 52, 53, 54, 55, 56], seq_id=1)
    cached = sim.bm.match_prefix(seq)
    assert len(cached) == 2 and sim.bm.blocks_needed(seq, 8, cached) == 4
    sim.run()
    assert sim.finished == [0, 1] and sim.bm.num_reused == 2


def test_drop_all_pages_requeues_everything_and_forgets_the_cache():
    sim = Sim(max_tokens=5)
    sim.submit(range(9), seq_id=0)
    sim.run()
    running = sim.submit(range(20, 29), seq_id=1)
    sim.step()
    sim.scheduler.drop_all_pages()
    assert not sim.scheduler.running and sim.scheduler.waiting == [running] and running.num_computed == 0
    assert sim.bm.cache.num_cached == 0 and sim.bm.num_free_blocks == sim.bm.num_usable_blocks
    sim.run()
    assert running.finished


def test_parallel_samples_holding_prompt_pages_are_admitted_before_higher_priorities():
    sim = Sim(max_batch_size=1, max_tokens=2)
    first = sim.submit(range(9), priority=0.1, seq_id=0)
    sibling = Sequence(seq_id=1, request=first.request, index=1, token_ids=list(range(9)), num_prompt_tokens=9, seed=1)
    first.request.sequences.append(sibling)
    sim.step()
    sibling.num_computed = sim.bm.share_prefix(first, sibling, 8)
    sim.scheduler.add(sibling)
    urgent = sim.submit(range(50, 55), priority=0.9, seq_id=2)
    assert sim.scheduler.waiting == [sibling, urgent]
    sim.run()
    assert sim.finished == [0, 1, 2]


def test_multi_step_decodes_take_their_pages_from_the_scheduler():
    """The engine's multi-step decision, as plain Python: a decode-only step runs `decode_steps`
    decodes once the pages of the tokens each sequence may keep are given; not when a request
    arrived, or when the runner does not serve the batch that way."""
    sim = Sim(max_tokens=10)
    seq = sim.submit([1, 2, 3], seq_id=0)  # max_tokens 32 (SamplingParams' default)
    sim.step()  # the prefill samples its first token: 4 tokens, 3 computed
    scheduled = sim.scheduler.schedule()
    assert scheduled.is_decode_only and len(seq.block_table) == 1
    assert sim.scheduler.multi_steps(scheduled, 8, 100, arrived=True, serves=lambda: True) == 1
    assert sim.scheduler.multi_steps(scheduled, 8, 100, arrived=False, serves=lambda: False) == 1
    assert len(seq.block_table) == 1  # nothing was given for a run that does not happen
    assert sim.scheduler.multi_steps(scheduled, 8, 100, arrived=False, serves=lambda: True) == 8
    assert len(seq.block_table) == 3  # 3 computed + 8 decodes = 11 tokens


def test_a_step_scheduled_ahead_of_the_read_neither_preempts_nor_schedules_a_sure_end():
    """The overlap scheduler's schedule (`ahead`): a sequence whose token in flight surely ends it is
    left out; one whose pages do not fit is left out too (starved: nothing is admitted) instead of
    preempting another, whose token in flight is not read yet."""
    sim = Sim(num_pages=4, max_tokens=10)  # 3 usable pages of 4 tokens
    a = sim.submit([1, 2, 3, 4, 5, 6, 7], seq_id=0)
    b = sim.submit([8, 9, 10], seq_id=1)
    sim.step()  # both prefilled: a holds 8 tokens (2 pages), b 4 tokens (1 page); no page free
    assert sim.bm.num_free_blocks == 0
    for row, seq in enumerate([a, b]):  # as Engine._advance: computed, a placeholder for the sample in flight
        seq.num_computed += 1
        seq.take_ahead(row, 1, max_seq_len=100)
    sim.submit([11], seq_id=2)
    out = sim.scheduler.schedule(ahead=True)  # each needs a new page: none is free, nobody is preempted
    assert out.items == [] and out.starved and not out.preempted
    assert [s.seq_id for s in sim.scheduler.running] == [0, 1] and len(sim.scheduler.waiting) == 1
    b.ends_ahead = True  # (its sample in flight reaches max_tokens)
    sim.scheduler.remove(b)  # as its read would: one page free
    out = sim.scheduler.schedule(ahead=True)
    assert [(s.seq_id, n) for s, n in out.items] == [(0, 1)] and a.block_table[-1] in range(4)
    a.drop_ahead()
    assert a.token_ids == [1, 2, 3, 4, 5, 6, 7, 7] and a.num_ahead == 0 and not a.ends_ahead


def test_an_imported_context_gets_its_pages_only_when_one_more_token_fits():
    sim = Sim(num_pages=3)  # 2 usable pages of 4 tokens
    request = Request(request_id=0, prompt=None, prompt_token_ids=list(range(8)), params=SamplingParams(), output=None)
    seq = Sequence(seq_id=0, request=request, index=0, token_ids=list(range(8)), num_prompt_tokens=8, seed=0)
    assert not sim.scheduler.take_import_pages(seq, 8) and not seq.block_table  # 9 tokens need 3 pages
    seq.token_ids = seq.token_ids[:7]
    assert sim.scheduler.take_import_pages(seq, 7) and len(seq.block_table) == 2
    sim.scheduler.mark_computed(seq, 7)
    assert seq.num_computed == 7 and seq.num_registered_pages == 1  # its full page is cached
    assert sim.scheduler.prompt_pages(seq, 7) == seq.block_table
    sim.scheduler.remove(seq)
    assert sim.bm.num_free_blocks == sim.bm.num_usable_blocks


def test_the_sure_growth_peak_equals_a_step_by_step_count():
    """SureGrowth's peak (the need at each sequence's end, from a table of their page offsets), and
    the same with sequences folded in one by one as they are admitted (at once, or later as add() does),
    and the bound that admits without the check, against counting every step
    of random projections one by one."""
    import random

    from jaxllm.engine.scheduler import SureGrowth

    def counted(ending, open_pages, page):
        return open_pages + max(
            sum(base + (t + u) // page if steps >= t else -held for steps, base, held, u in ending)
            for t in range(0, max([e[0] for e in ending], default=0) + 2)
        )

    rng = random.Random(0)
    for page in (1, 4, 16):
        for _ in range(60):
            ending = [(rng.randrange(0, 80), rng.randrange(0, 4), rng.randrange(0, 9), rng.randrange(0, page))
                      for _ in range(rng.randrange(0, 12))]  # fmt: skip
            open_pages = rng.randrange(0, 5)
            growth = SureGrowth.of(page, ending[:len(ending) // 2], open_pages)
            for entry in ending[len(ending) // 2:]:
                needs, own, all_ended = growth._with(entry)  # what admits() weighs, then add() folds in
                growth.needs, growth.all_ended = growth._fold_one(entry, needs, own, all_ended)
            assert growth.peak() == counted(ending, open_pages, page), (page, ending)
            assert SureGrowth.of(page, ending, open_pages).peak() == counted(ending, open_pages, page)
            # as add() does: counted in the bound at once, folded in at the next exact check (peak)
            lazy = SureGrowth.of(page, ending[:len(ending) // 2], open_pages)
            for entry in ending[len(ending) // 2:]:
                lazy._add_entry(entry)
            # the bound that admits without the exact check is never below the exact peak
            assert lazy.bound + open_pages >= counted(ending, open_pages, page), (page, ending)
            assert lazy.peak() == counted(ending, open_pages, page), (page, ending)


def _capped_steps(sim: Sim, steps: int, keep: int = 2) -> list[list[int]]:
    """The seq_ids of `steps` decode steps each capped at `keep` sequences, each step computed."""
    ran = []
    for _ in range(steps):
        out = sim.scheduler.schedule(cap=lambda n: keep)
        ran.append(sorted(s.seq_id for s, _ in out.items))
        for seq, n in out.items:
            seq.num_computed += n
            seq.token_ids.append(7)
    return ran


def test_a_decode_cap_runs_the_sequences_left_out_then_the_longest_when_nothing_waits():
    """With a cap (engine/decode_cap.py) a step of decodes runs cap(n) of its n sequences: one left
    out of the last step first, then those with the most tokens to come; a step with a waiting
    request or a prompt being computed is not capped."""
    sim = Sim(max_tokens=9)
    seqs = [sim.submit([1, 2, 3], seq_id=i, stop_token_ids=frozenset()) for i in range(3)]
    sim.step()  # the three prompts
    assert _capped_steps(sim, 6) == [[0, 1], [0, 2], [1, 2]] * 2
    longest = Sim(max_tokens=30)
    for i, max_tokens in enumerate([20, 9, 9]):
        longest.submit([1, 2, 3], seq_id=i, params=SamplingParams(max_tokens=max_tokens), stop_token_ids=frozenset())
    longest.step()
    assert _capped_steps(longest, 4) == [[0, 1], [0, 2]] * 2  # the longest runs every step; the others take turns
    late = sim.submit([4, 5, 6, 7, 8], seq_id=9, stop_token_ids=frozenset())
    # A request waits: every decode runs, and it is admitted.
    assert _capped_steps(sim, 1) == [[0, 1, 2, 9]]
    late.num_computed, late.token_ids = 2, late.token_ids[:5]  # its prompt not all computed: no cap
    out = sim.scheduler.schedule(cap=lambda n: 2)
    assert len(out.items) == 4 and seqs[0].last_step == sim.scheduler.num_steps
    # KV-bound: a request waits that the free pages cannot hold, so nothing is admitted: capped.
    full = Sim(num_pages=10, max_tokens=30)
    for i in range(3):
        full.submit([1, 2, 3], seq_id=i, params=SamplingParams(max_tokens=30))
    full.step()  # three sequences of a page each
    big = full.submit(list(range(10, 43)), seq_id=5)  # 33 tokens: 9 pages, 6 free
    assert full.scheduler.waiting and _capped_steps(full, 2) == [[0, 1], [0, 2]]
    full.scheduler.remove(big)
    full.submit([10, 11], seq_id=6)  # a prompt the free pages hold: no cap, and it is admitted
    assert _capped_steps(full, 1) == [[0, 1, 2, 6]]


def test_decode_cap_takes_the_bucket_below_when_its_timed_cost_makes_tokens_faster():
    from jaxllm.engine.decode_cap import DecodeCap

    cap = DecodeCap([2, 4, 8, 16], decode_steps=8)
    assert cap.rows(6) == 6  # nothing timed
    cap.observe(8, 8, 8 * 2.0)  # 2 s a forward of 8 rows
    cap.observe(8, 1, 0.1)  # (single decodes are not what a draining engine runs)
    assert cap.cost(8) == 2.0 and cap.cost(4) is None
    assert cap.rows(6) == 4  # the bucket below not timed yet: tried
    cap.observe(4, 8, 8 * 1.9)  # as slow as 8 rows: 6 decodes at 8 rows make tokens faster
    assert cap.rows(6) == 6
    for _ in range(5):
        cap.observe(4, 8, 8 * 1.0)  # the window's median moves to 1.0 s
    assert cap.cost(4) == 1.0
    assert cap.rows(6) == 4 and cap.rows(7) == 4  # 4 / 1.0 > 1.05 * 7 / 2.0
    assert cap.rows(8) == 8 and cap.rows(2) == 2 and cap.rows(40) == 40  # a full bucket; none below; none above
    cap.observe(16, 8, 8 * 3.0)
    assert cap.rows(9) == 8 and cap.rows(15) == 15  # 8 / 2.0 > 1.05 * 9 / 3.0; 15 / 3.0 beats it
