"""Tokenizers: loaded through transformers from whatever `model=` or `tokenizer=` names.

A Hugging Face directory or hub id gives its own tokenizer files; a jaxllm-saved directory holds
the tokenizer it was saved with; a tokenizer instance is used as it is.

A GGUF file gives the tokenizer and chat template stored in its metadata, built here without
torch: the metadata comes from jaxllm's own GGUF reader and is arranged exactly as transformers'
`get_gguf_tokenizer` arranges it (that function reads the file through transformers' GGUF reader,
which imports torch), then transformers' torch-free `convert_gguf_tokenizer` builds the backend
`tokenizers.Tokenizer`, wrapped in the tokenizer class `AutoTokenizer.from_pretrained(gguf_file=...)`
would pick. Building takes seconds (merges are recovered from a 262k vocabulary for Gemma), so the
result is saved under the user cache, `<cache root>/tokenizers/<key>/`, keyed by the GGUF file's
path, size and mtime and the transformers version, and later processes load it from there.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.checkpoints import gguf
from jaxllm.checkpoints.builtin import cache_root
from jaxllm.checkpoints.loader import ResolvedModel, resolve

logger = logging.getLogger(__name__)

# Bumped whenever what is cached (or how it is built) changes, so old entries are not reused.
TOKENIZER_CACHE_FORMAT = 1
# The first transformers release whose GGUF tokenizer this module reproduces (5.23 added the
# add_bos_token / add_eos_token keys and BOS default below to `get_gguf_tokenizer`).
MIN_TRANSFORMERS = "5.23"
_CONVERTER_MODULE = "transformers.integrations.gguf.gguf_tokenizer_mapping"

# llama.cpp metadata key (after "tokenizer.") -> transformers' name, split as `get_gguf_tokenizer`
# splits them: inputs of the backend builder, and keyword arguments of the tokenizer class.
_TOKENIZER_KEYS = {
    "ggml.model": "tokenizer_type",
    "ggml.pre": "pre_tokenizer_type",
    "ggml.tokens": "tokens",
    "ggml.scores": "scores",
    "ggml.token_type": "token_type",
    "ggml.merges": "merges",
    "ggml.precompiled_charsmap": "precompiled_charsmap",
    "ggml.bos_token_id": "bos_token_id",
    "ggml.eos_token_id": "eos_token_id",
    "ggml.unknown_token_id": "unk_token_id",
    "ggml.padding_token_id": "pad_token_id",
    "ggml.add_space_prefix": "add_prefix_space",
}
_TOKENIZER_CONFIG_KEYS = {
    "chat_template": "chat_template",
    "ggml.add_bos_token": "add_bos_token",
    "ggml.add_eos_token": "add_eos_token",
}
# Special token argument -> the "tokenizer.ggml.*" key holding its id.
_SPECIAL_TOKEN_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}
# Hugging Face model_type -> the tokenizer class AutoTokenizer picks for it (transformers'
# TOKENIZER_MAPPING_NAMES, TokenizersBackend where that has none). Importing that table imports
# transformers' config classes, and torch with them wherever torch is installed; a test keeps
# this copy equal to it. The class matters: GemmaTokenizer pads on the left and has a mask token.
_TOKENIZER_CLASSES = {
    "llama": "TokenizersBackend",
    "mistral": "TokenizersBackend",
    "qwen2": "Qwen2Tokenizer",
    "qwen3": "Qwen2Tokenizer",
    "gemma3_text": "GemmaTokenizer",
}
_DEFAULT_TOKENIZER_CLASS = "TokenizersBackend"
# The cache entry's record of how to rebuild the tokenizer around its saved tokenizer.json.
_BUILD_FILE = "jaxllm_gguf_tokenizer.json"


def load_tokenizer(source: Any, revision: str | None = None, trust_remote_code: bool = False,
                   tokenizer_mode: str = "auto"):  # fmt: skip
    """A transformers tokenizer from a ResolvedModel, a path/name/hub id, or an instance (returned as is)."""
    if tokenizer_mode not in ("auto", "slow"):
        raise ValueError(f"tokenizer_mode={tokenizer_mode!r} is not supported; allowed: 'auto', 'slow'")
    if source is None:
        raise ValueError("no tokenizer source")
    if not isinstance(source, (str, Path, ResolvedModel)):
        if not (hasattr(source, "encode") and hasattr(source, "decode")):
            raise TypeError(f"tokenizer must be a path, a model name or a tokenizer with encode/decode, got {source!r}")
        return source
    resolved = source if isinstance(source, ResolvedModel) else resolve(source, revision)
    if resolved.kind == "gguf":
        return gguf_tokenizer(resolved.path)
    from transformers import AutoTokenizer

    kwargs = {"trust_remote_code": trust_remote_code, "use_fast": tokenizer_mode == "auto"}
    return AutoTokenizer.from_pretrained(str(resolved.path), **kwargs)


# ---- GGUF tokenizers ---------------------------------------------------------------------------------


def _converter():
    """transformers' torch-free GGUF tokenizer builders (the module, imported directly: the package's
    lazy top-level names would import its reader, and torch)."""
    try:
        module = importlib.import_module(_CONVERTER_MODULE)
        module.convert_gguf_tokenizer  # noqa: B018  (the one name used from it)
    except (ImportError, AttributeError):
        import transformers

        raise ImportError(
            f"building a tokenizer from a GGUF file needs transformers>={MIN_TRANSFORMERS} "
            f"({_CONVERTER_MODULE}.convert_gguf_tokenizer); installed: transformers {transformers.__version__}"
        ) from None
    return module


def _listed(value: Any) -> Any:
    """A metadata value as transformers' GGUF reader gives it: numeric arrays as lists of Python numbers."""
    return value.tolist() if isinstance(value, np.ndarray) else value


