"""Hugging Face Hub ids, resolved through huggingface_hub (revision, local cache, HF_HUB_OFFLINE)."""

from __future__ import annotations

from pathlib import Path

# Only what jaxllm reads: configs, tokenizers, chat templates and safetensors weights. Pickled
# weights are never fetched (they would be refused anyway; see hf.py).
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~"))


def resolve_hub_id(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot directory of `repo_id` at `revision`, downloaded or from the cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise FileNotFoundError(
            f"could not resolve {repo_id!r} (revision {revision or 'main'}) on the Hugging Face Hub or in its "
            f"local cache: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            "Pass a local directory or .gguf file, a built-in model name, or set HF_HUB_OFFLINE=1 to use "
            "only the cache."
        ) from None
