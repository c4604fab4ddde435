"""The engine's command-line flags, shared by `jaxllm serve`, `jaxllm bench` and `jaxllm batch`:
one argument group of LLM() arguments under their names (TensorRT-LLM's flags), validated by
argparse, and `llm_kwargs`, which turns the parsed flags (and `--extra-llm-api-options FILE.yaml`,
TensorRT-LLM's way of passing any other LLM() argument) into LLM()'s keyword arguments.

Also the argparse number types the commands use (`positive_int`, `fraction`, ...).
"""

from __future__ import annotations

import argparse
import math

from jaxllm.guided import BACKENDS as GUIDED_BACKENDS

# --quantization (vLLM's flag) -> QuantConfig fields; 'gguf' (a GGUF file's quantized blocks as they
# are) is read from the file: jaxllm/checkpoints/gguf.py, blocks_quant_config.
QUANTIZATION_FLAGS = {"fp8": {"quant_algo": "FP8"}, "w8a16": {"quant_algo": "W8A16"}, "w4a16": {"quant_algo": "W4A16"},
                      "gguf": None}  # fmt: skip


def _number(kind: type, what: str, ok):
    """An argparse type: `kind(text)` when `ok(value)`, else an error saying `what` was expected."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


positive_int = _number(int, "a positive integer", lambda v: v >= 1)
non_negative_int = _number(int, "a non-negative integer", lambda v: v >= 0)
positive_float = _number(float, "a positive number", lambda v: v > 0 and not math.isnan(v))
non_negative_float = _number(float, "a non-negative number", lambda v: v >= 0 and not math.isnan(v))
port = _number(int, "a port number in 0..65535", lambda v: 0 <= v <= 65535)


def fraction(text: str) -> float:
    """An argparse type: a number in (0, 1)."""
    value = positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text}")
    return value


def add_dtype_backend(p) -> None:
    """--dtype and --backend, the LLM() arguments every command takes (a parser or a group)."""
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights' and activations' dtype (default auto: the checkpoint's)")  # fmt: skip
    p.add_argument("--backend", default=None,
                   help="attention backend: xla | pallas | pallas_interpret (default: pallas on GPU, xla on CPU)")


def add_engine_args(p: argparse.ArgumentParser, max_batch_size_help: str | None = None) -> None:
    """The positional MODEL and the group of LLM() arguments of the engine commands."""
    p.add_argument("model", help="built-in name, local directory, .gguf file or hub id")
    g = p.add_argument_group("engine (LLM() arguments)")
    add_dtype_backend(g)
    g.add_argument("--tokenizer", default=None, help="a tokenizer other than the model's")
    g.add_argument("--revision", default=None, help="the hub revision of MODEL")
    g.add_argument("--trust-remote-code", action="store_true")
    g.add_argument("--tensor-parallel-size", "--tp", type=positive_int, default=None, help="devices per engine (1)")
    g.add_argument("--max-batch-size", type=positive_int, default=None, help=max_batch_size_help)
    g.add_argument("--max-num-tokens", type=positive_int, default=None)
    g.add_argument("--max-seq-len", type=positive_int, default=None)
    g.add_argument("--load-format", choices=("auto", "dummy"), default=None, help="dummy: random weights")
    g.add_argument("--skip-tokenizer-init", action="store_true", help="no tokenizer (token-id prompts only)")
    g.add_argument("--num-scheduler-steps", type=positive_int, default=None, help="decodes per dispatch (8)")
    g.add_argument("--disable-overlap-scheduler", action="store_true")
    g.add_argument("--max-beam-width", type=positive_int, default=None,
                   help="the widest beam search a request may ask for (1: none)")
    g.add_argument("--guided-decoding-backend", choices=GUIDED_BACKENDS, default=None,
                   help="turn on guided decoding (response_format, guided_json, ...); both served by llguidance")
    g.add_argument("--speculative-config", type=_json_mapping, default=None, metavar="JSON",
                   help="speculative decoding (vLLM's flag): '{\"method\": \"ngram\", \"num_speculative_tokens\": 4}' "
                        "or TensorRT-LLM's '{\"decoding_type\": \"NGram\", \"max_draft_len\": 4}'")
    g.add_argument("--kv-cache-free-gpu-memory-fraction", type=fraction, default=None,
                   help="KvCacheConfig.free_gpu_memory_fraction (GPU only)")
    g.add_argument("--kv-cache-dtype", default=None, choices=("auto", "float32", "bfloat16", "float16", "fp8"),
                   help="KvCacheConfig.dtype (fp8: float8 E4M3, about twice the tokens of bf16)")
    g.add_argument("--quantization", default=None, choices=tuple(QUANTIZATION_FLAGS),
                   help="quantize the weights as they load: QuantConfig(quant_algo='FP8', 'W8A16' or 'W4A16') (vLLM's flag; "
                        "a ModelOpt FP8 checkpoint is read as it is without it); gguf: a .gguf file's numbers as stored: mostly "
                        "4-bit blocks (Q4_0, Q4_1, Q4_K) kept as int4 (W4A16 in asymmetric groups of 32), other "
                        "projections in --dtype; else its blocks (Q5_0, Q5_1, Q5_K, Q6_K, Q8_0 and 4-bit) kept as "
                        "int8 (W8A16_GPTQ in groups of 16 or 32)")
    g.add_argument("--calib-dataset", default=None, metavar="PATH",
                   help="calibrate FP8's static input scales and the fp8 KV cache's K/V scales on this local text "
                        "as a float checkpoint loads (CalibConfig.calib_dataset: a .txt, .jsonl or .json file, or a "
                        "directory of them; with --quantization fp8 and/or --kv-cache-dtype fp8)")
    g.add_argument("--calib-batches", type=int, default=None, metavar="N",
                   help="CalibConfig.calib_batches: the most samples calibration runs (default 512)")
    g.add_argument("--extra-llm-api-options", default=None, metavar="FILE.yaml",
                   help="a YAML mapping of further LLM() arguments (TensorRT-LLM's flag); the flags above win")


def _json_mapping(text: str) -> dict:
    """An argparse type: a JSON object."""
    import json

    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _extra_options(path: str) -> dict:
    import yaml  # PyYAML, a dependency of transformers

    with open(path, encoding="utf-8") as f:
        extra = yaml.safe_load(f) or {}
    if not isinstance(extra, dict):
        raise ValueError(f"{path}: expected a mapping of LLM() arguments, got {type(extra).__name__}")
    return extra


def llm_kwargs(args, **defaults) -> dict:
    """LLM()'s keyword arguments from the flags of `add_engine_args`: the --extra-llm-api-options
    file, then `defaults` (the command's own, e.g. a batch size sized to the job) where the file
    does not set them, then every flag given on the command line."""
    kwargs = _extra_options(args.extra_llm_api_options) if args.extra_llm_api_options else {}
    for name, value in defaults.items():
        kwargs.setdefault(name, value)
    flags = {"model": args.model, "tokenizer": args.tokenizer, "revision": args.revision, "backend": args.backend,
             "tensor_parallel_size": args.tensor_parallel_size, "max_batch_size": args.max_batch_size,
             "max_num_tokens": args.max_num_tokens, "max_seq_len": args.max_seq_len, "load_format": args.load_format,
             "num_scheduler_steps": args.num_scheduler_steps, "max_beam_width": args.max_beam_width,
             "guided_decoding_backend": args.guided_decoding_backend,
             "speculative_config": args.speculative_config}  # fmt: skip
    kwargs.update({k: v for k, v in flags.items() if v is not None})
    if args.dtype != "auto" or "dtype" not in kwargs:
        kwargs["dtype"] = args.dtype
    for name in ("trust_remote_code", "skip_tokenizer_init", "disable_overlap_scheduler"):
        if getattr(args, name):
            kwargs[name] = True
    if args.kv_cache_free_gpu_memory_fraction is not None:
        _set_field(kwargs, "kv_cache_config", free_gpu_memory_fraction=args.kv_cache_free_gpu_memory_fraction)
    if args.kv_cache_dtype is not None:
        _set_field(kwargs, "kv_cache_config", dtype=args.kv_cache_dtype)
    if args.quantization == "gguf":  # the file's numbers as stored: its blocks kept as int4 or int8
        from jaxllm.checkpoints import gguf, loader

        resolved = loader.resolve(kwargs["model"])
        if resolved.kind != "gguf":
            raise ValueError(f"--quantization gguf serves a .gguf file's quantized blocks; {kwargs['model']!r} is a "
                             f"{resolved.kind} checkpoint; allowed there: --quantization fp8, w8a16 or w4a16")  # fmt: skip
        _set_field(kwargs, "quant_config", **gguf.blocks_quant_config(resolved.path))
    elif args.quantization is not None:
        _set_field(kwargs, "quant_config", **QUANTIZATION_FLAGS[args.quantization])
    if args.calib_dataset is not None:
        _set_field(kwargs, "calib_config", calib_dataset=args.calib_dataset)
    if args.calib_batches is not None:
        _set_field(kwargs, "calib_config", calib_batches=args.calib_batches)
    return kwargs


def _set_field(kwargs: dict, name: str, **fields) -> None:
    """kwargs[name] (a config, its fields as a dict, or absent) with `fields` set: a flag wins over
    the --extra-llm-api-options file and the command's defaults."""
    config = kwargs.get(name) or {}
    if isinstance(config, dict):
        kwargs[name] = dict(config, **fields)
    else:  # a config object given by a caller's defaults
        import dataclasses

        kwargs[name] = dataclasses.replace(config, **fields)
