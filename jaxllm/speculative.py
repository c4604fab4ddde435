"""Speculative decoding (TensorRT-LLM's `LLM(speculative_config=...)`): draft tokens proposed on the
host, verified by the target model in one step (plain Python; the engine's side is in
engine/engine.py, engine/scheduler.py and engine/postprocess.py).

Verification. A sequence whose last token is `t` (at position P) with drafts d1..dk computes
[t, d1, ..., dk] in one step as k + 1 rows of one token each: the same block table, row j at
position P + j. Every row's K/V is written before any row attends (models/transformer.py), so row j
attends to t, d1..dj as decoding them one by one would; and each row samples with the sequence's own
random stream at its own token index (fold_in(seed, index)), as decoding without speculation does.
No program is compiled for it: the rows are decode rows. The drafts are accepted while each equals
the target's sample at its position; the first sample that differs, or the one after the last
draft, is kept too, so a step yields 1 to k + 1 tokens.

Why that keeps the target's distribution. The drafts here are point masses (n-gram lookups; a
draft model would draft greedily). For a point mass on d, the standard rejection-sampling rule
accepts d with probability min(1, p(d) / 1) = p(d) and otherwise samples from p with d removed,
renormalised. Sampling y ~ p and accepting when y == d is that rule: d is accepted with probability
p(d), and a rejected y is distributed as p restricted to tokens other than d. So every token is
drawn from the target's distribution (after temperature, top-k, top-p, min-p), and with a seed the
tokens are exactly those of decoding without speculation; greedy tokens are unchanged.

Which sequences draft (`eligible`): decoding ones whose tokens need nothing from the host between two
tokens beyond their samples: no beam search, grammar, logits processors, logits returned,
multi-token bad words, min_tokens still to reach, penalties, adapters or a context-only request.
Others decode as before in the same steps. A step with drafts is never scheduled ahead of the last
one's read (the drafts depend on its tokens), nor run as a multi-step decode.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Iterable, Optional

from jaxllm.engine.step_inputs import StepRequest

MAX_DRAFT_LEN = 16  # drafts per sequence a step verifies (each is a row of the step)
_PUBLIC_POOL_KEYS = 1 << 20  # a shared pool's most patterns (oldest dropped first)


def _check_int(owner: str, name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{owner}.{name}={value!r} is invalid; allowed: an int in [{low}, {high}]")


def _check_bool(owner: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{name}={value!r} is invalid; allowed: True, False")


def _check_common(config, decoding_type: str) -> str:
    """The fields every speculative config has (max_draft_len, max_concurrency, decoding_type),
    checked in this order; returns the config's class name, for the messages of its own fields."""
    owner = type(config).__name__
    if config.max_draft_len is None:
        raise ValueError(f"{owner}.max_draft_len is required; allowed: an int in [1, {MAX_DRAFT_LEN}]")
    _check_int(owner, "max_draft_len", config.max_draft_len, 1, MAX_DRAFT_LEN)
    if config.max_concurrency is not None:
        _check_int(owner, "max_concurrency", config.max_concurrency, 1, 1 << 30)
    if config.decoding_type != decoding_type:
        raise ValueError(f"{owner}.decoding_type={config.decoding_type!r} is invalid; allowed: {decoding_type!r}")
    return owner


@dataclasses.dataclass
class NGramDecodingConfig:
    """TensorRT-LLM's n-gram (prompt lookup) drafter: the tokens that followed an earlier occurrence
    of the sequence's last `max_matching_ngram_size` (down to 1) tokens are its drafts.

    max_draft_len: drafts per step (required), at most MAX_DRAFT_LEN.
    max_matching_ngram_size: the longest pattern looked up (longest first).
    is_keep_all: keep every continuation seen after a pattern (True) or only the latest one.
    is_use_oldest: of the continuations kept, draft the oldest (True) or the newest.
    is_public_pool: one pool of patterns for all requests (True) or one per request.
    max_concurrency: no drafts while more sequences than this run (None: always drafts); a step
      with drafts is not scheduled ahead of the last one's read, which costs a wide batch more
      than its drafts give it.
    """

    max_draft_len: Optional[int] = None
    max_matching_ngram_size: int = 2
    is_keep_all: bool = True
    is_use_oldest: bool = True
    is_public_pool: bool = True
    max_concurrency: Optional[int] = None
    decoding_type: str = "NGram"

    def __post_init__(self):
        owner = _check_common(self, "NGram")
        _check_int(owner, "max_matching_ngram_size", self.max_matching_ngram_size, 1, 64)
        for name in ("is_keep_all", "is_use_oldest", "is_public_pool"):
            _check_bool(owner, name, getattr(self, name))


