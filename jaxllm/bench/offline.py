"""`jaxllm bench throughput` and `jaxllm bench latency`: an LLM in this process.

throughput: every request queued at once through `LLM.generate` (trtllm-bench throughput, vllm bench
throughput). Per-request times come from the outputs' perf metrics (`return_perf_metrics`: arrival,
first and last token, on the engine's monotonic clock). A warm-up pass of the same requests runs
first under another `cache_salt`, so the measured pass gets nothing from the prefix cache that it
would not get on its own; its figures are printed beside the measured ones, compile time and all,
and never subtracted from anything.

latency: one request at a time (batch 1), streamed; TTFT and the time per output token from the
arrival times of its tokens. With multi-step decoding (`num_scheduler_steps`) tokens arrive in runs,
so the inter-token gaps are bursty while TPOT, averaged over a request, is not.
"""

from __future__ import annotations

import time

from jaxllm.bench import datasets
from jaxllm.bench.report import RequestRecord, summarize, table, write_json
from jaxllm.cli_args import llm_kwargs
from jaxllm.engine import step_trace

WARMUP_SALT = "jaxllm-bench-warmup"  # the warm-up's prefix-cache namespace, apart from the measured pass's


def engine_kwargs(args, num_requests: int) -> dict:
    """LLM()'s arguments from the command line. The batch defaults to the request count (at most
    2,048): an engine sized to the job has fewer programs to prepare."""
    return llm_kwargs(args, max_batch_size=min(num_requests, 2048))


def load_requests(args, vocab: int | None) -> list[datasets.BenchRequest]:
    """The benchmark's requests from --dataset and its options; `vocab` bounds synthetic token ids
    (None: not known, so synthetic datasets are refused)."""
    if args.dataset not in ("random", "sharegpt-like"):
        return datasets.jsonl_requests(args.dataset, args.output_len, limit=args.num_requests)
    if vocab is None:
        raise ValueError(f"--dataset {args.dataset} makes token-id prompts: give --vocab-size (the model's vocabulary)")
    if vocab <= 20:
        raise ValueError(f"vocabulary size {vocab} is too small for synthetic prompts (token ids 10 .. vocab - 10)")
    n = args.num_requests or 100
    if args.dataset == "random":
        return datasets.fixed_requests(n, args.input_len, args.output_len, vocab, args.seed)
    return datasets.sharegpt_like_requests(n, vocab, args.seed, prompt_mean=args.sharegpt_input_mean,
                                           output_mean=args.sharegpt_output_mean, sigma=args.sharegpt_sigma,
                                           max_prompt=args.sharegpt_max_input, max_output=args.sharegpt_max_output)  # fmt: skip


def describe_dataset(args, requests: list[datasets.BenchRequest]) -> dict:
    """The dataset as the JSON file records it."""
    known = [r.prompt_len for r in requests if r.prompt_len is not None]
    out = {"name": args.dataset, "num_requests": len(requests), "seed": args.seed,
           "mean_output_len": sum(r.output_len for r in requests) / len(requests),
           "mean_prompt_len": sum(known) / len(known) if known else None}  # fmt: skip
    if args.dataset == "random":
        out.update(input_len=args.input_len, output_len=args.output_len)
    elif args.dataset == "sharegpt-like":
        out.update(input_mean=args.sharegpt_input_mean, output_mean=args.sharegpt_output_mean, sigma=args.sharegpt_sigma,
                   max_input=args.sharegpt_max_input, max_output=args.sharegpt_max_output)  # fmt: skip
    return out


def _prompt(request: datasets.BenchRequest):
    return request.prompt if isinstance(request.prompt, str) else {"prompt_token_ids": request.prompt}


def _params(request: datasets.BenchRequest):
    from jaxllm import SamplingParams

    return SamplingParams(max_tokens=request.output_len, ignore_eos=True, detokenize=False, return_perf_metrics=True)


def _record(output) -> RequestRecord:
    """A finished RequestOutput's measurements, from its perf metrics."""
    completion = output.outputs[0]
    times = (completion.request_perf_metrics or {}).get("timing_metrics", {})
    arrival, first, last = times.get("arrival_time"), times.get("first_token_time"), times.get("last_token_time")
    return RequestRecord(prompt_tokens=len(output.prompt_token_ids), output_tokens=len(completion.token_ids),
                         ttft=None if first is None else first - arrival,
                         latency=None if last is None else last - arrival)  # fmt: skip


