"""Beam search (`SamplingParams(use_beam_search=True)`): the host's bookkeeping of one request's
beams, step by step (plain Python).

Each step, every running beam's row returns its `2 * width` most likely next tokens with their
log-probabilities under the raw distribution (the sampler's top log-probabilities, so nothing more is
compiled). `BeamSearch.step` then does what Hugging Face transformers' `generate(num_beams=...)`
does with the whole vocabulary (whose top `2 * width` continuations over all beams are among these):

  - the `2 * width` best continuations over all beams by accumulated log-probability (a beam's
    score plus the token's log-probability); with `beam_search_diversity_rate` r, a beam's k-th best
    token (k from 0) is scored r * k lower, and its beam keeps that score (diverse siblings search,
    as FasterTransformer's kernels apply it); cumulative log-probabilities stay the model's;
  - those that end (an end token, or max_tokens reached) and are among the first `width` become
    finished hypotheses, scored by their cumulative log-probability / generated length **
    length_penalty, if the heuristic below still allows an improvement; the `width` best finished
    hypotheses are kept;
  - the `width` best that do not end are the next running beams;
  - the search stops when every continuation ends, when `early_stopping` is True and `width`
    hypotheses are finished, or when no running beam can beat the worst kept hypothesis (False:
    judged at the current length; "never": at max_tokens when length_penalty > 0).

The request's outputs are its `n` best hypotheses. The engine (postprocess.py) forks the beams'
sequences as the step says (engine/scheduler.py `fork`: a child shares its parent's full KV pages and
recomputes the last, partial one).
"""

from __future__ import annotations

import dataclasses

NEG = -1.0e9  # transformers' "impossible" score


@dataclasses.dataclass
class Hypothesis:
    """A finished beam: its output tokens and scores."""

    tokens: list[int]
    score: float  # cumulative log-probability / generated length ** length_penalty
    cumulative_logprob: float
    logprobs: list[tuple[float, int]]  # per token: (log-probability, rank among its beam's candidates)
    finished: bool = True


@dataclasses.dataclass
class Continuation:
    """A running beam of the next step: `parent`'s tokens, then `token`."""

    parent: int  # index of the beam it extends
    token: int
    logprob: float
    rank: int  # 1: its parent's most likely token
    score: float  # its running score (the cumulative log-probability, diversity penalties included)


class BeamSearch:
    """One request's beam search state.

    Args:
      width: beams (SamplingParams.best_of); n: hypotheses returned.
      length_penalty, early_stopping, diversity_rate: as above.
      max_new_tokens: the most tokens a hypothesis may have (max_tokens, within max_seq_len).
      stop_token_ids: tokens that end a beam.
    """

    def __init__(self, width: int, n: int, length_penalty: float, early_stopping, diversity_rate: float,
                 max_new_tokens: int, stop_token_ids: frozenset[int]):  # fmt: skip
        self.width, self.n = width, n
        self.length_penalty, self.early_stopping, self.diversity_rate = length_penalty, early_stopping, diversity_rate
        self.max_new_tokens = max_new_tokens
        self.stop_token_ids = stop_token_ids
        self.running_scores: list[float] = [0.0]  # one per running beam, best first
        self.running_logprobs: list[list[tuple[float, int]]] = [[]]
        self.hypotheses = [Hypothesis([], NEG, NEG, [], finished=False) for _ in range(width)]
        self.improvable = True  # transformers' is_early_stop_heuristic_unsatisfied
        self.done = False
        self.generated = 0  # tokens each running beam has

    def step(self, beams: list[tuple[list[int], list[tuple[int, float]]]]) -> list[Continuation]:
        """One step: `beams[i]` is running beam i's output tokens and its candidates (token,
        log-probability), most likely first, at least 2 * width of them. Returns the next running
        beams (empty once `done`)."""
        width, keep = self.width, 2 * self.width
        scored = []  # (accumulated, selection key, beam, token, logprob, rank)
        for i, (_, candidates) in enumerate(beams):
            base = self.running_scores[i]
            for k, (token, logprob) in enumerate(candidates[:keep]):
                accumulated = base + logprob - self.diversity_rate * k
                scored.append((accumulated, i, token, logprob, k + 1))
        scored.sort(key=lambda c: -c[0])
        top = scored[:keep]
        length = self.generated + 1  # the generated length of every continuation
        ends = [token in self.stop_token_ids or length >= self.max_new_tokens for _, _, token, _, _ in top]

        # The next running beams: the best that do not end (transformers masks the ending ones with
        # -1e9 and takes the top `width` still; those only run on when too few do not end).
        order = sorted(range(len(top)), key=lambda j: -(top[j][0] + (NEG if ends[j] else 0.0)))[:width]
        running = [Continuation(top[j][1], top[j][2], top[j][3], top[j][4], top[j][0] + (NEG if ends[j] else 0.0))
                   for j in order]  # fmt: skip

        # Finished hypotheses: only the first `width` continuations that end count.
        full = all(h.finished for h in self.hypotheses) and self.early_stopping is True
        new = []
        for j, (accumulated, i, token, logprob, rank) in enumerate(top):
            if j >= width or not ends[j] or full or not self.improvable:
                continue
            tokens = beams[i][0] + [token]
            logprobs = self.running_logprobs[i] + [(logprob, rank)]
            cumulative = sum(lp for lp, _ in logprobs)  # (the score less any diversity penalties)
            new.append(Hypothesis(tokens, accumulated / (length**self.length_penalty), cumulative, logprobs))
        if new:
            merged = sorted(self.hypotheses + new, key=lambda h: -h.score)  # stable: older first among equals
            self.hypotheses = merged[:width]

        self.running_logprobs = [self.running_logprobs[c.parent] + [(c.logprob, c.rank)] for c in running]
        self.running_scores = [c.score for c in running]
        self.generated = length
        self._update_improvable()
        all_end = all(ends)
        all_finished = all(h.finished for h in self.hypotheses)
        self.done = not self.improvable or (all_finished and self.early_stopping is True) or all_end
        return [] if self.done else running

    def _update_improvable(self) -> None:
        """Whether the best running beam may still beat the worst kept hypothesis."""
        if self.early_stopping == "never" and self.length_penalty > 0:
            best_length = self.max_new_tokens
        else:
            best_length = self.generated
        best_possible = self.running_scores[0] / (best_length**self.length_penalty) if self.running_scores else NEG
        if all(h.finished for h in self.hypotheses):
            worst = min(h.score for h in self.hypotheses)
            self.improvable = self.improvable and best_possible > worst
        else:
            self.improvable = self.improvable and best_possible > NEG

    def best(self) -> list[Hypothesis]:
        """The `n` best hypotheses, best first."""
        return self.hypotheses[: self.n]
