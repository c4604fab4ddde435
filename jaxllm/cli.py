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
from jaxllm.cli_args import add_dtype_backend, add_engine_args, llm_kwargs, non_negative_float, port, positive_int


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"built-in name, local directory, .gguf file or hub id (default: {DEFAULT_MODEL})")
    add_dtype_backend(p)
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
            print(f"jaxllm: error: --input-file {args.input_file} holds no prompts (one a line)", file=sys.stderr)
            return 2
    elif args.prompt:
        prompts = [args.prompt]
    else:
        print("jaxllm: error: generate needs a PROMPT or --input-file FILE", file=sys.stderr)
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
    """`jaxllm serve`'s flags: MODEL and the engine's (jaxllm/cli_args.py), then the server's."""
    add_engine_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=port, default=8000, help="port to listen on (default 8000)")
    g.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on every route but /health (default: $JAXLLM_API_KEY)")
    g.add_argument("--served-model-name", default=None, help="the model's name in the API (default: MODEL)")
    g.add_argument("--max-body-bytes", type=positive_int, default=None,
                   help="larger request bodies get 413 (default 4 MiB)")
    g.add_argument("--drain-timeout", type=non_negative_float, default=30.0,
                   help="seconds in-flight requests may take to finish after SIGTERM (default 30)")


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

    kwargs = llm_kwargs(args)
    state = app_lib.ServerState(model_name=args.served_model_name or args.model,
                                api_key=args.api_key or os.environ.get("JAXLLM_API_KEY"),
                                max_body_bytes=args.max_body_bytes or app_lib.DEFAULT_MAX_BODY_BYTES)  # fmt: skip
    return server.run(state, args.host, args.port, args.drain_timeout, load_llm=lambda: LLM(**kwargs))


def build_parser() -> argparse.ArgumentParser:
    """The `jaxllm` command's parser."""
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
    bench.add_parser(sub)
    batch.add_parser(sub)
    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs pip install 'jaxllm[serve]')")
    _add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
        code = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe is caught below, not at the interpreter's exit
        return code
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError, ImportError) as e:
        print(f"jaxllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout's reader went away (`jaxllm generate ... | head`): stop quietly with a Unix tool's
        # status for SIGPIPE (128 + 13); stdout now points at devnull so the exit's flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
