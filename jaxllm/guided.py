"""Guided decoding: `GuidedDecodingParams` (TensorRT-LLM's names, vLLM's `choice` too) and the grammar
engine behind it, llguidance (the `guided` extra; it needs no torch).

A request's constraint is compiled to an llguidance grammar when it is submitted (a bad schema,
regex or grammar is a ValueError then, naming it); each of its sequences gets a matcher. Before a
step that samples a guided row, the host fills the row's token bitmask ([ceil(V / 32)] int32, bit
t of word t // 32 set where token t may follow) from its matcher; the bitmask travels with the
step's sampling inputs and the sampler program masks the logits on the device (layers/sampling.py),
so a grammar is data, not a compiled variant. A step dispatched ahead of the last one's read fills
its rows' bitmasks after that read, all at once on llguidance's threads, while the device computes
its forward (engine/engine.py, `Engine._sample_guided`). Each sampled token is then fed to the matcher; a
matcher that has stopped (its grammar is complete and no more tokens may follow) ends its sequence.

`LLM(guided_decoding_backend=...)` turns it on: 'llguidance', or 'xgrammar' (TensorRT-LLM's
default name, served by llguidance here, with a log line saying so); it compiles the sampler
programs' guided twins and converts the tokenizer once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Optional, Union

import numpy as np

logger = logging.getLogger(__name__)

BACKENDS = ("xgrammar", "llguidance")  # TensorRT-LLM's names for guided_decoding_backend
_FIELDS = ("json", "regex", "grammar", "json_object", "structural_tag", "choice")


@dataclasses.dataclass
class GuidedDecodingParams:
    """One constraint on a request's output (exactly one field set).

    json: a JSON schema (dict, JSON text, or a pydantic model class) the output conforms to.
    regex: a regular expression the whole output matches.
    grammar: an EBNF grammar (GBNF, as llama.cpp writes it) or a Lark grammar.
    json_object: any JSON object.
    structural_tag: TensorRT-LLM's / xgrammar's structural tag, as JSON text or a dict:
      {"structures": [{"begin": ..., "schema": {...}, "end": ...}], "triggers": [...]}: free text in
      which each structure, once its trigger appears, follows its schema.
    choice: the output is one of these strings (vLLM's guided_choice).
    """

    json: Optional[Union[str, dict, Any]] = None
    regex: Optional[str] = None
    grammar: Optional[str] = None
    json_object: bool = False
    structural_tag: Optional[Union[str, dict]] = None
    choice: Optional[list[str]] = None

    def __post_init__(self):
        chosen = [name for name in _FIELDS if getattr(self, name) not in (None, False)]
        if len(chosen) != 1:
            raise ValueError(f"GuidedDecodingParams needs exactly one of {', '.join(_FIELDS)}; got "
                             f"{', '.join(chosen) if chosen else 'none'}")  # fmt: skip
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or not all(isinstance(c, str) for c in self.choice)):  # fmt: skip
            raise ValueError(f"GuidedDecodingParams.choice={self.choice!r} is invalid; allowed: a non-empty list of strings")

    @property
    def kind(self) -> str:
        return next(name for name in _FIELDS if getattr(self, name) not in (None, False))


def bitmask_words(vocab_size: int) -> int:
    """int32 words of one row's token bitmask over a vocabulary of `vocab_size` tokens."""
    return -(-vocab_size // 32)


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ImportError("guided decoding needs llguidance: pip install 'jaxllm[guided]'") from None
    return llguidance


def _schema_text(schema) -> str:
    if isinstance(schema, str):
        try:
            json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"GuidedDecodingParams.json is not valid JSON ({e}): {schema[:200]!r}") from None
        return schema
    if isinstance(schema, dict):
        return json.dumps(schema)
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):  # a pydantic model class
        return json.dumps(schema.model_json_schema())
    raise TypeError(f"GuidedDecodingParams.json must be a JSON schema (dict or JSON text) or a pydantic model "
                    f"class; got {type(schema).__name__}")  # fmt: skip


