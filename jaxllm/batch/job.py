"""Running a batch job: the engines sized to the file, data parallelism, resumption, progress and
the summary.

The order: read every request and prepare it as the server would (rendered, tokenized, checked:
jaxllm/batch/requests.py) with the model's tokenizer alone, before an engine exists; skip what the
output already holds (jaxllm/batch/output.py); then build the engines sized to what is left
(`size_engine`: max_seq_len the longest prompt + max_tokens, max_batch_size the sequences, the
token budget the prompts' tokens, each only where the caller leaves it unset), so that `LLM()`
compiles the programs of those shapes and no others before the first request (unless
JAXLLM_PRECOMPILE=0 defers each to its first use); the compile time is reported apart from the
generation time.

Data parallelism: `data_parallel_size` engines, each over `tensor_parallel_size` devices; request i
of the file goes to engine i mod N (deterministic, so a rerun shards the same way). Engines of one
process sit on disjoint sets of its local devices and share one event loop and one output file. In a
run of several processes (`jaxllm launch --data-parallel`, or SLURM: jax.distributed) each process
runs N / processes engines, writes its part file, and process 0 merges the parts after a barrier.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from jaxllm.batch import output as output_lib
from jaxllm.batch import report
from jaxllm.batch.requests import BatchItem, load_items, prepare
from jaxllm.engine.buckets import ProgramNeeds
from jaxllm.serve import endpoints
from jaxllm.serve.protocol import ServeError

logger = logging.getLogger("jaxllm")

WINDOW_PER_SLOT = 2  # requests in flight per engine: this many times its max_batch_size (the scheduler stays full)


class BatchResults(list):
    """The result lines of a job in input order (a list of dicts), with its `summary` (a dict)."""

    summary: dict


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where this process stands in a data-parallel job."""

    rank: int
    num_processes: int
    data_parallel_size: int

    @property
    def engines_per_process(self) -> int:
        return self.data_parallel_size // self.num_processes

    @property
    def engine_ids(self) -> range:
        """The global indices of this process's engines."""
        per = self.engines_per_process
        return range(self.rank * per, (self.rank + 1) * per)


def process_layout(data_parallel_size: int | None) -> Layout:
    """The job's layout: one process, or the processes of a jax.distributed run (one each by default)."""
    import jax

    from jaxllm import distributed

    multi = distributed.initialize_from_env()
    processes, rank = (jax.process_count(), jax.process_index()) if multi else (1, 0)
    size = processes if data_parallel_size is None else data_parallel_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"data_parallel_size={data_parallel_size!r} is invalid; allowed: an int >= 1")
    if size % processes:
        raise ValueError(f"data_parallel_size={size} is not a multiple of the {processes} processes of this run")
    return Layout(rank, processes, size)


def engine_devices(layout: Layout, tensor_parallel_size: int) -> list:
    """The devices of each of this process's engines (None: the default placement)."""
    import jax

    per = layout.engines_per_process
    if per == 1 and layout.num_processes == 1:
        return [None]
    local = jax.local_devices()
    if per * tensor_parallel_size > len(local):
        raise ValueError(f"{per} engines of tensor_parallel_size={tensor_parallel_size} need "
                         f"{per * tensor_parallel_size} devices; this process has {len(local)} ({local[0].platform})")
    return [local[j * tensor_parallel_size : (j + 1) * tensor_parallel_size] for j in range(per)]


