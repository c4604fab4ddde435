"""The `jaxllm` command.

  jaxllm generate "PROMPT" [--model M] [--max-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed S]
  jaxllm generate --input-file prompts.txt      one prompt per line, generated as one batch
  jaxllm chat [--model M]                       a conversation with the model's chat template
  jaxllm models                                 the built-in models
  jaxllm serve MODEL [--host H] [--port P] ...  an OpenAI-compatible HTTP server (the `serve` extra)
  jaxllm bench {throughput,latency,serve} ...   benchmarks (jaxllm/bench/)
  jaxllm batch MODEL -i IN.jsonl -o OUT.jsonl    offline OpenAI batch jobs, resumable, data parallel (jaxllm/batch/)

A single prompt streams to the terminal as tokens arrive. Prompts are wrapped in the model's chat
template when it has one (--raw turns that off). The engine is sized to the job (as many sequences
as there are prompts), so it has fewer programs to prepare; start-up phases are logged at INFO
(JAXLLM_LOG=WARNING quiets them) to standard error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from jaxllm import batch, bench
from jaxllm import chat as chat_lib
from jaxllm.checkpoints.builtin import BUILTIN_MODELS, DEFAULT_MODEL


def _add_engine_args(p) -> None:
    """The LLM() arguments every command takes (a parser or an argument group)."""
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--backend", default=None,
                   help="attention backend: xla | pallas | pallas_interpret (default: pallas on GPU, xla on CPU)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"built-in name, local directory, .gguf file or hub id (default: {DEFAULT_MODEL})")
    _add_engine_args(p)
    p.add_argument("--max-tokens", type=int, default=256, help="tokens to generate (default 256)")
    p.add_argument("--temperature", type=float, default=None, help="0 or unset: greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--system", default=None, help="a system message for the chat template")  # fmt: skip


def _sampling_params(args):
    from jaxllm import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
    )


def _messages(system: str | None, text: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def _format(llm, args, text: str):
    """The prompt of `text`: plain with --raw or without a chat template, else the rendered chat."""
    tok = llm.tokenizer
    if args.raw or not getattr(tok, "chat_template", None):
        return text
    return chat_lib.render(tok, _messages(args.system, text))


def _load(args, num_sequences: int | None = None):
    """The LLM of the command; `num_sequences`, the most it will run at once (the default engine
    size when None)."""
    from jaxllm import LLM

    kwargs = {} if num_sequences is None else {"max_batch_size": min(num_sequences, 2048)}
    return LLM(model=args.model, dtype=args.dtype, backend=args.backend, **kwargs)


def _stream(llm, prompt, params) -> str:
    text = ""
    for partial in llm.generate_async(prompt, params, streaming=True):
        diff = partial.outputs[0].text_diff
        text += diff
        sys.stdout.write(diff)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return text


def cmd_generate(args) -> int:
    if args.input_file:
        with open(args.input_file, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
        if not prompts:
            print(f"{args.input_file}: no prompts", file=sys.stderr)
            return 2
    elif args.prompt:
        prompts = [args.prompt]
    else:
        print("give a PROMPT or --input-file", file=sys.stderr)
        return 2
    params = _sampling_params(args)
    with _load(args, len(prompts) * params.best_of) as llm:
        if len(prompts) == 1:
            _stream(llm, _format(llm, args, prompts[0]), params)
        else:
            outputs = llm.generate([_format(llm, args, p) for p in prompts], params, use_tqdm=True)
            for prompt, out in zip(prompts, outputs):
                print(f"### {prompt}\n{out.outputs[0].text}\n")
    return 0


def cmd_chat(args) -> int:
    params = _sampling_params(args)
    with _load(args, params.best_of) as llm:
        tok = llm.tokenizer
        if not getattr(tok, "chat_template", None):
            print(f"{args.model} has no chat template; use `jaxllm generate`", file=sys.stderr)
            return 2
        history = [{"role": "system", "content": args.system}] if args.system else []
        print("chat with the model; an empty line or Ctrl-D ends it", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if not line.strip():
                break
            history.append({"role": "user", "content": line})
            prompt = chat_lib.render(tok, history)
            reply = _stream(llm, prompt, params)
            history.append({"role": "assistant", "content": reply})
    return 0


def cmd_models(args) -> int:
    for name, spec in BUILTIN_MODELS.items():
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name}{default}: {spec.description}")
    return 0


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    """`jaxllm serve`'s flags: the server's, then LLM() arguments under their names."""
    p.add_argument("model", help="built-in name, local directory, .gguf file or hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on every route but /health (default: $JAXLLM_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: MODEL)")
    p.add_argument("--max-body-bytes", type=int, default=None, help="larger request bodies get 413 (default 4 MiB)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may take to finish after SIGTERM (default 30)")
    _add_engine_args(p)
    p.add_argument("--tokenizer", default=None, help="a tokenizer other than the model's")
    p.add_argument("--revision", default=None, help="the hub revision of MODEL")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--max-num-tokens", type=int, default=None)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--kv-cache-free-gpu-memory-fraction", type=float, default=None,
                   help="KvCacheConfig.free_gpu_memory_fraction (GPU only)")
    p.add_argument("--extra-llm-api-options", default=None, metavar="FILE.yaml",
                   help="a YAML mapping of further LLM() arguments (TensorRT-LLM's flag); the flags above win")


def _llm_kwargs(args) -> dict:
    """LLM()'s keyword arguments from `jaxllm serve`'s flags and its --extra-llm-api-options file."""
    kwargs: dict = {}
    if args.extra_llm_api_options:
        import yaml  # PyYAML, a dependency of transformers

        with open(args.extra_llm_api_options, encoding="utf-8") as f:
            extra = yaml.safe_load(f) or {}
        if not isinstance(extra, dict):
            raise ValueError(f"{args.extra_llm_api_options}: expected a mapping of LLM() arguments, "
                             f"got {type(extra).__name__}")  # fmt: skip
        kwargs.update(extra)
    flags = {"model": args.model, "tokenizer": args.tokenizer, "revision": args.revision, "backend": args.backend,
             "max_batch_size": args.max_batch_size, "max_num_tokens": args.max_num_tokens,
             "max_seq_len": args.max_seq_len}  # fmt: skip
    kwargs.update({k: v for k, v in flags.items() if v is not None})
    if args.dtype != "auto" or "dtype" not in kwargs:
        kwargs["dtype"] = args.dtype
    if args.tensor_parallel_size != 1 or "tensor_parallel_size" not in kwargs:
        kwargs["tensor_parallel_size"] = args.tensor_parallel_size
    if args.trust_remote_code:
        kwargs["trust_remote_code"] = True
    if args.kv_cache_free_gpu_memory_fraction is not None:
        kv = dict(kwargs.get("kv_cache_config") or {})
        kv["free_gpu_memory_fraction"] = args.kv_cache_free_gpu_memory_fraction
        kwargs["kv_cache_config"] = kv
    return kwargs


def cmd_serve(args) -> int:
    import importlib

    try:
        for name in ("fastapi", "uvicorn", "prometheus_client"):
            importlib.import_module(name)
    except ImportError as e:
        print(f"jaxllm serve needs the serve extra ({e.name} is missing): pip install 'jaxllm[serve]'", file=sys.stderr)
        return 2
    from jaxllm import LLM
    from jaxllm.serve import app as app_lib
    from jaxllm.serve import server

    kwargs = _llm_kwargs(args)
    state = app_lib.ServerState(model_name=args.served_model_name or args.model,
                                api_key=args.api_key or os.environ.get("JAXLLM_API_KEY"),
                                max_body_bytes=args.max_body_bytes or app_lib.DEFAULT_MAX_BODY_BYTES)  # fmt: skip
    return server.run(state, args.host, args.port, args.drain_timeout, load_llm=lambda: LLM(**kwargs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm", description="TensorRT-LLM's LLM API on JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate from a prompt (streams) or a file of prompts (a batch)")
    gen.add_argument("prompt", nargs="?", help="the prompt")
    gen.add_argument("--input-file", help="a file with one prompt per line")
    _add_model_args(gen)
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="hold a conversation using the model's chat template")
    _add_model_args(chat)
    chat.set_defaults(func=cmd_chat)
    models = sub.add_parser("models", help="list the built-in models")
    models.set_defaults(func=cmd_models)
    bench.add_parser(sub, _add_engine_args)
    batch.add_parser(sub, lambda p: bench.add_engine_args(p, _add_engine_args))
    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs pip install 'jaxllm[serve]')")
    _add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)
    args = parser.parse_args(argv)
    log = logging.getLogger("jaxllm")
    for old in [h for h in log.handlers if getattr(h, "jaxllm_cli", False)]:  # main() run before in this process
        log.removeHandler(old)
    handler = logging.StreamHandler()  # on the current sys.stderr
    handler.setFormatter(logging.Formatter("[jaxllm] %(message)s"))
    handler.jaxllm_cli = True
    log.addHandler(handler)
    log.setLevel(os.environ.get("JAXLLM_LOG", "INFO").upper())
    log.propagate = False
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError, ImportError) as e:
        print(f"jaxllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
