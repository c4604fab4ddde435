"""A step's host inputs, in numpy: what the scheduler asks for (`StepRequest`), the programs that
serve it (`StepPlan`), and their inputs packed into one uint32 buffer per program.

A forward program reads (BatchMetadata[, SamplingBatch of a multi-step decode][, per-token LoRA
slots]), a sampler program (SamplingBatch,), a head program (next_tokens,): each padded to its
program's bucket (engine/buckets.py). The same functions build a program's inputs from no requests
at all, which is its padding example: `abstract_host_inputs` derives a program's abstract inputs
from it, so the inputs are described once.

A program's host inputs travel as one uint32 buffer per device, split inside the program with a
static layout (`host_layout`; engine/programs.py unpacks it): transferred one by one, ~15 small
arrays took about 1 ms of every TP=2 dispatch on 2 x H200. The input token ids travel apart: a
step scheduled ahead of the last one's read (the overlap scheduler) names rows of that one's samples
there (-1 - row), which the forward program reads on the device (programs.merge_tokens).
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import numpy as np

from jaxllm.engine.buckets import Buckets, ForwardShape, HeadShape, SamplerShape, shape_from_json
from jaxllm.layers import sampling as sampling_lib
from jaxllm.layers.batch import NULL_PAGE, BatchMetadata
from jaxllm.sampling_params import MAX_LOGPROBS


@dataclasses.dataclass(slots=True)
class StepRequest:
    """One scheduled sequence, as the runner needs it."""

    token_ids: list[int]  # tokens computed this step
    start: int  # position of the first of them
    block_table: list[int]
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    counter: int = 0
    num_logprobs: int = 0
    bias_slot: int = 0  # the device row of its bias (embedding bias and banned single tokens; 0: none)
    banned_tokens: list[int] | None = None  # tokens banned this step only (at most sampling.BAN_WIDTH)
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    prompt_len: int = 0  # KV positions of the prompt (virtual tokens included): the penalties' split
    first_position: int = 0  # the first position holding a real token (after virtual ones)
    prompt_logprobs_next: list[int] | None = None  # next tokens of this chunk, for prompt_logprobs
    want_all_logits: bool = False  # return logits of every token of this chunk (context logits)
    want_last_logits: bool = False  # return the last token's logits (generation logits, processors)
    lora_slot: int = 0  # device slot of the sequence's LoRA adapter (0: none)
    prompt_adapter_slot: int = 0  # device slot of its prompt adapter (0: none); maps its virtual tokens
    token_bitmask: np.ndarray | None = None  # guided decoding: [ceil(V / 32)] int32, the tokens it may sample
    # Guided decoding in a step dispatched ahead of the last one's read: the bitmask is filled once
    # that step's tokens have reached the grammar, and the step's sampler is dispatched then.
    bitmask_pending: bool = False

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def needs_full(self) -> bool:
        """Whether sampling this row needs more than the "plain" flavor."""
        truncates = self.temperature > 0 and (self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0)
        return truncates or self.num_logprobs > 0 or self.bias_slot != 0 or bool(self.banned_tokens)


def sampling_flavor(requests: list[StepRequest]) -> str:
    """The cheapest sampling flavor (engine/buckets.py) that serves every row."""
    if any(r.penalized for r in requests):
        return "penalties"
    return "full" if any(r.needs_full for r in requests) else "plain"


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The programs one dispatch runs (the followers of a multi-process run replay it)."""

    forward: ForwardShape
    sampler: SamplerShape | None = None
    head: HeadShape | None = None
    want_last_logits: bool = False
    # The sampler runs in a second dispatch (ModelRunner.sample), once the rows' bitmasks are known.
    deferred: bool = False

    def to_json(self) -> dict:
        return {"forward": self.forward.to_json(), "sampler": self.sampler and self.sampler.to_json(),
                "head": self.head and self.head.to_json(), "want_last_logits": self.want_last_logits,
                "deferred": self.deferred}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict) -> "StepPlan":
        return cls(shape_from_json(data["forward"]), data["sampler"] and shape_from_json(data["sampler"]),
                   data["head"] and shape_from_json(data["head"]), data["want_last_logits"], data["deferred"])  # fmt: skip


