"""The slow path of sampling: Python logits processors edit rows of a one-step dispatch's last
logits on the host, and the rows are sampled again (`ModelRunner.resample`).

Two kinds, TensorRT-LLM's:
  * a request's own `SamplingParams.logits_processor`(s), called per row:
    `processor(request_id, logits [1, V], token_ids [[...]], None, None)`;
  * the LLM's `batched_logits_processor`, called once per step for every row whose request set
    `apply_batched_logits_processor` (and has no processor of its own, TensorRT-LLM's rule):
    `processor(request_ids, [logits [1, V], ...], [[token_ids], ...], None, [None, ...])`.
Each row's logits are a float32 numpy array to edit in place; a per-request processor may instead
return the new values, the batched one a list of them (one per row, None keeps a row). token_ids are
the sequence's tokens, prompt included (one beam). The stream pointer and client ids are None (no
CUDA stream; jaxllm has no client ids). A request of n samples has a row, and an entry, per sample.

A processor that raises (or returns what does not fit a row) fails the requests of its rows only; the
other rows are sampled as they would have been without it. Multi-step decodes never carry such
rows (`Scheduler.multi_steps`).
"""

from __future__ import annotations

import logging
import traceback
from typing import Callable, Optional

import numpy as np

from jaxllm.engine.step_inputs import StepRequest
from jaxllm.engine.scheduler import ScheduledStep
from jaxllm.engine.sequence import Request, Sequence

logger = logging.getLogger(__name__)


def _processed_by(seq: Sequence, batched: Optional[Callable]) -> str | None:
    """Which processor edits `seq`'s logits: "own", "batched", or None."""
    params = seq.request.params
    if params.logits_processors:
        return "own"
    if params.apply_batched_logits_processor and batched is not None:
        return "batched"
    return None


def apply_logits_processors(scheduled: ScheduledStep, step_requests: list[StepRequest], out: dict,
                            resample: Callable, left: Callable[[Sequence], bool],
                            fail: Callable[[Request, BaseException], None],
                            batched: Optional[Callable] = None) -> None:  # fmt: skip
    """Run the processors of the sampling rows of `scheduled` that have them and resample those
    rows into `out` (the step's host outputs, edited in place).

    Args:
      resample: `ModelRunner.resample(logits [rows, V], step_requests) -> {output name: values}`.
      left: whether a sequence's request left the engine (its row is skipped).
      fail: fails a request whose processor raised.
      batched: the LLM's batched_logits_processor, or None.
    """
    rows = [i for i, (seq, _) in enumerate(scheduled.items)
            if _processed_by(seq, batched) and step_requests[i].temperature is not None
            and step_requests[i].start + len(step_requests[i].token_ids) == seq.num_tokens
            and not left(seq)]  # fmt: skip
    if not rows:
        return
    logits = np.array(out["last_logits"][rows], dtype=np.float32)  # [rows, V]
    kept, batch = [], []
    for j, i in enumerate(rows):
        seq = scheduled.items[i][0]
        if left(seq):  # another sample of its request failed just now
            continue
        if _processed_by(seq, batched) == "batched":
            batch.append(j)
            continue
        try:
            run_logits_processors(seq, logits[j : j + 1])
        except Exception as e:
            logger.warning("request %d failed in its logits processor:\n%s", seq.request.request_id,
                           traceback.format_exc())  # fmt: skip
            fail(seq.request, e)
            continue
        kept.append(j)
    batch = [j for j in batch if not left(scheduled.items[rows[j]][0])]
    if batch:
        seqs = [scheduled.items[rows[j]][0] for j in batch]
        try:
            run_batched_logits_processor(batched, seqs, [logits[j : j + 1] for j in batch])
            kept += batch
        except Exception as e:
            logger.warning("requests %s failed in the batched logits processor:\n%s",
                           sorted({seq.request.request_id for seq in seqs}), traceback.format_exc())  # fmt: skip
            for request in {seq.request.request_id: seq.request for seq in seqs}.values():
                fail(request, e)
    kept = sorted(j for j in kept if not left(scheduled.items[rows[j]][0]))
    if not kept:
        return
    resampled = resample(logits[kept], [step_requests[rows[j]] for j in kept])
    kept_rows = [rows[j] for j in kept]
    for key, values in resampled.items():
        if key in out:
            out[key] = np.array(out[key])
            out[key][kept_rows] = values


def _set_row(row: np.ndarray, result, what: str) -> None:
    """Write a processor's returned values into `row` (None: it edited the row in place)."""
    if result is None:
        return
    result = np.asarray(result, np.float32)
    if result.size != row.size:
        raise ValueError(f"{what} returned {result.shape} values for logits of shape {row.shape}; return None "
                         "(edit in place) or an array of that size")  # fmt: skip
    row[...] = result.reshape(row.shape)


def run_batched_logits_processor(processor: Callable, seqs: list[Sequence], rows: list[np.ndarray]) -> None:
    """Call the LLM's batched logits processor once for `seqs`, whose logits `rows` ([1, V] each) it
    edits in place (or returns, a list of one entry per row); an exception it raises gets a note
    naming the processor and the requests."""
    request_ids = [seq.request.request_id for seq in seqs]
    tokens = [[seq.token_ids[seq.num_virtual_tokens :]] for seq in seqs]
    name = getattr(processor, "__qualname__", None) or type(processor).__name__
    try:
        result = processor(request_ids, rows, tokens, None, [None] * len(seqs))
        if result is not None:
            if not isinstance(result, (list, tuple)) or len(result) != len(rows):
                raise ValueError(f"the batched logits processor returned {type(result).__name__} for {len(rows)} "
                                 "rows; return None (edit the logits in place) or a list of one array (or None) "
                                 "per row")  # fmt: skip
            for row, values in zip(rows, result):
                _set_row(row, values, "the batched logits processor")
    except Exception as e:
        e.add_note(f"raised by batched_logits_processor {name} for requests {request_ids}")
        raise


def run_logits_processors(seq: Sequence, row: np.ndarray) -> None:
    """Apply `seq`'s request's logits processors, in order, to its logits `row` ([1, V], in place);
    an exception they raise gets a note naming the processor and the request."""
    request = seq.request
    tokens = [seq.token_ids[seq.num_virtual_tokens :]]
    for processor in request.params.logits_processors:
        try:
            _set_row(row, processor(request.request_id, row, tokens, None, None), "a logits processor")
        except Exception as e:
            name = getattr(processor, "__qualname__", None) or type(processor).__name__
            e.add_note(f"raised by logits_processor {name} of request {request.request_id} at output token "
                       f"{seq.num_output_tokens} of sample {seq.index}")  # fmt: skip
            raise
