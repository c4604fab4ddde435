"""Command-line checkpoint converters: `python -m converters.gguf_to_hf`, `python -m converters.hf_to_jaxllm`."""

import sys
from typing import Callable


def run(name: str, convert: Callable[[], str]) -> int:
    """Run a converter: print the written directory (0), or `name: error: ...` for a bad input (1)."""
    try:
        out = convert()
    except (ValueError, FileNotFoundError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0
