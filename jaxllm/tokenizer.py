"""Tokenizers: loaded through transformers from whatever `model=` or `tokenizer=` names.

A Hugging Face directory or hub id gives its own tokenizer files; a GGUF file gives the tokenizer
and chat template stored in its metadata (transformers builds them); a jaxllm-saved directory holds
the tokenizer it was saved with. A tokenizer instance is used as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jaxllm.checkpoints.loader import ResolvedModel, resolve


def load_tokenizer(source: Any, revision: str | None = None, trust_remote_code: bool = False,
                   tokenizer_mode: str = "auto"):  # fmt: skip
    """A transformers tokenizer from a ResolvedModel, a path/name/hub id, or an instance (returned as is)."""
    from transformers import AutoTokenizer

    if tokenizer_mode not in ("auto", "slow"):
        raise ValueError(f"tokenizer_mode={tokenizer_mode!r} is not supported; allowed: 'auto', 'slow'")
    if source is None:
        raise ValueError("no tokenizer source")
    if not isinstance(source, (str, Path, ResolvedModel)):
        if not (hasattr(source, "encode") and hasattr(source, "decode")):
            raise TypeError(f"tokenizer must be a path, a model name or a tokenizer with encode/decode, got {source!r}")
        return source
    resolved = source if isinstance(source, ResolvedModel) else resolve(source, revision)
    kwargs = {"trust_remote_code": trust_remote_code, "use_fast": tokenizer_mode == "auto"}
    if resolved.kind == "gguf":
        return AutoTokenizer.from_pretrained(str(resolved.path.parent), gguf_file=resolved.path.name, **kwargs)
    return AutoTokenizer.from_pretrained(str(resolved.path), **kwargs)
