"""`jaxllm batch`: offline jobs over a file of requests (what `vllm run-batch` does), resumable and
data parallel.

  jaxllm batch MODEL -i requests.jsonl -o results.jsonl [engine arguments] [--data-parallel-size N]
                     [--served-model-name NAME] [--summary summary.json]

  requests.py   the input: OpenAI Batch API lines or plain {"prompt"} / {"messages"} lines, named and
                prepared (rendered, tokenized, checked) as the server would, before any engine starts
  output.py     the output: OpenAI batch result lines, appended and fsync'ed; a rerun truncates a
                torn last line and skips what is done; part files of several processes, merged
  job.py        engines sized to the file, data parallelism, the run
  report.py     the progress bar, compile and generation times, the summary

Each result's response body is the one `jaxllm serve` answers for the same body (both go through
jaxllm/serve/endpoints.py); a request the server would refuse gets the server's error and the job
goes on. From Python: `jaxllm.batch.run_batch(llm_or_model, requests, output_path=None, ...)`. The
request models need pydantic (the `serve` extra).
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    """Add `batch` to the `jaxllm` command's subparsers `sub`: MODEL and the engine group
    (jaxllm/cli_args.py), then the job's arguments."""
    from jaxllm.cli_args import add_engine_args, positive_int

    batch = sub.add_parser("batch", help="run a file of OpenAI batch requests offline (resumable, data parallel)",
                           description=__doc__.split("\n\n")[0])  # fmt: skip
    add_engine_args(batch, "default: sized to the job (its requests, at most the platform's default)")
    job = batch.add_argument_group("job")
    job.add_argument("-i", "--input", required=True,
                     help='a JSONL file: OpenAI Batch API lines {"custom_id", "method", "url", "body"}, or '
                          '{"prompt": ...} / {"messages": [...]} with sampling fields')  # fmt: skip
    job.add_argument("-o", "--output", required=True,
                     help="the results (OpenAI batch output lines); an existing file is resumed")
    job.add_argument("--data-parallel-size", "--dp", type=positive_int, default=None,
                     help="engines, each over --tensor-parallel-size devices (default 1; one per process when "
                          "started by `jaxllm launch --data-parallel`)")  # fmt: skip
    job.add_argument("--served-model-name", default=None, help="the model's name in the requests (default: MODEL)")
    job.add_argument("--summary", default=None, metavar="FILE.json", help="write the summary to this JSON file too")
    job.add_argument("--no-progress", action="store_true", help="no progress bar")
    batch.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    import importlib

    try:
        importlib.import_module("pydantic")
    except ImportError:
        print("jaxllm batch reads requests with the server's models (pydantic): pip install 'jaxllm[serve]'",
              file=sys.stderr)
        return 2
    from jaxllm.batch.report import format_summary
    from jaxllm.cli_args import llm_kwargs

    kwargs = llm_kwargs(args)
    del kwargs["model"]
    kwargs.setdefault("max_batch_size", None)  # None: sized to the job
    results = run_batch(args.model, args.input, args.output, model_name=args.served_model_name,
                        data_parallel_size=args.data_parallel_size, summary_path=args.summary,
                        progress=not args.no_progress, keep_results=False, **kwargs)  # fmt: skip
    if results.summary.get("processes", 1) == 1 or _is_leader():
        print(format_summary(results.summary))
    return 0


def _is_leader() -> bool:
    import jax

    return jax.process_index() == 0


def run_batch(model, requests, output_path=None, **kwargs):
    """Run a batch job; see jaxllm/batch/job.py:run_batch for the arguments."""
    from jaxllm.batch.job import run_batch as run

    return run(model, requests, output_path, **kwargs)
