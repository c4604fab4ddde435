"""One scheduled sequence's row of a step, as the runner takes it (`StepRequest`): its tokens and
pages, its sampling settings when the row samples, and which logits and log-probabilities the
step returns for it (plain Python)."""

from __future__ import annotations

from jaxllm.engine.step_inputs import StepRequest
from jaxllm.engine.sequence import Sequence


def sampling_fields(request) -> tuple:
    """The sampling settings every sampled row of `request` carries, fixed for its life: temperature,
    top_k, top_p, min_p, the log-probabilities it returns, its three penalties, whether it wants its
    logits; then whether a row may have tokens banned (`banned_tokens`) and whether a prompt chunk
    returns prompt log-probabilities or context logits. Made at its first row (`Request.row_fields`)."""
    params = request.params
    penalties = ((params.repetition_penalty or 1.0, params.presence_penalty or 0.0, params.frequency_penalty or 0.0)
                 if params.uses_penalties else (1.0, 0.0, 0.0))  # fmt: skip
    return (params.effective_temperature, params.top_k or 0, 1.0 if params.top_p is None else float(params.top_p),
            params.min_p or 0.0, params.logprobs or 0, *penalties, params.wants_logits,
            bool(params.min_tokens) or bool(request.bad_word_ids),
            params.prompt_logprobs is not None or bool(params.return_context_logits))  # fmt: skip


def step_request(seq: Sequence, n: int, start: int | None = None, samples: bool | None = None,
                 defer_bitmask: bool = False) -> StepRequest:  # fmt: skip
    """The row of `seq` computing its next `n` tokens (a prefill chunk, or 1 for a decode); it
    samples only when the chunk reaches the sequence's end. (`start`, `samples`: a verifying row's;
    `defer_bitmask`: a guided row's bitmask is filled later, `StepRequest.bitmask_pending`.) Made for
    every running sequence at every step: its request's fixed settings are read once
    (`sampling_fields`)."""
    request = seq.request
    tokens = seq.token_ids
    if start is None:
        start = seq.num_computed
    if samples is None:
        samples = start + n == len(tokens)
    fields = request.row_fields
    if fields is None:
        fields = request.row_fields = sampling_fields(request)
    # The block table is the sequence's own list, not a copy: pages given after this (a multi-step
    # decode's) are in it when the step is packed, and nothing edits it before then.
    if not samples:
        r = StepRequest(tokens[start : start + n], start, seq.block_table, lora_slot=seq.lora_slot,
                        prompt_adapter_slot=seq.prompt_adapter_slot)  # fmt: skip
    else:
        temperature, top_k, top_p, min_p, num_logprobs, repetition, presence, frequency, logits, bans, _ = fields
        if request.beam is not None:  # the candidates of the beam step (engine/beam_search.py)
            num_logprobs = max(num_logprobs, 2 * request.beam.width)
        r = StepRequest(tokens[start : start + n], start, seq.block_table, temperature, top_k, top_p, min_p, seq.seed,
                        len(tokens) - seq.num_prompt_tokens, num_logprobs, seq.bias_slot,
                        (banned_tokens(seq) or None) if bans else None, repetition, presence, frequency,
                        seq.num_prompt_tokens, seq.num_virtual_tokens, want_last_logits=logits, lora_slot=seq.lora_slot,
                        prompt_adapter_slot=seq.prompt_adapter_slot)  # fmt: skip
        if seq.guide is not None and defer_bitmask:
            r.bitmask_pending = True
        elif seq.guide is not None:
            r.token_bitmask = request.guided_decoder.bitmask(seq.guide)
    if not fields[-1]:
        return r
    # Prompt log-probabilities and context logits cover the user's prompt: positions from
    # num_virtual on (a virtual position's row is computed and skipped; its next token is 0).
    params, num_virtual, num_prompt = request.params, seq.num_virtual_tokens, seq.num_prompt_tokens
    first = max(start, num_virtual)
    end = min(start + n, num_prompt - 1)
    if (params.prompt_logprobs is not None and seq.index == 0 and first < end
            and len(request.prompt_logprobs) == first - num_virtual):  # fmt: skip
        r.prompt_logprobs_next = [0] * (first - start) + tokens[first + 1 : end + 1]
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
