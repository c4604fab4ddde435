"""Incremental detokenization and stop-string matching (plain Python, on the engine thread).

Decoding a growing token list from scratch every step is quadratic, and decoding one token at a
time breaks multi-byte characters and the spacing rules of SentencePiece and byte-level BPE. The
incremental scheme decodes a short window: the text of tokens [prefix_offset, end) minus that of
[prefix_offset, read_offset); new text is released only once it no longer ends in an incomplete
character (U+FFFD). The window starts a few prompt tokens back, so the first generated token gets
the spacing it has in context.

With spaces_between_special_tokens (and special tokens kept), a special token is a word of its own:
the text between special tokens and the special tokens are joined with single spaces, as
transformers' and vLLM's slow detokenizers do. Spaces go only between the output's tokens: an output
that starts with a special token, or follows one, does not start with a space.
"""

from __future__ import annotations

from jaxllm.engine.sequence import Sequence

CONTEXT_TOKENS = 5  # prompt tokens decoded with the first output tokens, for spacing


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])

    def decode(self, ids: list[int], skip_special_tokens: bool, spaces_between_special_tokens: bool) -> str:
        if skip_special_tokens or not spaces_between_special_tokens or not self.special_ids:
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        # Special tokens as separate words: decode the runs between them, join with spaces.
        parts, run = [], []
        for token in ids:
            if token in self.special_ids:
                if run:
                    parts.append(self.tokenizer.decode(run))
                    run = []
                parts.append(self.tokenizer.decode([token]))
            else:
                run.append(token)
        if run:
            parts.append(self.tokenizer.decode(run))
        return " ".join(parts)

    def context_start(self, seq: Sequence, skip_special_tokens: bool, spaces_between_special_tokens: bool) -> int:
        """Where the window of the output's first tokens starts: a few prompt tokens back, or at the
        output itself where it meets the prompt at a special token (which needs no context for its
        spacing, and with spaces between special tokens, the context would join it with a space)."""
        ids, first = seq.token_ids, seq.num_prompt_tokens
        if (spaces_between_special_tokens and not skip_special_tokens and len(ids) > first
                and (ids[first] in self.special_ids or ids[first - 1] in self.special_ids)):  # fmt: skip
            return first
        # The context window never reaches back into a prompt adapter's virtual tokens.
        return max(seq.num_virtual_tokens, first - CONTEXT_TOKENS)

    def start(self, seq: Sequence) -> None:
        seq.detok_read_offset = seq.num_prompt_tokens
        # The context window never reaches back into a prompt adapter's virtual tokens.
        seq.detok_prefix_offset = max(seq.num_virtual_tokens, seq.num_prompt_tokens - CONTEXT_TOKENS)
        seq.text = ""

    def step(self, seq: Sequence, skip_special_tokens: bool, spaces_between_special_tokens: bool) -> str:
        """Extend seq.text with what its new tokens spell; returns the new text."""
        ids = seq.token_ids
        if seq.detok_read_offset == seq.num_prompt_tokens:
            seq.detok_prefix_offset = self.context_start(seq, skip_special_tokens, spaces_between_special_tokens)
        prefix = self.decode(ids[seq.detok_prefix_offset : seq.detok_read_offset], skip_special_tokens,
                             spaces_between_special_tokens)  # fmt: skip
        full = self.decode(ids[seq.detok_prefix_offset :], skip_special_tokens, spaces_between_special_tokens)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        if not full.startswith(prefix):
            # The window's decoding changed its own beginning (rare merges): fall back to the full
            # output decoding, keeping the text already published as the prefix.
            new = self.decode(seq.output_token_ids, skip_special_tokens, spaces_between_special_tokens)
            new = new[len(seq.text) :] if new.startswith(seq.text) else ""
        else:
            new = full[len(prefix) :]
        seq.text += new
        seq.detok_prefix_offset = seq.detok_read_offset
        seq.detok_read_offset = len(ids)
        return new

    def flush(self, seq: Sequence, skip_special_tokens: bool, spaces_between_special_tokens: bool) -> str:
        """At the end of a sequence, release text held back for an incomplete character."""
        if seq.detok_read_offset >= seq.num_tokens:
            return ""
        window = seq.token_ids[seq.detok_prefix_offset :]
        held = seq.token_ids[seq.detok_prefix_offset : seq.detok_read_offset]
        full = self.decode(window, skip_special_tokens, spaces_between_special_tokens)
        prefix = self.decode(held, skip_special_tokens, spaces_between_special_tokens)
        new = full[len(prefix) :] if full.startswith(prefix) else ""
        seq.text += new
        seq.detok_prefix_offset = seq.detok_read_offset = seq.num_tokens
        return new


def tokens_before(detokenizer: Detokenizer, seq: Sequence, index: int, skip_special_tokens: bool,
                  spaces_between_special_tokens: bool) -> int:  # fmt: skip
    """How many of `seq`'s output tokens spell text that ends at or before `index` of seq.text (the
    tokens that lie wholly before a stop string that starts there).

    The text of the first k output tokens is decoded as `Detokenizer.step` decodes it (after a few
    prompt tokens of context); k goes down from the end, so a stop string near the end costs a few
    decodes.
    """
    outputs = seq.output_token_ids
    if not outputs:
        return 0
    context_start = detokenizer.context_start(seq, skip_special_tokens, spaces_between_special_tokens)
    context = seq.token_ids[context_start : seq.num_prompt_tokens]
    decode = lambda tokens: detokenizer.decode(tokens, skip_special_tokens, spaces_between_special_tokens)  # noqa: E731
    head = decode(context)
    for k in range(len(outputs), 0, -1):
        full = decode(context + outputs[:k])
        text = full[len(head) :] if full.startswith(head) else decode(outputs[:k])
        if len(text) <= index:
            return k
    return 0


def find_stop_string(text: str, new_len: int, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop string that ends within the last `new_len` characters of `text`.

    Returns (index where it starts, the stop string), or None. Stop strings spanning token
    boundaries are found because the search covers the new text plus the length of the stop.
    """
    best = None
    for stop in stops:
        start = max(0, len(text) - new_len - len(stop) + 1)
        i = text.find(stop, start)
        if i != -1 and (best is None or i < best[0]):
            best = (i, stop)
    return best
