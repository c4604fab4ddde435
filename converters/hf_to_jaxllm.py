"""Hugging Face checkpoint (directory, hub id, or anything LLM loads) -> jaxllm directory (orbax).

    python -m converters.hf_to_jaxllm MODEL out_dir [--dtype auto|float32|bfloat16|float16] [--revision R]
"""

import argparse
import sys

from converters import run
from jaxllm.checkpoints.convert import to_jaxllm


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m converters.hf_to_jaxllm", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a Hugging Face directory, hub id, .gguf file or built-in name")
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--revision", default=None)
    args = parser.parse_args(argv)
    return run("hf_to_jaxllm", lambda: to_jaxllm(args.model, args.out_dir, args.dtype, args.revision))


if __name__ == "__main__":
    sys.exit(main())