def gguf_tokenizer_inputs(metadata: dict) -> tuple[str, dict, dict]:
    """(architecture, tokenizer_dict, tokenizer_config) from GGUF metadata, as transformers'
    `get_gguf_tokenizer` returns them for the same file."""
    architecture = metadata["general.architecture"]
    tokenizer = {name: _listed(metadata[f"tokenizer.{key}"]) for key, name in _TOKENIZER_KEYS.items()
                 if f"tokenizer.{key}" in metadata}  # fmt: skip
    config = {name: _listed(metadata[f"tokenizer.{key}"]) for key, name in _TOKENIZER_CONFIG_KEYS.items()
              if f"tokenizer.{key}" in metadata}  # fmt: skip
    tokenizer_type = tokenizer.get("tokenizer_type")
    if tokenizer_type == "llama":
        # Older files have no flag, and llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise.
        config.setdefault("add_bos_token", True)
    elif tokenizer_type == "gemma4":
        # The file sets the flag, but Gemma 4's chat template writes <bos> itself (transformers follows the
        # reference tokenizer here, not llama.cpp).
        config["add_bos_token"] = False
    for name, key in _SPECIAL_TOKEN_IDS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    return architecture, tokenizer, config


def _tokenizer_class_name(metadata: dict) -> str:
    model = gguf.hf_model_type(metadata)
    return _TOKENIZER_CLASSES.get(model[0] if model else "", _DEFAULT_TOKENIZER_CLASS)


def _gguf_tokenizer_parts(path: Path) -> tuple[str, Any, dict]:
    """(tokenizer class name, backend tokenizers.Tokenizer, constructor keyword arguments) for a GGUF file."""
    metadata = gguf.read_metadata(path)
    if "tokenizer.ggml.tokens" not in metadata:
        raise ValueError(f"{path}: the GGUF file has no tokenizer (no tokenizer.ggml.tokens in its metadata)")
    architecture, tokenizer_dict, tokenizer_config = gguf_tokenizer_inputs(metadata)
    backend, additional = _converter().convert_gguf_tokenizer(architecture, tokenizer_dict)
    return _tokenizer_class_name(metadata), backend, {**tokenizer_config, **additional}


def _construct(class_name: str, kwargs: dict, gguf_path: Path, **backend):
    """The tokenizer class around a backend given as tokenizer_object= or tokenizer_file=, as
    `from_pretrained(gguf_file=...)` constructs it (name_or_path is the file's directory there too)."""
    import transformers

    return getattr(transformers, class_name)(name_or_path=str(gguf_path.parent), **backend, **kwargs)