def size_engine(items: list[BatchItem], kwargs: dict, platform: str, limit: int) -> dict:
    """`kwargs` with the engine limits the caller left unset sized to `items` (the engine's share):
    max_seq_len the longest prompt + max_tokens in whole pages (at most `limit`, the model's), max_batch_size
    the sequences (at most the platform's default), max_num_tokens the prompts' tokens and sequences
    (at most the default, and from 64)."""
    from jaxllm.llm_args import EngineArgs, KvCacheConfig

    valid = [it for it in items if it.error is None]
    defaults = EngineArgs().platform_defaults(platform)
    out = dict(kwargs)
    if not valid:
        return out
    if out.get("max_seq_len") is None:
        kv = out.get("kv_cache_config")
        page = (kv.get("tokens_per_block") if isinstance(kv, dict) else getattr(kv, "tokens_per_block", None)) \
            or KvCacheConfig().tokens_per_block  # fmt: skip
        longest = max(it.seq_len for it in valid)
        out["max_seq_len"] = min(-(-longest // page) * page, limit)
    sequences = sum(it.num_sequences for it in valid)
    if out.get("max_batch_size") is None:
        out["max_batch_size"] = max(1, min(sequences, defaults.max_batch_size))
    if out.get("max_num_tokens") is None:
        needed = sum(sum(it.prompt_lens) for it in valid) + sequences
        tokens = 64
        while tokens < needed and tokens < defaults.max_num_tokens:
            tokens *= 2
        out["max_num_tokens"] = max(min(tokens, defaults.max_num_tokens), out["max_batch_size"])
    return out


def _model_parts(model, kwargs: dict):
    """(tokenizer, max_seq_len bound, vocabulary size, max_input_len) of a model not yet loaded: its
    config and tokenizer only."""
    from jaxllm.checkpoints import loader, saved
    from jaxllm.tokenizer import load_tokenizer

    resolved = loader.resolve(model, kwargs.get("revision"))
    config = saved.read_config(resolved.path)[0] if resolved.kind == "saved" else loader.read_config(resolved)
    tokenizer = None
    if not kwargs.get("skip_tokenizer_init"):
        source = kwargs.get("tokenizer") or resolved
        tokenizer = load_tokenizer(source, kwargs.get("tokenizer_revision") or kwargs.get("revision"),
                                   kwargs.get("trust_remote_code", False),
                                   kwargs.get("tokenizer_mode", "auto"))  # fmt: skip
    limit = kwargs.get("max_seq_len") or config.max_position_embeddings
    return tokenizer, limit, config.vocab_size, kwargs.get("max_input_len")


# ---- one request, as the server answers it ------------------------------------------------------
@dataclasses.dataclass
class _Engine:
    llm: Any
    items: list
    limit: int  # the max_seq_len the requests were prepared against


def _params(engine: _Engine, item: BatchItem):
    """The request's SamplingParams; a chat request without max_tokens takes the rest of this engine's
    context, as the server's would (its engine may hold less than the model's limit)."""
    body, llm = item.body, engine.llm
    if item.chat and body.max_tokens is None and body.max_completion_tokens is None and llm.max_seq_len != engine.limit:
        return endpoints.chat_params(body, item.prompt_lens[0], llm.max_seq_len, llm.config.vocab_size)
    return item.params


async def _answer(engine: _Engine, item: BatchItem, model_name: str) -> dict:
    """The result line of one request (the server's response or error)."""
    from jaxllm.outputs import RequestError

    if item.error is not None:
        return output_lib.error_line(item.custom_id, item.error)
    outputs = []
    try:
        params = _params(engine, item)
        for prompt in item.prompts:
            outputs.append(endpoints.submit(engine.llm, prompt, params, False))
        done = [await out.aresult() for out in outputs]
    except ServeError as e:
        _abort(outputs)
        return output_lib.error_line(item.custom_id, e)
    except RequestError as e:  # the engine failed this request and serves on: a 500, as the server's
        _abort(outputs)
        return output_lib.error_line(item.custom_id, ServeError(500, f"{type(e).__name__}: {e}", type="internal_error"))
    except BaseException:
        _abort(outputs)
        raise
    body = endpoints.response_body(engine.llm.tokenizer, model_name, item.body, done)
    return output_lib.result_line(item.custom_id, 200, body)


def _abort(outputs: list) -> None:
    for out in outputs:
        if not out.done():
            out.abort()


# ---- the run ---------------------------------------------------------------------------------------
async def _run(engines: list[_Engine], immediate: list[BatchItem], model_name: str, sink, tally: report.Tally) -> None:
    """Answer every engine's items (and the refused ones, at once); each result goes to `sink` (a
    list of results -> None, run in a thread) in groups: one group per write, while the last is on disk."""
    buffer: list[dict] = []
    wake = asyncio.Event()
    closing = False

    def emit(result: dict) -> None:
        buffer.append(result)
        tally.add(result)
        wake.set()

    async def writer():
        while True:
            await wake.wait()
            wake.clear()
            if buffer:
                group = buffer[:]
                del buffer[:]
                await asyncio.to_thread(sink, group)
            if closing and not buffer:
                return

    async def serve(engine: _Engine):
        queue = iter(engine.items)
        width = max(1, WINDOW_PER_SLOT * engine.llm.args.max_batch_size)

        async def worker():
            for item in queue:
                emit(await _answer(engine, item, model_name))

        await asyncio.gather(*(worker() for _ in range(min(width, len(engine.items)))))

    writing = asyncio.create_task(writer())
    for item in immediate:
        emit(output_lib.error_line(item.custom_id, item.error))
    try:
        await asyncio.gather(*(serve(e) for e in engines))
    finally:
        closing = True
        wake.set()
        await writing


def run_batch(model, requests, output_path: str | Path | None = None, *, model_name: str | None = None,
              data_parallel_size: int | None = None, summary_path: str | Path | None = None, progress: bool = True,
              keep_results: bool = True, **llm_kwargs) -> BatchResults:  # fmt: skip
    """Run a batch job (see jaxllm/batch/__init__.py).

    Args:
      model: an LLM (used as it is; one engine), or what LLM(model=...) takes.
      requests: a JSONL file's path, or a list of requests (dicts in either form, JSON text, or plain
        prompt strings).
      output_path: the results file (OpenAI's batch output lines), appended to and resumed from;
        None keeps the results in memory only (no resumption). Needed in a multi-process run.
      model_name: the model's name in the requests and responses (default: `model` as given).
      data_parallel_size: engines (default 1; in a multi-process run, one per process).
      summary_path: where to write the summary as JSON too.
      progress: show a progress bar (process 0 only).
      keep_results: return the results (False: only the summary; the output file has them).
      llm_kwargs: LLM() arguments for the engines (tensor_parallel_size, dtype, ...).

    Returns the results in input order (BatchResults; in a multi-process run, process 0 has them all,
    the others their own share), with `.summary`.
    """
    started = time.perf_counter()
    given_llm = not isinstance(model, (str, Path))
    layout = process_layout(1 if given_llm and data_parallel_size is None else data_parallel_size)
    if given_llm and layout.data_parallel_size != 1:
        raise ValueError("data parallelism builds its own engines: give the model's name or path, not an LLM")
    if layout.num_processes > 1 and output_path is None:
        raise ValueError("a multi-process batch job needs an output file (its parts are merged into it)")
    model_name = model_name or (model.model_name if given_llm else str(model))
    items = load_items(requests, model_name)
    if given_llm:
        limit = model.max_seq_len
        prepare(items, model.tokenizer, limit, model.config.vocab_size, model.args.max_input_len)
    else:
        tokenizer, limit, vocab, max_input_len = _model_parts(model, llm_kwargs)
        prepare(items, tokenizer, limit, vocab, max_input_len)
        if tokenizer is not None:
            llm_kwargs = {**llm_kwargs, "tokenizer": tokenizer}  # loaded once
    by_id = {it.custom_id: it for it in items}

    own = None
    if output_path is not None:
        own = output_lib.ResultFile(output_lib.part_path(output_path, layout.rank, layout.num_processes)
                                    if layout.num_processes > 1 else output_path)  # fmt: skip
    finished = _finished(own, output_path, by_id, layout)
    todo = [it for it in items if it.custom_id not in finished]
    mine = [it for it in todo if it.index % layout.data_parallel_size in layout.engine_ids]
    refused = [it for it in mine if it.error is not None]
    logger.info("batch: %d requests, %d already done, %d to run here (%d refused before generation)", len(items),
                len(finished), len(mine), len(refused))  # fmt: skip

    engines, startup_s = _build_engines(model, given_llm, layout, items, mine, llm_kwargs, limit)
    memory: list[dict] = []

    def sink(group: list[dict]) -> None:
        if own is not None:
            own.append(group)
        if keep_results:
            memory.extend(group)

    tally = report.Tally(len(mine), progress and layout.rank == 0)
    before = [report.compile_seconds(e.llm) for e in engines]
    generating = time.perf_counter()
    try:
        _run_to_end(_run(engines, refused, model_name, sink, tally))
        generate_s = time.perf_counter() - generating
        engine_stats = [report.engine_stats(e.llm, j, b) for j, e, b in zip(layout.engine_ids, engines, before)]
    finally:
        tally.bar.close()
        if own is not None:
            own.close()
        if not given_llm:
            for engine in engines:
                engine.llm.shutdown()
    stats = {"done": tally.done, "failed": tally.failed, "prompt_tokens": tally.prompt_tokens,
             "output_tokens": tally.output_tokens, "startup_s": startup_s, "generate_s": generate_s,
             "engines": engine_stats}  # fmt: skip
    stats = report.gather(layout, output_path, stats)
    if output_path is not None and layout.rank == 0:
        merged = output_lib.merge_parts(output_path, {it.custom_id: it.index for it in items})
        if merged:
            logger.info("batch: merged %d results from part files into %s", merged, output_path)
    summary = report.summary(model_name, requests, output_path, layout, len(items), len(finished), stats,
                       time.perf_counter() - started)  # fmt: skip
    if summary_path is not None and layout.rank == 0:
        Path(summary_path).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if not keep_results:
        out = BatchResults()
        out.summary = summary
        return out
    return _results(items, output_path if layout.rank == 0 else None, finished, memory, summary)


def _run_to_end(coroutine) -> None:
    """asyncio.run, also where this thread already runs an event loop (a Jupyter kernel, an async
    caller): then on a thread of its own, which this one waits for."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxllm-batch") as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _finished(own: output_lib.ResultFile | None, output_path, by_id: dict, layout: Layout) -> dict[str, dict]:
    """The results earlier runs wrote (custom_id -> line): this process's own file (its torn last line
    truncated), the output and every part file of `output_path`."""
    finished: dict[str, dict] = {}
    if own is not None:
        for result in own.recover():
            finished[result["custom_id"]] = result
        for path in [output_path, *output_lib.part_paths(output_path)]:
            if Path(path) != own.path:
                for result in output_lib.read_results(path):
                    finished.setdefault(result["custom_id"], result)
        unknown = [cid for cid in finished if cid not in by_id]
        if unknown:
            raise ValueError(f"{output_path} has results for custom_ids that are not in the input (e.g. "
                             f"{unknown[0]!r}): it is another job's output; give another output file or remove it")
    if layout.num_processes > 1:  # every process has read the parts before any writes to its own
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxllm batch: results read")
    return finished


def _build_engines(model, given_llm: bool, layout: Layout, items: list[BatchItem], mine: list[BatchItem],
                   llm_kwargs: dict, limit: int) -> tuple[list[_Engine], float]:  # fmt: skip
    """This process's engines and the items each runs (`mine`: those not done yet); none for an
    engine with nothing to do. Each is sized to its whole share of the file, done or not, so that a
    resumed job builds the same engine and loads its programs from the persistent cache. Returns
    (engines, seconds spent making them: loading and compiling)."""
    started = time.perf_counter()
    runnable = [it for it in mine if it.error is None]
    if given_llm:
        return ([_Engine(model, runnable, limit)] if runnable else []), 0.0
    import jax

    from jaxllm import LLM

    engines = []
    devices = engine_devices(layout, llm_kwargs.get("tensor_parallel_size", 1))
    for j, engine_id in enumerate(layout.engine_ids):
        todo = [it for it in runnable if it.index % layout.data_parallel_size == engine_id]
        if not todo:
            continue
        share = [it for it in items if it.index % layout.data_parallel_size == engine_id]
        platform = (devices[j][0] if devices[j] else jax.devices()[0]).platform
        kwargs = size_engine(share, llm_kwargs, platform, limit)
        if devices[j] is not None:
            kwargs["devices"] = devices[j]
        # Only the programs the share's requests can visit (their sampling flavors, heads, grammars).
        kwargs["_precompile_only"] = ProgramNeeds.of([it.params for it in share if it.params is not None])
        logger.info("batch: engine %d: %d requests, max_seq_len %s, max_batch_size %s, max_num_tokens %s", engine_id,
                    len(todo), kwargs.get("max_seq_len"), kwargs.get("max_batch_size"), kwargs.get("max_num_tokens"))
        engines.append(_Engine(LLM(model=model, **kwargs), todo, limit))
    return engines, time.perf_counter() - started


def _results(items: list[BatchItem], output_path, finished: dict, memory: list[dict], summary: dict) -> BatchResults:
    by_id = dict(finished)
    if output_path is not None:
        by_id.update({r["custom_id"]: r for r in output_lib.read_results(output_path)})
    by_id.update({r["custom_id"]: r for r in memory})
    out = BatchResults(by_id[it.custom_id] for it in items if it.custom_id in by_id)
    out.summary = summary
    return out