def _check_text_prompts(has_tokenizer: bool, requests) -> None:
    if not has_tokenizer and any(isinstance(r.prompt, str) for r in requests):
        raise ValueError("the dataset has text prompts but the model has no tokenizer (--skip-tokenizer-init): "
                         "use prompt_token_ids or drop --skip-tokenizer-init")  # fmt: skip


def throughput_pass(llm, requests, cache_salt: str | None) -> dict:
    """Every request queued at once; the pass's summary."""
    started = time.monotonic()
    outputs = llm.generate([_prompt(r) for r in requests], [_params(r) for r in requests], use_tqdm=False,
                           cache_salt=cache_salt)  # fmt: skip
    duration = time.monotonic() - started
    return summarize([_record(o) for o in outputs], duration)


def _file_requests(args) -> list[datasets.BenchRequest] | None:
    """A JSONL dataset's requests, read and checked before the engine starts, so that a bad file
    costs no start-up (None for the synthetic datasets: they need the model's vocabulary)."""
    if args.dataset in ("random", "sharegpt-like"):
        return None
    requests = load_requests(args, None)
    _check_text_prompts(not args.skip_tokenizer_init, requests)
    return requests


def run_throughput(args) -> int:
    from jaxllm import LLM

    requests = _file_requests(args)
    num_requests = len(requests) if requests else (args.num_requests or 100)
    with LLM(**engine_kwargs(args, num_requests)) as llm:
        requests = requests or load_requests(args, llm.config.vocab_size)
        _check_text_prompts(llm.tokenizer is not None, requests)
        engine = llm._check_open()
        engine.trace_steps(args.breakdown)
        first = None if args.no_warmup else throughput_pass(llm, requests, WARMUP_SALT)
        first_steps = engine.trace_steps(args.breakdown)
        measured = throughput_pass(llm, requests, None)
        steps = engine.trace_steps(False)
    result = {"command": "throughput", "model": args.model, "engine_args": _json_safe(engine_kwargs(args, num_requests)),
              "dataset": describe_dataset(args, requests), "measured": measured, "first_pass": first}  # fmt: skip
    if args.breakdown:
        result["breakdown"] = {"measured": step_trace.breakdown(steps),
                               "first_pass": step_trace.breakdown(first_steps) if first else None}  # fmt: skip
    if args.output_json:  # first: a closed terminal pipe must not lose the results
        write_json(args.output_json, result)
    print(table(f"throughput: {args.model}, {len(requests)} requests", {"measured": measured, "first pass": first}))
    if args.breakdown:
        print("\nwhere the measured pass's time went (engine steps):")
        print(step_trace.table(result["breakdown"]["measured"]))
    return 0


def stream_one(llm, request: datasets.BenchRequest, cache_salt: str | None) -> RequestRecord:
    """One request streamed alone; its times on the wall clock."""
    started = time.monotonic()
    arrivals, count = [], 0
    for partial in llm.generate_async(_prompt(request), _params(request), streaming=True, cache_salt=cache_salt):
        now, tokens = time.monotonic(), len(partial.outputs[0].token_ids)
        if tokens > count:
            arrivals.append(now)
            count = tokens
    return RequestRecord(prompt_tokens=len(partial.prompt_token_ids), output_tokens=count,
                         ttft=arrivals[0] - started if arrivals else None,
                         latency=arrivals[-1] - started if arrivals else None,
                         itl=[b - a for a, b in zip(arrivals, arrivals[1:])])  # fmt: skip


def run_latency(args) -> int:
    from jaxllm import LLM

    requests = _file_requests(args)
    with LLM(**engine_kwargs(args, 1)) as llm:
        requests = requests or load_requests(args, llm.config.vocab_size)
        _check_text_prompts(llm.tokenizer is not None, requests)
        started = time.monotonic()
        warmup = [stream_one(llm, requests[i % len(requests)], WARMUP_SALT) for i in range(args.warmup)]
        warmup_s, started = time.monotonic() - started, time.monotonic()
        records = [stream_one(llm, r, None) for r in requests]
        duration = time.monotonic() - started
    measured = summarize(records, duration)
    first = summarize(warmup, warmup_s) if warmup else None
    result = {"command": "latency", "model": args.model, "engine_args": _json_safe(engine_kwargs(args, 1)),
              "dataset": describe_dataset(args, requests), "measured": measured, "first_pass": first}  # fmt: skip
    if args.output_json:
        write_json(args.output_json, result)
    print(table(f"latency (batch 1): {args.model}, {len(requests)} requests", {"measured": measured, "warm-up": first}))
    return 0


def _json_safe(kwargs: dict) -> dict:
    return {k: v if isinstance(v, (str, int, float, bool, type(None))) else repr(v) for k, v in kwargs.items()}
