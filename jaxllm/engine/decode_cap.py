"""Decodes at the bucket below: when no waiting request can be admitted, a decode-only step of n
sequences may run only as many as the next smaller bucket holds, the rest taking their turn next.

A decode step's program is compiled for a bucket of rows (engine/buckets.py), and n decodes run in
the smallest bucket that holds them: 600 sequences compute 1,024 rows. Where a step's cost grows with
its bucket (the projections compute-bound: hundreds of rows on a GPU), the padding is paid for: on
an H200 a forward of 1,024 rows of the Llama-3.1-8B shape took 32.7 ms, one of 512 rows 18.6 ms, so
600 decodes give 18 tokens a millisecond where 512 give 27.5. When every running sequence decodes
and no waiting one can be admitted (none waits: the tail of an offline batch, in which a
ShareGPT-like mix spends most of its decode time; or the KV cache has no room for the next: long
outputs, 280 sequences of 128/2048 filling an H200's bf16 cache and running 512 rows),
`DecodeCap.rows(n)` answers the bucket below, lo, if that makes tokens faster, lo / cost(lo) >
MARGIN * n / cost(bucket(n)), and n otherwise. Each sequence still gets a token a step on average
at a shorter interval than the wide step's (n / lo * cost(lo) < cost(bucket(n))). The scheduler
picks the rows (engine/scheduler.py `_capped`): a sequence left out of a step runs in the next one,
and the others by the most tokens still to come, so that the longest requests, whose decodes end
the batch, are not held back.

The costs are the engine's own: the wall time of each decode-only step (between the reads of two
steps: the device's time for the step when the host keeps ahead of it), by bucket and decodes a
dispatch, the median of the last WINDOW. A bucket not timed yet is tried once (a step at the bucket
below, when the wide one has been timed) and judged from then on. Steps the engine has not timed
at all are left alone: no cap until the wide bucket ran.

On by default on GPUs (`Engine.decode_cap`, made by the builder; `SchedulerConfig(decode_cap=...)`
chooses); off by default on the CPU, where a step's time moves with the host's load.
"""

from __future__ import annotations

import collections
import statistics

# A cap must make tokens at least this much faster than the whole step (by the timed costs).
MARGIN = 1.05
# The most recent timings of a bucket whose median is its cost.
WINDOW = 5


class DecodeCap:
    """The decode buckets' measured costs and the cap they imply.

    Args:
      buckets: the decode-only steps' row buckets (engine/buckets.py Buckets.seq_buckets).
      decode_steps: the decodes a dispatch of a capped step runs (the engine's multi-step K, or 1): the
        costs compared are those of steps of that many decodes.
    """

    def __init__(self, buckets: list[int], decode_steps: int = 1):
        self.buckets = sorted(buckets)
        self.decode_steps = decode_steps
        self._times: dict[tuple[int, int], collections.deque] = {}
        self.num_capped = 0  # steps the cap shortened (for tests and the step trace's readers)

    def observe(self, bucket: int, decode_steps: int, seconds: float) -> None:
        """A decode-only step of `bucket` rows and `decode_steps` decodes took `seconds` of wall time."""
        times = self._times.setdefault((bucket, decode_steps), collections.deque(maxlen=WINDOW))
        times.append(seconds / decode_steps)

    def cost(self, bucket: int) -> float | None:
        """Seconds a forward of a `bucket`-row decode step (of `decode_steps` decodes), or None if not timed."""
        times = self._times.get((bucket, self.decode_steps))
        return statistics.median(times) if times else None

    def rows(self, n: int) -> int:
        """How many of `n` decoding sequences the next step runs: n, or the bucket below n's when
        that makes tokens faster (or has not been timed yet, once the bucket holding n has)."""
        above = next((b for b in self.buckets if b >= n), None)
        below = [b for b in self.buckets if b < n]
        if above is None or above == n or not below:
            return n
        lo = below[-1]
        cost_above, cost_lo = self.cost(above), self.cost(lo)
        if cost_above is None:
            return n
        if cost_lo is None or lo * cost_above > MARGIN * n * cost_lo:
            self.num_capped += 1
            return lo
        return n