@dataclasses.dataclass
class DraftTargetDecodingConfig:
    """TensorRT-LLM's draft/target speculation: a smaller model of the same vocabulary drafts
    `max_draft_len` tokens greedily (its own KV cache, in the same pages as the target's: it runs on
    every step the target runs, so its K/V follows the target's tokens).

    max_draft_len: drafts per step (required), at most MAX_DRAFT_LEN.
    speculative_model: the draft model, anything LLM(model=...) takes (`speculative_model_dir`,
      older releases' name, is taken too).
    max_concurrency: as NGramDecodingConfig's.
    """

    max_draft_len: Optional[int] = None
    speculative_model: Any = None
    speculative_model_dir: Any = None  # older releases' name
    max_concurrency: Optional[int] = None
    decoding_type: str = "DraftTarget"

    def __post_init__(self):
        owner = _check_common(self, "DraftTarget")
        if self.speculative_model is None:
            self.speculative_model = self.speculative_model_dir
        if not isinstance(self.speculative_model, (str, os.PathLike)):
            raise ValueError(f"{owner}.speculative_model={self.speculative_model!r} is invalid; allowed: a model "
                             "name, directory or file, as LLM(model=...) takes")  # fmt: skip


CONFIGS = {"NGram": NGramDecodingConfig, "DraftTarget": DraftTargetDecodingConfig}


def _from_vllm(value: dict) -> NGramDecodingConfig:
    """vLLM's form, {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": n,
    "prompt_lookup_min": 1}: prompt lookup in the request's own tokens (a private pool)."""
    value = dict(value)
    method = value.pop("method")
    if method != "ngram":
        raise ValueError(f"speculative_config method={method!r} is invalid; allowed: 'ngram' (vLLM's form), or "
                         "TensorRT-LLM's NGramDecodingConfig")  # fmt: skip
    low = value.pop("prompt_lookup_min", None)
    if low not in (None, 1):
        raise ValueError(f"speculative_config prompt_lookup_min={low!r} is invalid; allowed: None, 1 (patterns are "
                         "looked up from prompt_lookup_max tokens down to 1)")  # fmt: skip
    names = {"num_speculative_tokens": "max_draft_len", "prompt_lookup_max": "max_matching_ngram_size"}
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ValueError(f"speculative_config: {', '.join(unknown)} not supported with method='ngram'; allowed: "
                         "num_speculative_tokens, prompt_lookup_max, prompt_lookup_min")  # fmt: skip
    fields = {names[k]: v for k, v in value.items() if v is not None}
    return NGramDecodingConfig(**fields, is_public_pool=False)


def as_speculative_config(value):
    """`LLM(speculative_config=...)`: None, an NGramDecodingConfig, a dict with its fields and
    `decoding_type` (TensorRT-LLM's YAML form), or vLLM's {"method": "ngram", ...}. Anything else
    is refused, naming what is allowed."""
    if value is None or isinstance(value, (NGramDecodingConfig, DraftTargetDecodingConfig)):
        return value
    if isinstance(value, dict) and "method" in value:
        return _from_vllm(value)
    if isinstance(value, dict):
        kind = value.get("decoding_type")
        if kind not in CONFIGS:
            raise ValueError(f"speculative_config decoding_type={kind!r} is invalid; allowed: 'NGram', "
                             "'DraftTarget'")  # fmt: skip
        return CONFIGS[kind](**value)
    raise TypeError(f"speculative_config must be an NGramDecodingConfig, a DraftTargetDecodingConfig, a dict or "
                    f"None, got {type(value).__name__}")  # fmt: skip


def eligible(seq, has_adapters: bool) -> bool:
    """Whether `seq` (running, decoding) may draft this step (module docstring)."""
    request, params = seq.request, seq.request.params
    return not (
        params.wants_logits or params.uses_penalties or request.bad_word_ids or seq.guide is not None
        or request.beam is not None or _processed(params) or request.is_context_only
        or seq.num_output_tokens < (params.min_tokens or 0) or has_adapters and (seq.lora_slot or seq.num_virtual_tokens)
    )  # fmt: skip