def _structural_tag_grammar(tag) -> str:
    llg = _llguidance()
    try:
        spec = json.loads(tag) if isinstance(tag, str) else dict(tag)
        structures, triggers = spec["structures"], spec["triggers"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"GuidedDecodingParams.structural_tag={str(tag)[:200]!r} is invalid ({e}); allowed: "
                         '{"structures": [{"begin", "schema", "end"}, ...], "triggers": [...]}') from None
    tags = []
    for s in structures:
        trigger = next((t for t in triggers if s["begin"].startswith(t)), None)
        if trigger is None:
            raise ValueError(f"structural_tag: no trigger begins the structure {s['begin']!r}; triggers: {triggers!r}")
        tags.append(llg.StructTag(trigger=trigger, begin=s["begin"], grammar=s.get("schema") or {}, end=s["end"]))
    return llg.StructTag.to_grammar(tags, assume_special=False)  # triggers as text, special tokens or not


def grammar_of(params: GuidedDecodingParams) -> str:
    """The llguidance grammar of `params` (not yet checked against a tokenizer)."""
    llg = _llguidance()
    kind = params.kind
    if kind == "json":
        return llg.grammar_from("json_schema", _schema_text(params.json))
    if kind == "json_object":
        return llg.grammar_from("json_schema", '{"type": "object"}')
    if kind == "regex":
        return llg.grammar_from("regex", params.regex)
    if kind == "choice":
        return llg.grammar_from("choice", list(params.choice))
    if kind == "grammar":
        try:
            return llg.grammar_from("grammar", params.grammar)
        except ValueError as e:
            raise ValueError(f"GuidedDecodingParams.grammar is not a valid EBNF or Lark grammar: {e}") from None
    return _structural_tag_grammar(params.structural_tag)


class GuidedDecoder:
    """The LLM's grammar engine: its tokenizer in llguidance's form, grammars checked and matchers
    made against it, and each row's token bitmask filled."""

    def __init__(self, backend: str, tokenizer, vocab_size: int):
        if backend not in BACKENDS:
            raise ValueError(f"guided_decoding_backend={backend!r} is not supported; allowed: "
                             f"{', '.join(map(repr, BACKENDS))} or None")  # fmt: skip
        if backend == "xgrammar":
            logger.info("guided_decoding_backend='xgrammar': jaxllm serves guided decoding with llguidance")
        if tokenizer is None:
            raise ValueError("guided decoding needs the model's tokenizer (the LLM was made with skip_tokenizer_init=True)")
        llg = _llguidance()
        import llguidance.hf

        self.backend = backend
        self.vocab_size = vocab_size
        self.words = bitmask_words(vocab_size)
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self._llg = llg
        self._executor = llg.LLExecutor()  # llguidance's threads: a step's bitmasks filled in parallel

    def compile(self, params: GuidedDecodingParams) -> str:
        """`params`' grammar, checked against this tokenizer (ValueError naming what is wrong)."""
        grammar = grammar_of(params)
        is_error, messages = self._llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise ValueError(f"GuidedDecodingParams.{params.kind} cannot be compiled: {'; '.join(messages)}")
        return grammar

    def matcher(self, grammar: str):
        return self._llg.LLMatcher(self.tokenizer, grammar, log_level=0)

    def bitmask(self, matcher) -> np.ndarray:
        """[words] int32: the tokens that may follow now (all of them where the matcher failed:
        its sequence is then ended by `consume`)."""
        import llguidance.numpy as llg_np

        row = np.full((1, self.words), -1, np.int32)
        if not matcher.is_error():
            llg_np.fill_next_token_bitmask(matcher, row, 0)
        return row[0]


    def bitmasks(self, matchers: list) -> np.ndarray:
        """[len(matchers), words] int32: each matcher's `bitmask`, filled on llguidance's threads in
        parallel (a step's guided rows at once)."""
        import llguidance.numpy as llg_np

        rows = np.full((len(matchers), self.words), -1, np.int32)
        live = [(m, i) for i, m in enumerate(matchers) if not m.is_error()]
        if live:
            llg_np.fill_next_token_bitmask_par(self._executor, live, rows)
        return rows


def consume(matcher, token: int) -> str | None:
    """Feed `token` to `matcher`: None while the output may go on; "stop" once its grammar is
    complete (no token but the end may follow); an error message where it failed."""
    if not matcher.consume_token(token):
        return matcher.get_error() or f"token {token} is not allowed by the grammar"
    if matcher.is_stopped():
        return "stop"
    return None