def build_gguf_tokenizer(path: Path):
    """The tokenizer a GGUF file describes, built from its metadata (no cache)."""
    class_name, backend, kwargs = _gguf_tokenizer_parts(Path(path))
    return _construct(class_name, kwargs, Path(path), tokenizer_object=backend)


def tokenizer_cache_dir(path: Path) -> Path:
    """Where the tokenizer built from GGUF file `path` is cached (whether or not it is there yet)."""
    import transformers

    path = Path(path).resolve()
    stat = path.stat()
    identity = json.dumps([str(path), stat.st_size, stat.st_mtime_ns, transformers.__version__, TOKENIZER_CACHE_FORMAT])
    return cache_root() / "tokenizers" / hashlib.sha256(identity.encode()).hexdigest()


def _load_cached(directory: Path, gguf_path: Path):
    """The tokenizer cached in `directory`, or None when there is none or it cannot be loaded.

    The entry is save_pretrained's directory plus `_BUILD_FILE`, the class and the arguments the
    tokenizer was built with: it is rebuilt with them around the saved backend, because a
    save_pretrained/from_pretrained round trip does not keep everything (Gemma's add_bos_token) and
    takes twice as long for a 262k vocabulary.
    """
    build_file = directory / _BUILD_FILE
    if not build_file.is_file():
        return None
    try:
        build = json.loads(build_file.read_text())
        if build.get("format") != TOKENIZER_CACHE_FORMAT:
            raise ValueError(f"format {build.get('format')!r}, expected {TOKENIZER_CACHE_FORMAT}")
        backend_file = directory / "tokenizer.json"
        if not backend_file.is_file():  # the class would quietly build an empty vocabulary instead
            raise FileNotFoundError(f"{backend_file} is missing")
        return _construct(build["tokenizer_class"], build["kwargs"], gguf_path, tokenizer_file=str(backend_file))
    except Exception as e:  # a damaged entry (truncated file, edited json) is rebuilt, never fatal
        logger.warning("tokenizer cache entry %s cannot be loaded (%s: %s); rebuilding it", directory,
                       type(e).__name__, e)  # fmt: skip
        shutil.rmtree(directory, ignore_errors=True)  # entries appear whole (renamed into place), so this one is bad
        return None


def _save_cached(tokenizer, class_name: str, kwargs: dict, directory: Path, gguf_path: Path) -> None:
    """Save into a temporary directory beside `directory`, then rename it onto `directory`. A concurrent
    writer that renamed first wins (both wrote the same tokenizer); failing to write is not fatal."""
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    except OSError as e:
        logger.warning("cannot write the tokenizer cache under %s (%s); continuing without it", directory.parent, e)
        return
    try:
        tokenizer.save_pretrained(str(staging))
        build = {"format": TOKENIZER_CACHE_FORMAT, "gguf_file": str(gguf_path), "tokenizer_class": class_name,
                 "kwargs": kwargs}  # fmt: skip
        (staging / _BUILD_FILE).write_text(json.dumps(build, indent=1))
        os.rename(staging, directory)  # fails if a concurrent writer's entry is already there
    except (OSError, TypeError, ValueError) as e:  # TypeError, ValueError: arguments json cannot write
        if not (directory / _BUILD_FILE).is_file():
            logger.warning("cannot write the tokenizer cache entry %s (%s); continuing without it", directory, e)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def gguf_tokenizer(path: Path):
    """The tokenizer of GGUF file `path`: from the user cache, else built from the metadata and cached."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    directory = tokenizer_cache_dir(path)
    tokenizer = _load_cached(directory, path)
    if tokenizer is not None:
        logger.debug("tokenizer of %s loaded from %s", path, directory)
        return tokenizer
    logger.info("building the tokenizer of %s from its GGUF metadata (cached in %s)", path.name, directory)
    class_name, backend, kwargs = _gguf_tokenizer_parts(path)
    tokenizer = _construct(class_name, kwargs, path, tokenizer_object=backend)
    _save_cached(tokenizer, class_name, kwargs, directory, path)
    return tokenizer
