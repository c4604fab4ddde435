"""After a step is read: appending its tokens to the sequences, the stop checks, log-probabilities
and logits, finishing sequences and requests, and publishing each request's news (`Delta`s) to the
RequestOutput its caller holds (plain Python, on the engine thread).

A request is tracked in `requests` from its admission until it closes: finished (its last update
posted), aborted, or failed. Results of a step for a request that left while the step ran are
dropped (`left`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from jaxllm.engine.detokenizer import Detokenizer, find_stop_string, tokens_before
from jaxllm.engine.step_inputs import StepRequest
from jaxllm.engine.scheduler import ScheduledStep, Scheduler
from jaxllm.engine.sequence import Request, Sequence, SequenceStatus
from jaxllm.engine.stats import perf_metrics
from jaxllm.guided import consume
from jaxllm.outputs import Delta, Logprob, Update
from jaxllm.speculative import accepted

logger = logging.getLogger(__name__)


class EngineShutdown(RuntimeError):
    """The engine was shut down before the request finished."""


class Postprocessor:
    """Args:
    scheduler: where a finished sequence gives back its pages.
    detokenizer: None without a tokenizer (no text).
    max_seq_len: a sequence stops with "length" there.
    park: keeps a finished context_only sequence's pages for another LLM (engine/disaggregated.py).
    stream_interval: a streaming request is updated when a sequence has its first token or this many
        new ones (TensorRT-LLM's stream_interval), and when it finishes.
    new_sequence: (request, index, seed) -> a new Sequence of the request (beam search's forks).
    speculation: speculative decoding's state (jaxllm/speculative.py), or None.
    """

    def __init__(self, scheduler: Scheduler, detokenizer: Detokenizer | None, max_seq_len: int,
                 park: Callable[[Sequence], None], stream_interval: int = 1,
                 new_sequence: Callable[[Request, int, int], Sequence] | None = None,
                 speculation=None):  # fmt: skip
        self.scheduler = scheduler
        self.speculation = speculation
        self.new_sequence = new_sequence
        self.stream_interval = stream_interval
        self.detokenizer = detokenizer
        self.max_seq_len = max_seq_len
        self.park = park
        self.requests: dict[int, Request] = {}  # the requests in the engine, by request_id

    def left(self, seq: Sequence) -> bool:
        """Whether `seq`'s request left the engine while its step ran (aborted, or failed in a
        logits processor): its pages are freed, and the step's results for it are dropped."""
        return seq.request.request_id not in self.requests

    # ---- a step's results --------------------------------------------------------------------
    def postprocess(self, scheduled: ScheduledStep, step_requests: list[StepRequest] | None, out: dict,
                    steps: int) -> set[Request]:  # fmt: skip
        """Take a step's host outputs into its sequences; returns the requests it touched."""
        if steps == 1:
            return self._one_step(scheduled, step_requests, out)
        return self._multi_step(scheduled, out, steps)

    def _one_step(self, scheduled: ScheduledStep, step_requests: list[StepRequest], out: dict) -> set[Request]:
        """A one-step dispatch: each row computed its chunk; the rows that reach their sequence's end
        sampled. A sequence verifying drafts has a row per token (`_verified`)."""
        touched = set()
        offset = 0  # the chunk's first row among the packed token rows
        # Python lists once: indexing numpy arrays element by element costs more per row.
        tokens, logprobs, ranks = out["tokens"].tolist(), out["logprob"].tolist(), out["rank"].tolist()
        verifying = scheduled.verifying
        i = -1  # the item's (first) row
        for item, (seq, n) in enumerate(scheduled.items):
            i += 1
            request, params = seq.request, seq.request.params
            if verifying is not None and verifying[item]:
                if not seq.finished:
                    touched.add(request)
                    self._verified(seq, i, tokens, logprobs, ranks, out)
                i += n - 1
                offset += n
                continue
            r = step_requests[i]
            if seq.finished:  # left while the step ran, or stopped before it was read (scheduled ahead)
                offset += n
                continue
            start = seq.num_computed
            self.scheduler.mark_computed(seq, n)  # before a finish frees its pages
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
            if request.beam is not None:
                keep = 2 * request.beam.width
                seq.beam_candidates = list(zip(out["top_ids"][i][:keep].tolist(), out["top_logprobs"][i][:keep].tolist()))
                if all(s.beam_candidates is not None for s in request.sequences):
                    self._beam_step(request)
                continue
            if seq.index == 0 and seq.num_output_tokens == 0:
                self.scheduler.start_siblings(seq)
            top = None
            if params.logprobs:
                top = zip(out["top_ids"][i][: params.logprobs], out["top_logprobs"][i][: params.logprobs])
            logits_row = np.asarray(out["last_logits"][i]) if params.return_generation_logits else None
            self.append_token(seq, tokens[i], logprobs[i], ranks[i], top, logits_row)
        return touched

    def _verified(self, seq: Sequence, row: int, tokens: list, logprobs: list, ranks: list, out: dict) -> None:
        """Speculative decoding (jaxllm/speculative.py): `seq`'s rows from `row` computed its last
        token and its drafts; the drafts its samples accept are its next tokens, then the sample
        after the last accepted one. The rest of its rows were computed past its end and are dropped."""
        drafts = seq.drop_drafts()
        samples = tokens[row : row + len(drafts) + 1]
        taken = accepted(drafts, samples)
        self.speculation.count(len(drafts), taken)
        k_logprobs = seq.request.params.logprobs
        for j in range(taken + 1):
            if seq.finished:
                break
            self.scheduler.mark_computed(seq, 1)  # before a finish frees its pages
            top = zip(out["top_ids"][row + j][:k_logprobs], out["top_logprobs"][row + j][:k_logprobs]) if k_logprobs else None
            self.append_token(seq, samples[j], logprobs[row + j], ranks[row + j], top)

    def _multi_step(self, scheduled: ScheduledStep, out: dict, steps: int) -> set[Request]:
        """A multi-step decode's results ([steps, rows]): each sequence takes its tokens in order
        until it stops; the rest of its row was computed past its end and is dropped."""
        touched = set()
        # [rows][steps]: each row's tokens, log-probabilities and ranks in order
        tokens, logprobs, ranks = (out[key].T.tolist() for key in ("tokens", "logprob", "rank"))
        for i, (seq, _) in enumerate(scheduled.items):
            if seq.finished:  # stopped before this dispatch was read (it ran on from the last one)
                continue
            touched.add(seq.request)
            if self.takes_at_once(seq):
                self._take_row(seq, tokens[i], logprobs[i], ranks[i])
                continue
            k_logprobs = seq.request.params.logprobs
            for k in range(steps):
                if seq.finished:
                    break
                self.scheduler.mark_computed(seq, 1)  # before a finish frees its pages
                top = zip(out["top_ids"][k][i][:k_logprobs], out["top_logprobs"][k][i][:k_logprobs]) if k_logprobs else None
                self.append_token(seq, tokens[i][k], logprobs[i][k], ranks[i][k], top)
        return touched

    def takes_at_once(self, seq: Sequence) -> bool:
        """Whether a multi-step row of `seq` may be taken in at once (`_take_row`): no per-token work
        but the stop checks (no log-probabilities, grammar or stop strings to follow token by token;
        not a context_only request, which ends at its first token)."""
        request, params = seq.request, seq.request.params
        if params.logprobs is not None or seq.guide is not None or request.is_context_only:
            return False
        return not (params.stop_strings and self.detokenizer is not None and params.detokenize)

    def _take_row(self, seq: Sequence, tokens: list[int], logprobs: list[float], ranks: list[int]) -> None:
        """A multi-step row's tokens for `seq`, in order, up to where it stops, as `append_token`
        token by token would leave them: the tokens before the last it keeps cannot stop it (found
        here: no stop token, within max_tokens and max_seq_len), so they are appended at once (their
        text decoded together) and the last goes through `append_token` with the stop checks."""
        request, params = seq.request, seq.request.params
        n_out = seq.num_output_tokens
        count = max(1, min(len(tokens), seq.tokens_left(self.max_seq_len)))
        stop_ids = request.stop_token_ids
        if stop_ids:
            min_tokens = params.min_tokens or 0
            for j in range(count - 1):
                if tokens[j] in stop_ids and n_out + j + 1 >= min_tokens:
                    count = j + 1
                    break
        head = count - 1
        if head:
            seq.token_ids.extend(tokens[:head])
            total = seq.cumulative_logprob
            for logprob in logprobs[:head]:  # (one by one: the same float sums as token by token)
                total += logprob
            seq.cumulative_logprob = total
            request.token_arrived(ranks[0])
            if self.detokenizer is not None and params.detokenize:
                self.detokenizer.step(seq, params.skip_special_tokens, params.spaces_between_special_tokens)
        self.scheduler.mark_computed(seq, count)  # (the last one's input is the head's last token) before a finish
        self.append_token(seq, tokens[head], logprobs[head], ranks[head])

    def append_token(self, seq: Sequence, token: int, logprob: float, rank: int, top=None, logits_row=None) -> None:
        """Add a sampled token to `seq`: log-probabilities, logits, timing, then the stop checks."""
        request, params = seq.request, seq.request.params
        seq.token_ids.append(token)
        seq.cumulative_logprob += logprob
        request.token_arrived(rank)
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
        if seq.guide is not None and not seq.finished:
            verdict = consume(seq.guide, token)
            if verdict is not None:  # the grammar is complete ("stop"), or the matcher failed
                if verdict != "stop":
                    logger.warning("request %d: guided decoding stopped: %s", request.request_id, verdict)
                self._finish_with_text(seq, "stop")
        if not seq.finished and request.is_context_only:
            self.finish(seq, "length", None)  # a context_only request ends at its first token

    def _beam_step(self, request: Request) -> None:
        """Every running beam of `request` has its candidates: one step of its search
        (engine/beam_search.py). The next beams are forks of the current ones (sharing their full
        pages), which leave; when the search is done, its best hypotheses are the request's outputs."""
        beams = request.sequences
        params = request.params
        nexts = request.beam.step([(seq.output_token_ids, seq.beam_candidates) for seq in beams])
        request.token_arrived(1)
        new = []
        for index, c in enumerate(nexts):
            parent = beams[c.parent]
            child = self.new_sequence(request, index, parent.seed)
            child.token_ids = parent.token_ids + [c.token]
            child.cumulative_logprob = parent.cumulative_logprob + c.logprob
            if params.logprobs is not None:
                child.logprobs = list(parent.logprobs or []) + [self._beam_logprobs(parent, c.token, c.logprob, c.rank)]
            self.scheduler.fork(parent, child)  # before the parent's pages go back
            new.append(child)
        for seq in beams:  # pruned (their forks hold the pages they share)
            seq.status = SequenceStatus.FINISHED
            self.scheduler.remove(seq)
        if new:
            request.sequences = new
            return
        finals = []
        user_stops = set(params.stop_token_ids or ())
        for index, h in enumerate(request.beam.best()):
            seq = self.new_sequence(request, index, 0)
            seq.token_ids = seq.token_ids + h.tokens
            seq.cumulative_logprob = h.cumulative_logprob
            stopped = bool(h.tokens) and h.tokens[-1] in request.stop_token_ids
            user_stop = stopped and h.tokens[-1] in user_stops
            seq.finish_reason = "stop" if stopped else "length"
            seq.stop_reason = h.tokens[-1] if user_stop else None
            seq.num_stop_tokens = 1 if user_stop and not params.include_stop_str_in_output else 0
            if params.logprobs is not None:
                seq.logprobs = [{t: Logprob(lp, rank)} for t, (lp, rank) in zip(h.tokens, h.logprobs)]
            seq.status = SequenceStatus.FINISHED
            if self.detokenizer is not None and params.detokenize:
                seq.text = self.detokenizer.decode(h.tokens[: len(h.tokens) - seq.num_stop_tokens],
                                                   params.skip_special_tokens, params.spaces_between_special_tokens)  # fmt: skip
            finals.append(seq)
        request.sequences = finals

    @staticmethod
    def _beam_logprobs(parent: Sequence, token: int, logprob: float, rank: int) -> dict:
        """A beam token's log-probability entry: its own, then its parent's most likely candidates."""
        k = parent.request.params.logprobs
        entry = {token: Logprob(logprob, rank)}
        for r, (tid, lp) in enumerate(parent.beam_candidates[:k]):
            entry.setdefault(int(tid), Logprob(float(lp), r + 1))
        return entry

    def _collect_prompt_logprobs(self, request: Request, out: dict, offset: int, start: int, count: int) -> None:
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
        """Finish `seq` at a stop string (its text cut there), an end token, max_tokens or max_seq_len.

        stop_reason names what the user asked to stop at (a stop string, a stop_token_ids token);
        an end token (end_id, EOS) stops with stop_reason None, as in TensorRT-LLM and vLLM. Unless
        include_stop_str_in_output, the stop's tokens are left out of the results: a stop token,
        or the tokens from the one in which a stop string starts (`Sequence.num_stop_tokens`).
        """
        request, params = seq.request, seq.request.params
        n_out = seq.num_output_tokens
        user_stop_token = token in (params.stop_token_ids or ())
        if self.detokenizer is not None and params.detokenize:
            stop_token = token in request.stop_token_ids and n_out >= (params.min_tokens or 0)
            if not stop_token or params.include_stop_str_in_output:
                skip, spaces = params.skip_special_tokens, params.spaces_between_special_tokens
                new = self.detokenizer.step(seq, skip, spaces)
                stops = params.stop_strings
                if stops and new and n_out >= (params.min_tokens or 0):
                    hit = find_stop_string(seq.text, len(new), stops)
                    if hit is not None:
                        index, stop = hit
                        if params.include_stop_str_in_output:
                            seq.text = seq.text[: index + len(stop)]
                        else:
                            seq.num_stop_tokens = n_out - tokens_before(self.detokenizer, seq, index, skip, spaces)
                            seq.text = seq.text[:index]
                        self.finish(seq, "stop", stop)
                        return
        if token in request.stop_token_ids and n_out >= (params.min_tokens or 0):
            if user_stop_token and not params.include_stop_str_in_output:
                seq.num_stop_tokens = 1
            self.finish(seq, "stop", token if user_stop_token else None)
        elif n_out >= params.max_tokens or seq.num_tokens >= self.max_seq_len:
            self._finish_with_text(seq, "length")

    def _finish_with_text(self, seq: Sequence, reason: str) -> None:
        """Finish `seq` at a token that is not a stop (stop_reason None), its text's held-back tail flushed first."""
        params = seq.request.params
        if self.detokenizer is not None and params.detokenize:
            self.detokenizer.flush(seq, params.skip_special_tokens, params.spaces_between_special_tokens)
        self.finish(seq, reason, None)

    # ---- finishing ---------------------------------------------------------------------------
    def finish(self, seq: Sequence, reason: str, stop_reason: Any) -> None:
        """`seq` is done: its pages go back, or are parked for another LLM (a context_only request's first token)."""
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        seq.status = SequenceStatus.FINISHED
        seq.drop_ahead()  # (aborted while a dispatch of it was not read)
        seq.drop_drafts()
        if self.speculation is not None:
            self.speculation.drafter.forget(seq)
        if seq.request.is_context_only and reason != "cancelled" and seq.num_output_tokens == 1:
            self.park(seq)
        else:
            self.scheduler.remove(seq)

    def abort(self, request_id: int) -> None:
        """Cancel a request still in the engine: it resolves with the tokens it has."""
        request = self.requests.get(request_id)
        if request is None:
            return
        request.aborted = True
        deltas = []
        for seq in request.sequences:
            if not seq.finished:
                self.finish(seq, "cancelled", None)
            deltas.append(self.delta(seq, final=True))
        self.close(request, Update(tuple(deltas), finished=True))

    def fail(self, request: Request, error: BaseException) -> None:
        """End a request with `error` (its future raises it); its sequences give back their pages."""
        for seq in request.sequences:
            if not seq.finished:
                self.scheduler.remove(seq)
                seq.status = SequenceStatus.FINISHED
                seq.drop_ahead()
        self.close(request, Update(finished=True, error=error))

    def close(self, request: Request, update: Update) -> None:
        """Post a request's last update; it leaves the engine."""
        self.requests.pop(request.request_id, None)
        request.output._post(update)

    # ---- publishing --------------------------------------------------------------------------
    def publish(self, touched: set[Request]) -> None:
        """Post the news of the `touched` requests still in the engine: every update to a streaming
        one, the last (finished) one to the others."""
        for request in touched:
            if request.request_id not in self.requests:
                continue
            done = request.finished
            if not done and not (request.output.streaming and self._stream_due(request)):
                continue
            deltas = tuple(self.delta(seq, final=done) for seq in request.sequences)
            context_logits = None
            if done and request.context_logits_rows:
                context_logits = np.concatenate(request.context_logits_rows)[: len(request.prompt_token_ids)]
            drop = None
            if done and request.beam is not None:
                drop = tuple(range(len(request.sequences))) if len(request.sequences) < request.params.best_of else None
            elif done and request.params.best_of > request.params.n:
                order = sorted(range(len(request.sequences)), key=lambda k: -request.sequences[k].cumulative_logprob)
                drop = tuple(sorted(order[: request.params.n]))
            update = Update(deltas, finished=done, context_logits=context_logits, drop_indices=drop)
            if done:
                self.close(request, update)
            else:
                request.output._post(update)

    def _stream_due(self, request: Request) -> bool:
        """Whether an unfinished streaming request has news to post: a sequence's first token (at
        once, for the time to first token), or `stream_interval` new tokens of a sequence (1: every
        step's news)."""
        if self.stream_interval == 1:
            return True
        for seq in request.sequences:
            new = seq.num_output_tokens - seq.num_published_tokens
            if new >= self.stream_interval or (new and seq.num_published_tokens == 0):
                return True
        return False

    def delta(self, seq: Sequence, final: bool) -> Delta:
        """What `seq` has to tell since its last delta (the prompt leads its first one); the last
        one leaves out its stop's tokens (retracting those already published: `Delta.num_retracted`)."""
        params = seq.request.params
        if seq.request.beam is not None:
            return self._beam_delta(seq, final)
        published = seq.num_published_tokens
        end = seq.num_output_tokens - seq.num_stop_tokens if final else seq.num_output_tokens
        retracted = max(0, published - end)
        new_tokens = seq.output_token_ids[published:end]
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
            num_retracted=retracted,
            text=text,
            logprobs=tuple(logprobs[published:end]) if logprobs is not None else (),
            cumulative_logprob=seq.cumulative_logprob if seq.num_output_tokens > published else None,
            finish_reason=seq.finish_reason if final else None,
            stop_reason=seq.stop_reason if final else None,
            generation_logits=np.stack(gen_logits[published:end]) if gen_logits and new_tokens else None,
            prompt_logprobs=self._prompt_logprobs_out(seq.request) if first else None,
            perf_metrics=perf_metrics(seq.request) if final and params.return_perf_metrics else None,
            disaggregated_params=seq.request.disaggregated_result if final else None,
        )
        seq.num_published_tokens = seq.num_output_tokens
        return delta

    def _beam_delta(self, seq: Sequence, final: bool) -> Delta:
        """A beam search output's news: the beam now at its index replaces what was published there
        (beams are reordered and forked each step)."""
        request, params = seq.request, seq.request.params
        published = request.beam_published.get(seq.index)
        end = seq.num_output_tokens - (seq.num_stop_tokens if final else 0)
        tokens = seq.output_token_ids[:end]
        prefix = list(request.prompt_token_ids) if published is None and not params.exclude_input_from_output else []
        text = None
        if params.detokenize and self.detokenizer is not None:
            text = seq.text if seq.finished else self.detokenizer.decode(tokens, params.skip_special_tokens,
                                                                         params.spaces_between_special_tokens)
            if not params.exclude_input_from_output:
                text = self._prompt_text(request) + text
        request.beam_published[seq.index] = len(tokens)
        return Delta(
            index=seq.index, token_ids=tuple(prefix + tokens), num_retracted=published or 0, text=text,
            logprobs=tuple(seq.logprobs[:end]) if seq.logprobs is not None else (),
            cumulative_logprob=seq.cumulative_logprob if tokens else None,
            finish_reason=seq.finish_reason if final else None, stop_reason=seq.stop_reason if final else None,
            perf_metrics=perf_metrics(request) if final and params.return_perf_metrics else None,
        )  # fmt: skip

    def _prompt_text(self, request: Request) -> str:
        if request.prompt is not None:
            return request.prompt
        return self.detokenizer.decode(request.prompt_token_ids, True, True)

    @staticmethod
    def _prompt_logprobs_out(request: Request):
        if request.params.prompt_logprobs is None:
            return None
        return [None] + list(request.prompt_logprobs)