# ---- the inputs of each program ---------------------------------------------------------------------
def build_batch(
    seq_tokens: list[list[int]],
    seq_starts: list[int],
    block_tables: list[list[int]],
    page_size: int,
    num_tokens: int | None = None,
    num_seqs: int | None = None,
    pages_per_seq: int | None = None,
    max_query_len: int | None = None,
) -> BatchMetadata:
    """Pack a step's sequences into host numpy arrays, padded to the given bucket sizes.

    Args:
      seq_tokens: per sequence, the token ids it computes this step.
      seq_starts: per sequence, the position of its first token this step (tokens already cached).
      block_tables: per sequence, its page ids (enough pages for start + len(tokens)).
      page_size: tokens per page.
      num_tokens, num_seqs, pages_per_seq, max_query_len: padded sizes (defaults: exact).
    """
    total = sum(len(t) for t in seq_tokens)
    T = num_tokens or total
    B = num_seqs or len(seq_tokens)
    P = pages_per_seq or max(1, max(len(b) for b in block_tables))
    Q = max_query_len or max(len(t) for t in seq_tokens)
    if total > T or len(seq_tokens) > B or any(len(b) > P for b in block_tables) or any(
        len(t) > Q for t in seq_tokens
    ):
        raise ValueError("batch does not fit its bucket")
    # Vectorized over the packed tokens: a loop of small numpy calls per sequence cost ~6 us a row,
    # some milliseconds of host time per step at hundreds of rows.
    n_seqs = len(seq_tokens)
    lens = np.fromiter(map(len, seq_tokens), np.int64, count=n_seqs)
    starts = np.asarray(seq_starts, np.int64).reshape(n_seqs)
    offsets = np.zeros(n_seqs + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    seq_of = np.repeat(np.arange(n_seqs), lens)  # [total]: each packed token's sequence
    pos = starts[seq_of] + np.arange(total) - offsets[:-1][seq_of]
    table_lens = np.fromiter(map(len, block_tables), np.int64, count=n_seqs)
    if total and (pos // page_size >= table_lens[seq_of]).any():
        raise ValueError("a sequence's block table lacks the pages of its tokens")
    tables = np.full((B, P), NULL_PAGE, np.int32)
    table_rows = np.repeat(np.arange(n_seqs), table_lens)
    table_cols = np.arange(int(table_lens.sum())) - np.repeat(np.cumsum(table_lens) - table_lens, table_lens)
    tables[table_rows, table_cols] = np.fromiter(itertools.chain.from_iterable(block_tables), np.int32,
                                                 count=len(table_rows))  # fmt: skip
    token_ids = np.zeros(T, np.int32)
    token_ids[:total] = np.fromiter(itertools.chain.from_iterable(seq_tokens), np.int32, count=total)
    positions = np.zeros(T, np.int32)
    positions[:total] = pos
    slot_mapping = np.full(T, NULL_PAGE * page_size, np.int32)
    slot_mapping[:total] = tables[seq_of, pos // page_size].astype(np.int64) * page_size + pos % page_size
    token_seq = np.zeros(T, np.int32)
    token_seq[:total] = seq_of
    query_start = np.full(B + 1, total, np.int32)
    query_start[:n_seqs] = offsets[:-1]
    seq_lens = np.zeros(B, np.int32)
    seq_lens[:n_seqs] = starts + lens
    logits_indices = np.zeros(B, np.int32)
    logits_indices[:n_seqs] = offsets[1:] - 1
    return BatchMetadata(
        token_ids, positions, slot_mapping, token_seq, query_start, seq_lens, tables, logits_indices, Q
    )


def sampling_batch(requests: list[StepRequest], B: int, flavor: str, batch: BatchMetadata | None = None,
                   pages: int = 0, bitmask_words: int = 0) -> sampling_lib.SamplingBatch:  # fmt: skip
    """The host SamplingBatch of `requests` in `flavor`, padded to B rows (`batch`: the step's, for
    the block tables and lengths the "penalties" flavor reads, its tables padded to `pages`); with
    `bitmask_words`, the rows' token bitmasks (guided decoding; every token allowed elsewhere)."""
    n = len(requests)

    def col(name, dtype, fill):  # [B]: one field of every request, `fill` in the padding rows
        arr = np.full(B, fill, dtype)
        arr[:n] = [getattr(r, name) for r in requests]
        return arr

    seeds = np.zeros((B, 2), np.uint32)  # [B, 2]: each seed's high and low 32 bits
    wide = np.fromiter((r.seed & 0xFFFFFFFFFFFFFFFF for r in requests), np.uint64, count=n)
    seeds[:n, 0], seeds[:n, 1] = wide >> np.uint64(32), wide & np.uint64(0xFFFFFFFF)
    common = dict(temperature=col("temperature", np.float32, 0.0), seeds=seeds,
                  counters=col("counter", np.int32, 0))  # fmt: skip
    if bitmask_words:
        bitmask = np.full((B, bitmask_words), -1, np.int32)
        for i, r in enumerate(requests):
            if r.token_bitmask is not None:
                bitmask[i] = r.token_bitmask
        common["token_bitmask"] = bitmask
    if flavor == "plain":
        return sampling_lib.SamplingBatch(**common)
    banned = np.full((B, sampling_lib.BAN_WIDTH), -1, np.int32)
    for i, r in enumerate(requests):
        if r.banned_tokens:
            banned[i, : len(r.banned_tokens)] = r.banned_tokens[: sampling_lib.BAN_WIDTH]
    full = dict(common, top_k=col("top_k", np.int32, 0), top_p=col("top_p", np.float32, 1.0),
                min_p=col("min_p", np.float32, 0.0), bias_slots=col("bias_slot", np.int32, 0),
                banned_tokens=banned, num_logprobs=MAX_LOGPROBS)  # fmt: skip
    if flavor == "full":
        return sampling_lib.SamplingBatch(**full, flavor="full")
    tables = np.zeros((B, pages), np.int32)  # [B, pages]
    rows, cols = min(B, batch.block_tables.shape[0]), min(pages, batch.block_tables.shape[1])
    tables[:rows, :cols] = batch.block_tables[:rows, :cols]
    seq_lens = np.zeros(B, np.int32)
    seq_lens[:n] = batch.seq_lens[:n]
    return sampling_lib.SamplingBatch(
        **full, flavor="penalties", repetition_penalty=col("repetition_penalty", np.float32, 1.0),
        presence_penalty=col("presence_penalty", np.float32, 0.0),
        frequency_penalty=col("frequency_penalty", np.float32, 0.0), block_tables=tables, seq_lens=seq_lens,
        prompt_lens=col("prompt_len", np.int32, 0), first_positions=col("first_position", np.int32, 0),
    )  # fmt: skip


def _per_token(requests: list[StepRequest], T: int, values) -> np.ndarray:
    """[T] int32: `values(r)` (a scalar or a list of at most len(r.token_ids)) at the packed
    positions of each request's tokens, 0 for padding."""
    out = np.zeros(T, np.int32)
    offset = 0
    for r in requests:
        v = values(r)
        if v is not None:
            n = len(r.token_ids) if np.isscalar(v) else len(v)
            out[offset : offset + n] = v
        offset += len(r.token_ids)
    return out


def forward_inputs(shape: ForwardShape, requests: list[StepRequest], token_ids: list[list[int]], page_size: int,
                   uses_lora: bool) -> tuple:  # fmt: skip
    """(batch[, sampling of a multi-step decode][, lora_slots [T]]) of a forward program; the
    batch's token_ids are `token_ids` (each request's, as the device reads them)."""
    T, B, P = shape.num_tokens, shape.num_seqs, shape.pages_per_seq
    batch = build_batch(token_ids, [r.start for r in requests], [r.block_table for r in requests], page_size,
                        num_tokens=T, num_seqs=B, pages_per_seq=P, max_query_len=shape.max_query_len)  # fmt: skip
    host: tuple = (batch,)
    if shape.decode_steps > 1:
        host += (sampling_batch(requests, B, shape.sampling),)
    if shape.adapters and uses_lora:
        host += (_per_token(requests, T, lambda r: r.lora_slot),)  # each token's LoRA slot
    return host


def sampler_inputs(shape: SamplerShape, requests: list[StepRequest], batch: BatchMetadata,
                   bitmask_words: int = 0) -> tuple:  # fmt: skip
    """(sampling,) of a sampler program (`batch`: the step's, which "penalties" reads; a guided
    program's rows carry token bitmasks of `bitmask_words` words)."""
    words = bitmask_words if shape.guided else 0
    return (sampling_batch(requests, shape.num_seqs, shape.flavor, batch, shape.pages_per_seq, words),)


def head_inputs(shape: HeadShape, requests: list[StepRequest]) -> tuple:
    """(next_tokens [T],) of a head program: the token after each position of the prompt chunks
    that want prompt log-probabilities."""
    return (_per_token(requests, shape.num_tokens, lambda r: r.prompt_logprobs_next),)


def resample_inputs(shape: SamplerShape, requests: list[StepRequest], page_size: int,
                    bitmask_words: int = 0) -> np.ndarray:  # fmt: skip
    """The packed inputs of a sampler program run on host logits (edited by logits processors);
    the "penalties" flavor reads the requests' tables and lengths from their unpadded batch."""
    batch = None
    if shape.flavor == "penalties":
        batch = build_batch([r.token_ids for r in requests], [r.start for r in requests],
                            [r.block_table for r in requests], page_size, pages_per_seq=shape.pages_per_seq)  # fmt: skip
    return pack_host_inputs(sampler_inputs(shape, requests, batch, bitmask_words))


def abstract_host_inputs(shape, page_size: int, uses_lora: bool, bitmask_words: int = 0) -> tuple:
    """ShapeDtypeStructs of the host inputs of `shape`'s program: those of its padding example."""
    if isinstance(shape, HeadShape):
        example = head_inputs(shape, [])
    elif isinstance(shape, SamplerShape):
        no_batch = build_batch([], [], [], page_size, 1, shape.num_seqs, max(shape.pages_per_seq, 1), 1)
        example = sampler_inputs(shape, [], no_batch, bitmask_words)
    else:
        example = forward_inputs(shape, [], [], page_size, uses_lora)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), example)


# ---- one step ---------------------------------------------------------------------------------------
def plan_step(requests: list[StepRequest], decode_steps: int, buckets: Buckets, page_size: int,
              token_ids: list[list[int]], uses_adapters: bool, uses_lora: bool,
              bitmask_words: int = 0) -> tuple[StepPlan, list, BatchMetadata]:  # fmt: skip
    """The programs of a step, their packed host inputs: [forward's, its token ids[, sampler's
    [, head's]]] (`token_ids`: each request's, as the device reads them; `uses_lora`: the engine
    serves LoRA adapters), and the forward's host batch.

    A row whose bitmask is pending (`StepRequest.bitmask_pending`) defers the sampler: the plan
    says so and its inputs are packed later (`sampler_arrays`), once every bitmask is filled.

    `uses_adapters` (some token has a LoRA adapter or is a prompt adapter's virtual token): the
    step runs the `adapters` twin of its forward program, which also reads the adapter bank and a
    per-token LoRA slot (jaxllm/adapters/bank.py, jaxllm/layers/adapters.py); every other step
    runs the plain one, at the plain cost."""
    flavor = sampling_flavor(requests)
    if decode_steps > 1:
        if flavor == "penalties" or any(r.bias_slot or r.banned_tokens or r.want_last_logits or r.token_bitmask is not None
                                        or r.bitmask_pending or r.prompt_logprobs_next is not None
                                        or r.want_all_logits for r in requests):  # fmt: skip
            raise ValueError("decode_steps > 1 serves no penalties, bias, bans, grammars or logits")
    forward = buckets.forward_shape([len(r.token_ids) for r in requests], max(len(r.block_table) for r in requests),
                                    uses_adapters, decode_steps, flavor if decode_steps > 1 else "")  # fmt: skip
    host = forward_inputs(forward, requests, token_ids, page_size, uses_lora)
    batch = host[0]
    arrays = [pack_host_inputs(host), batch.token_ids]
    sampler = head = None
    deferred = False
    if decode_steps == 1:
        deferred = any(r.bitmask_pending for r in requests)
        guided = deferred or any(r.token_bitmask is not None for r in requests)
        sampler = buckets.sampler_shape(forward.num_seqs, flavor, forward.pages_per_seq, guided)
        want_all = any(r.want_all_logits for r in requests)
        if want_all or any(r.prompt_logprobs_next is not None for r in requests):
            if deferred:
                raise ValueError("a step whose sampler is deferred returns no prompt log-probabilities or logits")
            head = HeadShape(forward.num_tokens, want_all)
        if not deferred:
            arrays.append(pack_host_inputs(sampler_inputs(sampler, requests, batch, bitmask_words)))
        if head is not None:
            arrays.append(pack_host_inputs(head_inputs(head, requests)))
    plan = StepPlan(forward, sampler, head, any(r.want_last_logits for r in requests), deferred)
    return plan, arrays, batch


def sampler_arrays(plan: StepPlan, requests: list[StepRequest], batch: BatchMetadata,
                   bitmask_words: int) -> list[np.ndarray]:  # fmt: skip
    """The packed inputs of a deferred sampler (plan_step), its rows' bitmasks filled by now."""
    if any(r.bitmask_pending for r in requests):
        raise ValueError("a row's bitmask is still pending")
    return [pack_host_inputs(sampler_inputs(plan.sampler, requests, batch, bitmask_words))]


# ---- packing ----------------------------------------------------------------------------------------
def host_layout(tree, with_size: bool = False):
    """The static layout `unpack_host_inputs` (engine/programs.py) reads a packed `tree` of
    ShapeDtypeStructs with (and the buffer's size in uint32 words)."""
    leaves, treedef = jax.tree.flatten(tree)
    layout = (treedef, tuple((tuple(a.shape), np.dtype(a.dtype).name) for a in leaves))
    if not with_size:
        return layout
    return layout, sum(int(np.prod(shape, dtype=np.int64)) for shape, _ in layout[1])


def pack_host_inputs(tree) -> np.ndarray:
    """A step's host inputs (32-bit numpy leaves) as one uint32 buffer; `unpack_host_inputs` reads it
    back with the layout of the program's abstract inputs (the bits are copied, not converted)."""
    arrays = [np.ascontiguousarray(a) for a in jax.tree.leaves(tree)]
    for a in arrays:
        if a.dtype.itemsize != 4:
            raise TypeError(f"host inputs travel as 32-bit words; got a {a.dtype} leaf")
    return np.concatenate([a.view(np.uint32).ravel() for a in arrays] or [np.zeros(0, np.uint32)])
