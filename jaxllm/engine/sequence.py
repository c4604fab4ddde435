"""Host-side state of requests and their sequences (plain Python, no JAX).

A `Request` is what the user submitted: a prompt and its SamplingParams, and the RequestOutput the
user holds. It owns `best_of` `Sequence`s (one per parallel sample), each with its own tokens,
KV pages and random stream.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from typing import Any, Optional

from jaxllm.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted: no pages, recomputed from its tokens when admitted
    RUNNING = "running"  # holds pages, scheduled every step until finished
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    seq_id: int
    request: "Request"
    index: int  # which output of its request
    token_ids: list[int]  # prompt, then generated tokens
    num_prompt_tokens: int  # the prompt's KV positions: virtual tokens of a prompt adapter, then the user's
    seed: int  # 64-bit seed of this sequence's random stream
    # Prompt adapters: token_ids starts with this many virtual tokens (ids vocab_size + i), which
    # are never sampled, penalized, detokenized or returned.
    num_virtual_tokens: int = 0
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    block_table: list[int] = dataclasses.field(default_factory=list)
    # Prefix caching (engine/block_manager.py): hashes of the leading full pages of token_ids (content
    # only, so they outlive preemption), and how many leading pages of block_table the prefix cache
    # has seen (reused from it, registered in it, or duplicates of a cached page).
    page_hashes: list[bytes] = dataclasses.field(default_factory=list)
    num_registered_pages: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    cumulative_logprob: float = 0.0
    finish_reason: Optional[str] = None
    stop_reason: Any = None
    # Output tokens at the end that spell the user's stop token or string, left out of the results
    # unless include_stop_str_in_output (TensorRT-LLM trims them from token_ids as from the text).
    num_stop_tokens: int = 0
    num_preemptions: int = 0
    last_step: int = -1  # the scheduler's count of the last step that ran it (read by a decode cap: scheduler.py)
    lora_slot: int = 0  # device slot of its LoRA adapter while running (0: none; engine/adapter_slots.py)
    bias_slot: int = 0  # device slot of its request's bias row while running (0: none)
    prompt_adapter_slot: int = 0  # device slot of its prompt adapter while running (0: none)
    logprobs: Optional[list] = None  # per generated token: dict[token_id, Logprob], when requested
    generation_logits: list = dataclasses.field(default_factory=list)  # per generated token: [V] rows
    # Incremental detokenization and streaming bookkeeping (engine/detokenizer.py).
    text: str = ""
    detok_prefix_offset: int = 0
    detok_read_offset: int = 0
    num_published_tokens: int = 0  # generated tokens already posted to the caller
    published_text_len: int = 0
    guide: Any = None  # guided decoding: its grammar matcher (llguidance's), fed every token it samples
    # The overlap scheduler (engine.py): token_ids ends with this many placeholders for the tokens
    # a dispatch not read yet samples (-1 - its row: the next step reads that row's sample on the
    # device), and `ends_ahead` when the last of them surely ends it (max_tokens, max_seq_len).
    num_ahead: int = 0
    ends_ahead: bool = False
    # Speculative decoding (jaxllm/speculative.py): token_ids ends with this many draft tokens, to be
    # verified by the next step (removed when it is read, or when it is not scheduled).
    num_draft: int = 0
    # Beam search: this beam's candidates of the step just read, (token, log-probability) most likely
    # first, held until every beam of its request has its own (engine/beam_search.py).
    beam_candidates: Optional[list] = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def tokens_left(self, max_seq_len: int) -> int:
        """Tokens it may still sample (up to max_tokens and max_seq_len)."""
        return min(self.request.params.max_tokens - self.num_output_tokens, max_seq_len - self.num_tokens)

    def take_ahead(self, row: int, count: int, max_seq_len: int) -> None:
        """`count` placeholders for the tokens a dispatch not read yet samples for it at `row`."""
        self.token_ids.extend([-1 - row] * count)
        self.num_ahead = count
        self.ends_ahead = self.tokens_left(max_seq_len) <= 0 or self.request.is_context_only

    def take_drafts(self, drafts: list[int]) -> None:
        """Draft tokens to verify in the next step (appended; they are uncomputed)."""
        self.token_ids.extend(drafts)
        self.num_draft = len(drafts)

    def drop_drafts(self, count: int | None = None) -> list[int]:
        """Remove the last `count` drafts (None: all); returns those removed."""
        count = self.num_draft if count is None else count
        if count <= 0:
            return []
        removed = self.token_ids[-count:]
        del self.token_ids[-count:]
        self.num_draft -= count
        return removed

    def drop_ahead(self) -> None:
        """Remove the placeholders (the dispatch is read: its tokens are appended in their place)."""
        if self.num_ahead:
            del self.token_ids[-self.num_ahead :]
        self.num_ahead, self.ends_ahead = 0, False


@dataclasses.dataclass(frozen=True, eq=False)
class BiasRow:
    """A request's additive logit row: its embedding bias, -inf at its banned single tokens. Requests
    with equal rows share one device slot (engine/adapter_slots.py), keyed by `adapter_id`."""

    values: Any  # numpy [vocab] float32
    adapter_id: str  # a digest of the values

    @classmethod
    def of(cls, values) -> "BiasRow":
        import hashlib

        import numpy as np

        values = np.ascontiguousarray(values, np.float32)
        return cls(values, hashlib.sha256(values.tobytes()).hexdigest())


@dataclasses.dataclass(eq=False)
class Request:
    request_id: int
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    output: Any  # the RequestOutput the caller holds
    stop_token_ids: frozenset[int] = frozenset()  # end_id / eos and stop_token_ids (unless ignore_eos)
    bad_word_ids: tuple[tuple[int, ...], ...] = ()  # multi-token bad words (single tokens are in bias_row)
    bias_row: Optional["BiasRow"] = None  # embedding bias and banned single tokens, or None
    priority: float = 0.5  # SchedulingParams.priority: higher runs first under contention
    arrival_order: Optional[int] = None  # stamped by the scheduler when first queued: the FCFS tie-break
    # The seed's request-level extras (jaxllm/inputs.py validates them): None when not given.
    lora_request: Any = None  # adapters.LoRARequest
    prompt_adapter_request: Any = None  # adapters.PromptAdapterRequest
    lora_adapter: Any = None  # adapters.lora.LoraAdapter: the loaded weights of lora_request
    prompt_adapter: Any = None  # adapters.prompt.PromptAdapter: the loaded embeddings of prompt_adapter_request
    retention: Any = None  # llm_args.KvCacheRetentionConfig
    cache_salt: Optional[str] = None
    disaggregated_params: Any = None  # disaggregated_params.DisaggregatedParams
    disaggregated_result: Any = None  # context_only: the DisaggregatedParams its output carries
    context_state: Any = None  # generation_only: the decoded opaque_state its pages are fetched with
    first_token_rank: Optional[int] = None
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    sequences: list[Sequence] = dataclasses.field(default_factory=list)
    aborted: bool = False
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    # Its KV pages so far (engine/block_manager.py; RequestPerfMetrics' kv_cache_metrics): pages
    # taken fresh, references reused (prefix cache, sibling samples), prompt pages the cache missed.
    num_new_blocks: int = 0
    num_reused_blocks: int = 0
    num_missed_blocks: int = 0
    first_iter: Optional[int] = None  # the engine iterations (get_stats' iter) that first and last scheduled it
    last_iter: Optional[int] = None
    beam: Any = None  # beam search: its BeamSearch (engine/beam_search.py); its sequences are the running beams
    beam_published: dict = dataclasses.field(default_factory=dict)  # output index -> output tokens published
    guide_grammar: Optional[str] = None  # guided decoding: its compiled grammar (jaxllm/guided.py)
    guided_decoder: Any = None  # and the LLM's GuidedDecoder, which makes its sequences' matchers
    prompt_logprobs: Any = None  # computed on the prefill that reaches the prompt's end
    context_logits_rows: list = dataclasses.field(default_factory=list)
    # The sampling settings its rows carry, read from params once (engine/step_request.py sampling_fields).
    row_fields: Optional[tuple] = None
    # The output tokens its sequences need before a multi-step decode (-1: never; scheduler.py multi_step_from).
    multi_step_from: Optional[int] = None

    def token_arrived(self, rank: Optional[int]) -> None:
        """Stamp a sampled token's time (and, for its first, the first token's time and rank)."""
        self.last_token_time = time.monotonic()
        if self.first_token_time is None:
            self.first_token_time, self.first_token_rank = self.last_token_time, rank

    @property
    def finished(self) -> bool:
        sequences = self.sequences
        if len(sequences) == 1:  # the common case, asked of every row of every step
            return sequences[0].status is SequenceStatus.FINISHED
        return all(s.finished for s in sequences)

    @property
    def runs_to_max_tokens(self) -> bool:
        """Whether its sequences surely sample until max_tokens (or max_seq_len): no end or stop
        token, stop string or grammar can end them sooner, and it is neither beam search nor a
        context-only request (ignore_eos, or end_id=-1, without stops)."""
        return not (self.stop_token_ids or self.params.stop or self.guide_grammar is not None
                    or self.beam is not None or self.is_context_only)  # fmt: skip

    @property
    def is_context_only(self) -> bool:
        """A disaggregated context request: it ends at its first token, its pages parked for another LLM."""
        params = self.disaggregated_params
        return params is not None and params.request_type == "context_only"

    @property
    def needs_prompt_logits(self) -> bool:
        """prompt_logprobs and context logits read every prompt token's logits, so such a prompt is
        computed in full, never taken from the prefix cache."""
        return self.params.prompt_logprobs is not None or bool(self.params.return_context_logits)
