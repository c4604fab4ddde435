"""Hugging Face checkpoint (directory, hub id, or anything LLM loads) -> jaxllm directory (orbax).

    python -m converters.hf_to_jaxllm MODEL out_dir [--dtype auto|float32|bfloat16|float16] [--revision R]
"""

import argparse
import sys

from jaxllm.checkpoints.convert import to_jaxllm


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m converters.hf_to_jaxllm", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a Hugging Face directory, hub id, .gguf file or built-in name")
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--revision", default=None)
    args = parser.parse_args(argv)
    try:
        out = to_jaxllm(args.model, args.out_dir, args.dtype, args.revision)
    except (ValueError, FileNotFoundError) as e:
        print(f"hf_to_jaxllm: error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
