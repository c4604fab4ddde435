"""One scheduled sequence's row of a step, as the runner takes it (`StepRequest`): its tokens and
pages, its sampling settings when the row samples, and which logits and log-probabilities the
step returns for it (plain Python)."""

from __future__ import annotations

from jaxllm.engine.step_inputs import StepRequest
from jaxllm.engine.sequence import Sequence


def step_request(seq: Sequence, n: int, start: int | None = None, samples: bool | None = None,
                 defer_bitmask: bool = False) -> StepRequest:  # fmt: skip
    """The row of `seq` computing its next `n` tokens (a prefill chunk, or 1 for a decode); it
    samples only when the chunk reaches the sequence's end. (`start`, `samples`: a verifying row's;
    `defer_bitmask`: a guided row's bitmask is filled later, `StepRequest.bitmask_pending`.)"""
    request, params = seq.request, seq.request.params
    if start is None:
        start = seq.num_computed
    if samples is None:
        samples = start + n == seq.num_tokens
    # The block table is the sequence's own list, not a copy: pages given after this (a multi-step
    # decode's) are in it when the step is packed, and nothing edits it before then.
    r = StepRequest(token_ids=seq.token_ids[start : start + n], start=start, block_table=seq.block_table,
                    lora_slot=seq.lora_slot, prompt_adapter_slot=seq.prompt_adapter_slot)  # fmt: skip
    num_virtual, num_prompt = seq.num_virtual_tokens, seq.num_prompt_tokens
    if not samples:
        r.temperature = 0.0
    else:
        r.temperature = params.effective_temperature
        r.top_k = params.top_k or 0
        r.top_p = 1.0 if params.top_p is None else float(params.top_p)
        r.min_p = params.min_p or 0.0
        r.seed = seq.seed
        r.counter = seq.num_output_tokens
        r.num_logprobs = params.logprobs or 0
        if request.beam is not None:  # the candidates of the beam step (engine/beam_search.py)
            r.num_logprobs = max(r.num_logprobs, 2 * request.beam.width)
        r.bias_slot = seq.bias_slot
        r.banned_tokens = banned_tokens(seq) or None
        r.prompt_len, r.first_position = num_prompt, num_virtual
        if params.uses_penalties:
            r.repetition_penalty = params.repetition_penalty or 1.0
            r.presence_penalty = params.presence_penalty or 0.0
            r.frequency_penalty = params.frequency_penalty or 0.0
        r.want_last_logits = params.wants_logits
        if seq.guide is not None and defer_bitmask:
            r.bitmask_pending = True
        elif seq.guide is not None:
            r.token_bitmask = request.guided_decoder.bitmask(seq.guide)
    # Prompt log-probabilities and context logits cover the user's prompt: positions from
    # num_virtual on (a virtual position's row is computed and skipped; its next token is 0).
    first = max(start, num_virtual)
    end = min(start + n, num_prompt - 1)
    if (params.prompt_logprobs is not None and seq.index == 0 and first < end
            and len(request.prompt_logprobs) == first - num_virtual):  # fmt: skip
        r.prompt_logprobs_next = [0] * (first - start) + seq.token_ids[first + 1 : end + 1]
        r.num_logprobs = max(r.num_logprobs, params.prompt_logprobs)
    if params.return_context_logits and seq.index == 0 and first < min(start + n, num_prompt):
        # Only chunks that extend the rows gathered so far (a recompute after preemption doesn't).
        r.want_all_logits = sum(len(rows) for rows in request.context_logits_rows) == first - num_virtual
    return r


def verify_rows(seq: Sequence, n: int) -> list[StepRequest]:
    """Speculative decoding (jaxllm/speculative.py): the `n` one-token rows of `seq` computing its
    last token and its n - 1 drafts, each sampling at its own position with its own token index."""
    start, first = seq.num_computed, seq.num_output_tokens - seq.num_draft
    rows = [step_request(seq, 1, start + j, True) for j in range(n)]
    for j, r in enumerate(rows):
        r.counter = first + j
    return rows


def banned_tokens(seq: Sequence) -> list[int]:
    """Tokens banned at this step only: the end tokens while min_tokens is not reached, and the
    last token of each multi-token bad word whose prefix the sequence just generated (banned
    single tokens live in the request's bias row, engine/runner.py)."""
    request, params = seq.request, seq.request.params
    below_min = bool(params.min_tokens) and seq.num_output_tokens < params.min_tokens
    if not below_min and not request.bad_word_ids:
        return []
    banned: list[int] = list(request.stop_token_ids) if below_min else []
    tokens, real = seq.token_ids, len(seq.token_ids) - seq.num_virtual_tokens  # virtual tokens never match
    for word in request.bad_word_ids:
        k = len(word) - 1
        if k and k <= real and tokens[-k:] == list(word[:-1]):
            banned.append(word[-1])
    return sorted(set(banned))
