"""GGUF -> Hugging Face directory (config.json, safetensors, tokenizer), usable by any tool.

    python -m converters.gguf_to_hf model.gguf out_dir [--dtype float32|bfloat16|float16]
"""

import argparse
import sys

from converters import run
from jaxllm.checkpoints.convert import gguf_to_hf


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m converters.gguf_to_hf", description=__doc__.splitlines()[0])
    parser.add_argument("gguf_file")
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", default="float32", help="dtype of the written tensors (default float32)")
    args = parser.parse_args(argv)
    return run("gguf_to_hf", lambda: gguf_to_hf(args.gguf_file, args.out_dir, args.dtype))


if __name__ == "__main__":
    sys.exit(main())
