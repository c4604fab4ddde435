"""The slow path of sampling: a request's Python logits processors edit its row of a one-step
dispatch's last logits on the host, and the row is sampled again (`ModelRunner.resample`).

A processor that raises (or returns what does not fit the row) fails its own request only; the
other rows are sampled as they would have been without it. Multi-step decodes never carry such
rows (`Scheduler.multi_steps`).
"""

from __future__ import annotations

import logging
import traceback
from typing import Callable

import numpy as np

from jaxllm.engine.step_inputs import StepRequest
from jaxllm.engine.scheduler import ScheduledStep
from jaxllm.engine.sequence import Request, Sequence

logger = logging.getLogger(__name__)


def apply_logits_processors(scheduled: ScheduledStep, step_requests: list[StepRequest], out: dict,
                            resample: Callable, left: Callable[[Sequence], bool],
                            fail: Callable[[Request, BaseException], None]) -> None:  # fmt: skip
    """Run the processors of the sampling rows of `scheduled` that have them and resample those
    rows into `out` (the step's host outputs, edited in place).

    Args:
      resample: `ModelRunner.resample(logits [rows, V], step_requests) -> {output name: values}`.
      left: whether a sequence's request left the engine (its row is skipped).
      fail: fails a request whose processor raised.
    """
    rows = [i for i, (seq, _) in enumerate(scheduled.items)
            if seq.request.params.logits_processors and step_requests[i].temperature is not None
            and step_requests[i].start + len(step_requests[i].token_ids) == seq.num_tokens
            and not left(seq)]  # fmt: skip
    if not rows:
        return
    logits = np.array(out["last_logits"][rows], dtype=np.float32)  # [rows, V]
    kept = []
    for j, i in enumerate(rows):
        seq = scheduled.items[i][0]
        if left(seq):  # another sample of its request failed just now
            continue
        try:
            run_logits_processors(seq, logits[j : j + 1])
        except Exception as e:
            logger.warning("request %d failed in its logits processor:\n%s", seq.request.request_id,
                           traceback.format_exc())  # fmt: skip
            fail(seq.request, e)
            continue
        kept.append(j)
    kept = [j for j in kept if not left(scheduled.items[rows[j]][0])]
    if not kept:
        return
    resampled = resample(logits[kept], [step_requests[rows[j]] for j in kept])
    kept_rows = [rows[j] for j in kept]
    for key, values in resampled.items():
        if key in out:
            out[key] = np.array(out[key])
            out[key][kept_rows] = values


def run_logits_processors(seq: Sequence, row: np.ndarray) -> None:
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