def _processed(params) -> bool:
    """Whether a logits processor edits the request's logits (its own, or the LLM's batched one)."""
    return bool(params.logits_processors) or bool(params.apply_batched_logits_processor)


def accepted(drafts: list[int], samples: list[int]) -> int:
    """How many leading drafts the target's `samples` (one per row: after the last token, then
    after each draft) accept: each equal to the sample at its position."""
    n = 0
    while n < len(drafts) and drafts[n] == samples[n]:
        n += 1
    return n


class NGramDrafter:
    """The pattern pools of NGramDecodingConfig: pattern (tuple of 1..N tokens) -> continuations
    (tuples of max_draft_len tokens that followed it), in order of first sight."""

    def __init__(self, config: NGramDecodingConfig):
        self.config = config
        self._public: collections.OrderedDict = collections.OrderedDict()
        self._private: dict[int, dict] = {}  # request id -> its pool
        self._indexed: dict[int, int] = {}  # seq id -> positions whose continuations are recorded

    def _pool(self, seq) -> dict:
        if self.config.is_public_pool:
            return self._public
        return self._private.setdefault(seq.request.request_id, {})

    def forget(self, seq) -> None:
        """A sequence left: drop its bookkeeping (and its request's private pool)."""
        self._indexed.pop(seq.seq_id, None)
        if not self.config.is_public_pool and all(s.finished for s in seq.request.sequences):
            self._private.pop(seq.request.request_id, None)

    def _record(self, pool: dict, tokens: list[int], first: int, end: int) -> None:
        """Record the continuation after every pattern that ends at positions first..end-1 whose
        max_draft_len following tokens are all known."""
        cfg = self.config
        k, n_max = cfg.max_draft_len, cfg.max_matching_ngram_size
        public = pool is self._public
        for i in range(first, end):
            value = tuple(tokens[i : i + k])
            for n in range(1, min(n_max, i) + 1):
                key = tuple(tokens[i - n : i])
                values = pool.get(key)
                if values is None:
                    pool[key] = values = {}
                    if public and len(pool) > _PUBLIC_POOL_KEYS:
                        pool.popitem(last=False)
                elif not cfg.is_keep_all:
                    values.clear()
                values.setdefault(value, None)

    def propose(self, seq, limit: int) -> list[int]:
        """Up to min(max_draft_len, limit) drafts for `seq` (its real tokens: virtual ones excluded)."""
        cfg = self.config
        tokens = seq.token_ids[seq.num_virtual_tokens :] if seq.num_virtual_tokens else seq.token_ids
        pool = self._pool(seq)
        end = len(tokens) - cfg.max_draft_len + 1  # continuations complete up to here
        done = self._indexed.get(seq.seq_id, 1)
        if end > done:
            self._record(pool, tokens, done, end)
            self._indexed[seq.seq_id] = end
        for n in range(min(cfg.max_matching_ngram_size, len(tokens)), 0, -1):
            values = pool.get(tuple(tokens[-n:]))
            if values:
                value = next(iter(values)) if cfg.is_use_oldest else next(reversed(values))
                return list(value[:limit])
        return []


