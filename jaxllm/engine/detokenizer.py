"""Incremental detokenization and stop-string matching (plain Python, on the engine thread).

Decoding a growing token list from scratch every step is quadratic, and decoding one token at a
time breaks multi-byte characters and the spacing rules of SentencePiece and byte-level BPE. The
incremental scheme decodes a short window: the text of tokens [prefix_offset, end) minus that of
[prefix_offset, read_offset); new text is released only once it no longer ends in an incomplete
character (U+FFFD). The window starts a few prompt tokens back, so the first generated token gets
the spacing it has in context.
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

    def start(self, seq: Sequence) -> None:
        seq.detok_read_offset = seq.num_prompt_tokens
        # The context window never reaches back into a prompt adapter's virtual tokens.
        seq.detok_prefix_offset = max(seq.num_virtual_tokens, seq.num_prompt_tokens - CONTEXT_TOKENS)
        seq.text = ""

    def step(self, seq: Sequence, skip_special_tokens: bool, spaces_between_special_tokens: bool) -> str:
        """Extend seq.text with what its new tokens spell; returns the new text."""
        ids = seq.token_ids
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