class ModelDrafter:
    """DraftTargetDecodingConfig's drafter: a second ModelRunner (the draft model's weights and KV
    cache, over the same page ids as the target's) that runs every step the target runs on the same
    rows (`follow`), so its K/V follows the target's tokens, and drafts by a greedy multi-step
    decode of max_draft_len steps from each sequence's last token (`propose_all`)."""

    def __init__(self, runner, k: int):
        self.runner, self.k = runner, k

    def forget(self, seq) -> None:
        pass

    def follow(self, requests: list, steps: int) -> None:
        """The target's step, on the draft model (its outputs are never read): the same tokens at
        the same positions and pages, each row sampled plainly (greedy, nothing returned; a prompt
        adapter's virtual tokens as token 0)."""
        vocab = self.runner.cfg.vocab_size
        rows = [StepRequest(token_ids=[t if t < vocab else 0 for t in r.token_ids] if r.token_ids and
                            max(r.token_ids) >= vocab else r.token_ids, start=r.start, block_table=r.block_table)
                for r in requests]  # fmt: skip
        self.runner.dispatch(rows, steps)

    def propose_all(self, candidates: list, reserve) -> list:
        """(sequence, drafts) for the (sequence, limit) `candidates` whose pages for their last
        token and max_draft_len more `reserve(seq, n)` gives, as many as one dispatch serves."""
        rows, chosen = [], []
        for seq, limit in candidates:
            row = StepRequest(token_ids=[seq.token_ids[-1]], start=seq.num_computed, block_table=seq.block_table)
            if self.k > 1 and not self.runner.multi_step_serves(rows + [row]):
                break
            # The verify step computes positions P .. P + limit; the draft's decodes past them write
            # into the null page (as any multi-step decode's rows past their pages).
            if not reserve(seq, 1 + min(self.k, limit)):
                continue
            rows.append(row)
            chosen.append((seq, limit))
        if not rows:
            return []
        tokens = self.runner.dispatch(rows, self.k).result()["tokens"]  # [k, rows] (k > 1) or [rows]
        tokens = tokens.reshape(self.k, len(rows)) if self.k > 1 else tokens.reshape(1, len(rows))
        return [(seq, [int(t) for t in tokens[:limit, i]]) for i, (seq, limit) in enumerate(chosen)]

    def reset(self) -> None:
        """The target's KV cache was rebuilt (a failed step): the draft's too."""
        self.runner.reset_cache()


class Speculation:
    """The engine's speculative decoding: the drafter and the acceptance counts of the step just
    read (get_stats' specDecodingStats).

    Args:
      config: an NGramDecodingConfig or a DraftTargetDecodingConfig.
      has_adapters: the LLM serves adapters (their sequences do not draft).
      draft_runner: DraftTargetDecodingConfig's: the draft model's ModelRunner.
    """

    def __init__(self, config, has_adapters: bool = False, draft_runner=None):
        self.config = config
        self.drafter = ModelDrafter(draft_runner, config.max_draft_len) if draft_runner is not None else NGramDrafter(config)
        self.has_adapters = has_adapters
        self.reset_counts()

    @property
    def model(self) -> Optional[ModelDrafter]:
        """The draft model's drafter (DraftTargetDecodingConfig), or None."""
        return self.drafter if isinstance(self.drafter, ModelDrafter) else None

    def reset_counts(self) -> None:
        self.num_draft_tokens = self.num_accepted_tokens = self.num_requests = 0

    def count(self, drafted: int, taken: int) -> None:
        """A sequence verified `drafted` drafts and `taken` of them were accepted."""
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += taken
        self.num_requests += 1

    def stats(self) -> dict:
        """TensorRT-LLM's specDecodingStats of an iteration."""
        n = self.num_requests
        return {"numDraftTokens": self.num_draft_tokens, "numAcceptedTokens": self.num_accepted_tokens,
                "numRequestsWithDraftTokens": n,
                "acceptanceLength": (self.num_accepted_tokens + n) / n if n else 0.0}  # fmt: skip

    def active(self, num_running: int) -> bool:
        """Whether sequences draft with `num_running` running (max_concurrency)."""
        return self.config.max_concurrency is None or num_running <= self.config.max_concurrency

    def propose(self, running: Iterable, max_seq_len: int, reserve=None) -> None:
        """Give each eligible decoding sequence its drafts (`Sequence.take_drafts`); none for any
        when a running request has logits processors (their rows are one per sequence) or more
        than max_concurrency run. `reserve(seq, n)`: pages for n tokens from its last (a draft
        model writes its drafts' K/V), False when they do not fit."""
        running = [s for s in running if not s.finished]
        if not self.active(len(running)) or any(_processed(s.request.params) for s in running):
            return
        candidates = []
        for seq in running:
            if seq.num_uncomputed != 1 or seq.num_ahead or seq.num_draft:
                continue
            limit = seq.tokens_left(max_seq_len) - 1  # the step's last sample is a token too
            if limit > 0 and eligible(seq, self.has_adapters):
                candidates.append((seq, limit))
        if self.model is not None:
            drafted = self.model.propose_all(candidates, reserve)
        else:
            drafted = [(seq, self.drafter.propose(seq, limit)) for seq, limit in candidates]
        for seq, drafts in drafted:
            if drafts:
                seq.take_drafts(drafts)
