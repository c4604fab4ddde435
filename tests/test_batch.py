"""`jaxllm batch`: request forms and their errors, response bodies equal to the server's, resumption
after SIGKILL (exactly once), data parallelism over virtual devices and over two processes."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from jaxllm.batch import output as output_lib  # noqa: E402
from jaxllm.batch import run_batch  # noqa: E402
from jaxllm.batch.requests import load_items  # noqa: E402

MODEL = "smollm2-test"
ROOT = Path(__file__).resolve().parents[1]


TINY_FLAGS = ["--dtype", "float32", "--skip-tokenizer-init", "--max-batch-size", "1", "--max-num-tokens", "64"]
TINY_JOB = (32, 40)  # requests, tokens each
# At batch 1, seconds of work after the first results even on a fast idle machine, so the kill
# lands in the middle however late the test process gets to send it.
KILL_JOB = (32, 200)
TINY_KWARGS = {"dtype": "float32", "skip_tokenizer_init": True, "max_batch_size": 1, "max_num_tokens": 64}


def _token_requests(count: int, max_tokens: int) -> list[dict]:
    """Token-id completions (the tiny models have no tokenizer), greedy, exact lengths, each token's id
    in its logprobs (the text of a token without a tokenizer)."""
    return [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
             "body": {"prompt": [5 + i % 50, 17, 42, 99 - i % 7], "max_tokens": max_tokens, "temperature": 0,
                      "ignore_eos": True, "logprobs": 0}} for i in range(count)]  # fmt: skip


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tokens(result: dict) -> list:
    return result["response"]["body"]["choices"][0]["logprobs"]["tokens"]


def _check_exactly_once(path: Path, ids: list[str]) -> list[dict]:
    results = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in results) == sorted(ids)
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in results)
    return results


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), JAXLLM_LOG="WARNING")


# ---- reading requests (no engine) ---------------------------------------------------------------
def test_request_forms_names_and_refusals(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([
        json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi"}}),
        json.dumps({"prompt": "plain", "max_tokens": 3}),
        "",
        "{not json",
        json.dumps({"custom_id": "b", "method": "GET", "url": "/v1/completions", "body": {}}),
        json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/embeddings", "body": {}}),
        json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
        json.dumps({"prompt": "p", "model": "other"}),
        json.dumps({"prompt": "p", "stream": True}),
        json.dumps({"text": "neither"}),
    ]) + "\n")  # fmt: skip
    items = load_items(path, MODEL)
    assert [it.custom_id for it in items] == ["a", "line-2", "line-4", "b", "c", "line-7", "line-8", "line-9",
                                              "line-10"]
    assert items[0].error is None and items[0].url == "/v1/completions"
    assert items[1].error is None and items[1].body.max_tokens == 3
    errors = {it.custom_id: it.error for it in items if it.error is not None}
    assert "not JSON" in errors["line-4"].message
    assert "method 'GET'" in errors["b"].message and "/v1/embeddings" in errors["c"].message
    assert errors["line-7"].param == "temperature"
    assert errors["line-8"].status == 404 and "'other'" in errors["line-8"].message
    assert errors["line-9"].param == "stream"
    assert "exactly one of 'prompt' and 'messages'" in errors["line-10"].message
    listed = load_items(["a plain prompt", '{"messages": [{"role": "user", "content": "hi"}]}'], MODEL)
    assert [(it.custom_id, it.url) for it in listed] == [("line-1", "/v1/completions"),
                                                         ("line-2", "/v1/chat/completions")]
    path.write_text("".join(json.dumps({"custom_id": "x", "prompt": p}) + "\n" for p in "ab"))
    with pytest.raises(ValueError, match="custom_id 'x' appears on lines 1 and 2"):
        load_items(path, MODEL)


def test_a_torn_last_line_is_truncated_and_foreign_lines_refused(tmp_path):
    path = tmp_path / "out.jsonl"
    good = output_lib.result_line("a", 200, {"id": "cmpl-1"})
    path.write_bytes((json.dumps(good) + "\n").encode() + b'{"id": "batch_req_x", "custom_id": "b", "resp')
    file = output_lib.ResultFile(path)
    assert [r["custom_id"] for r in file.recover()] == ["a"]
    assert path.read_bytes().endswith(b"}\n")
    file.append([output_lib.result_line("b", 200, {"id": "cmpl-2"})])
    file.close()
    assert [r["custom_id"] for r in output_lib.read_results(path)] == ["a", "b"]
    path.write_text("hello\n")
    with pytest.raises(ValueError, match="not a batch result line"):
        output_lib.ResultFile(path).recover()


def test_parts_merge_in_input_order_once(tmp_path):
    """Parts of an earlier multi-process run (another process count too) go into the output in input
    order, without what the output already holds, and are deleted."""
    out = tmp_path / "out.jsonl"
    line = {cid: output_lib.result_line(cid, 200, {"id": f"cmpl-{cid}"}) for cid in "abcde"}
    _write_jsonl(out, [line["b"]])
    _write_jsonl(output_lib.part_path(out, 0, 2), [line["e"], line["b"]])
    _write_jsonl(output_lib.part_path(out, 1, 2), [line["c"]])
    torn = output_lib.part_path(out, 2, 3)
    torn.write_text(json.dumps(line["a"]) + "\n" + json.dumps(line["d"])[:20])
    assert output_lib.merge_parts(out, {cid: i for i, cid in enumerate("abcde")}) == 3
    assert [r["custom_id"] for r in output_lib.read_results(out)] == ["b", "a", "c", "e"]
    assert output_lib.part_paths(out) == []


def test_bad_jobs_stop_before_any_engine(tiny_dir, tmp_path, capsys):
    from jaxllm import cli

    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"custom_id": "x", "prompt": [5]}) + "\n" for _ in range(2)))
    assert cli.main(["batch", str(tiny_dir("llama")), "-i", str(source), "-o", str(tmp_path / "o.jsonl")]) == 2
    assert "custom_id 'x' appears on lines 1 and 2" in capsys.readouterr().err
    out = _write_jsonl(tmp_path / "other.jsonl", [output_lib.result_line("elsewhere", 200, {"id": "cmpl-1"})])
    with pytest.raises(ValueError, match="'elsewhere'.*another job's output"):
        run_batch(str(tiny_dir("llama")), [{"prompt": [5]}], out, skip_tokenizer_init=True, progress=False)


# ---- the server's answers ---------------------------------------------------------------------------
def _assert_same(got, expected, where="body"):
    """Equal, floats (log-probabilities) within 1e-3: a batch of several rows and the same request
    alone differ in the last bits."""
    if isinstance(expected, float):
        assert got == pytest.approx(expected, abs=1e-3), where
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key in expected:
            _assert_same(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            _assert_same(g, e, f"{where}[{i}]")
    else:
        assert got == expected, where


def test_bodies_and_errors_are_the_servers(smollm2_llm, tmp_path):
    from fastapi.testclient import TestClient

    from jaxllm.serve.app import ServerState, create_app

    chat = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6, "temperature": 0}
    # One token: only the chat request decodes, alone, in the batch as on the server (one program fewer to compile).
    completion = {"prompt": "The capital of France is", "max_tokens": 1, "temperature": 0, "logprobs": 1}
    requests = [
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions", "body": chat},
        {"custom_id": "completion", "method": "POST", "url": "/v1/completions", "body": completion},
        {"custom_id": "bad", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "top_p": 2}},
        {"custom_id": "long", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "max_tokens": 10**6}},
        {"custom_id": "model", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "model": "nope"}},
        {"prompt": "x", "max_tokens": 0},  # a plain line
    ]  # fmt: skip
    out = tmp_path / "out.jsonl"
    results = run_batch(smollm2_llm, requests, out, model_name=MODEL, progress=False)
    assert [r["custom_id"] for r in results] == ["chat", "completion", "bad", "long", "model", "line-6"]
    assert results.summary["done"] == 2 and results.summary["failed"] == 4 and results.summary["skipped"] == 0
    client = TestClient(create_app(ServerState(model_name=MODEL, llm=smollm2_llm)))
    for result, request in zip(results, requests[:5] + [{"url": "/v1/completions", "body": requests[5]}]):
        served = client.post(request["url"], json=request["body"])
        response = result["response"]
        assert response["status_code"] == served.status_code
        expected = served.json()
        if served.status_code == 200:
            assert response["request_id"] == response["body"]["id"]
            for key in ("id", "created"):
                response["body"].pop(key), expected.pop(key)
        else:
            assert result["error"]["message"] == expected["error"]["message"]
        _assert_same(response["body"], expected)
    # A second run over the same output does nothing more.
    again = run_batch(smollm2_llm, requests, out, model_name=MODEL, progress=False)
    assert again.summary["skipped"] == 6 and again.summary["done"] == again.summary["failed"] == 0
    assert [r["id"] for r in again] == [r["id"] for r in results]
    assert len(out.read_text().splitlines()) == 6


# ---- resumption after SIGKILL -------------------------------------------------------------------------
def test_sigkill_then_rerun_writes_each_request_once(tiny_dir, tmp_path):
    requests = _token_requests(*KILL_JOB)
    source, out = _write_jsonl(tmp_path / "in.jsonl", requests), tmp_path / "out.jsonl"
    summary = tmp_path / "summary.json"
    command = [sys.executable, "-m", "jaxllm.cli", "batch", str(tiny_dir("llama")), "-i", str(source), "-o", str(out),
               *TINY_FLAGS, "--no-progress", "--summary", str(summary)]  # fmt: skip
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_bytes().count(b"\n") >= 3):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no results written"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    written = out.read_bytes().count(b"\n")
    assert written < len(requests), "the job finished before it was killed"
    with out.open("ab") as f:  # a kill in mid-write leaves a torn line
        f.write(b'{"id": "batch_req_torn", "custom_id": "r31", "response": {"status_')
    rerun = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    results = _check_exactly_once(out, [r["custom_id"] for r in requests])
    assert all(len(_tokens(r)) == KILL_JOB[1] for r in results)
    report = json.loads(summary.read_text())
    assert report["skipped"] == written and report["done"] == len(requests) - written and report["failed"] == 0
    assert report["output_tokens"] == KILL_JOB[1] * (len(requests) - written) and report["generate_s"] > 0
    assert "already done" in rerun.stdout


# ---- data parallelism ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single_engine_tokens(tiny_dir):
    """The token-id requests' results from one engine (the reference for the data-parallel runs)."""
    requests = _token_requests(*TINY_JOB)
    results = run_batch(str(tiny_dir("llama")), requests, progress=False, **TINY_KWARGS)
    return requests, {r["custom_id"]: _tokens(r) for r in results}


def test_run_batch_inside_a_running_event_loop(tiny_dir, single_engine_tokens):
    """A Jupyter cell (or an async caller) runs inside an event loop: the job runs its own on a thread."""
    requests, expected = single_engine_tokens

    async def cell():
        return run_batch(str(tiny_dir("llama")), requests[:3], progress=False, **TINY_KWARGS)

    results = asyncio.run(cell())
    assert {r["custom_id"]: _tokens(r) for r in results} == {r["custom_id"]: expected[r["custom_id"]] for r in requests[:3]}


def test_data_parallel_engines_on_virtual_devices(tiny_dir, tmp_path, single_engine_tokens):
    import jax

    requests, expected = single_engine_tokens
    out = tmp_path / "out.jsonl"
    results = run_batch(str(tiny_dir("llama")), requests, out, data_parallel_size=2, progress=False, **TINY_KWARGS)
    assert {r["custom_id"]: _tokens(r) for r in results} == expected
    assert [r["custom_id"] for r in results] == [r["custom_id"] for r in requests]
    engines = results.summary["engines"]
    assert [e["engine"] for e in engines] == [0, 1] and results.summary["data_parallel_size"] == 2
    _check_exactly_once(out, list(expected))
    with pytest.raises(ValueError, match=f"need {2 * jax.device_count()} devices"):
        run_batch(str(tiny_dir("llama")), requests, data_parallel_size=2, tensor_parallel_size=jax.device_count(),
                  skip_tokenizer_init=True, progress=False)  # fmt: skip


def test_two_processes_merge_one_output(tiny_dir, tmp_path, single_engine_tokens):
    requests, expected = single_engine_tokens
    source, out = _write_jsonl(tmp_path / "in.jsonl", requests), tmp_path / "out.jsonl"
    summary = tmp_path / "summary.json"
    script = tmp_path / "batch.py"
    script.write_text("import sys\nfrom jaxllm.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-m", "jaxllm.launch", "--nproc-per-node", "2", "--cpu-devices-per-process",
                           "1", "--data-parallel", str(script), "batch", str(tiny_dir("llama")), "-i", str(source),
                           "-o", str(out), *TINY_FLAGS, "--no-progress", "--summary", str(summary)], env=_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = _check_exactly_once(out, list(expected))
    assert [r["custom_id"] for r in results] == list(expected)  # merged in input order
    assert {r["custom_id"]: _tokens(r) for r in results} == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch.py", "in.jsonl", "out.jsonl", "summary.json"]
    report = json.loads(summary.read_text())
    assert report["processes"] == 2 and report["data_parallel_size"] == 2 and report["done"] == len(requests)
    assert sorted(e["engine"] for e in report["engines"]) == [0, 1]


def test_program_needs_follow_the_requests_sampling():
    from jaxllm import SamplingParams
    from jaxllm.engine.buckets import ForwardShape, HeadShape, ProgramNeeds, SamplerShape

    greedy = ProgramNeeds.of([SamplingParams(max_tokens=4), SamplingParams(max_tokens=4, temperature=0.7)])
    assert greedy == ProgramNeeds(frozenset({"plain"}), heads=False, guided=False)
    assert ProgramNeeds.of([SamplingParams(max_tokens=4, temperature=0.7, top_p=0.9)]).flavors == {"plain", "full"}
    assert ProgramNeeds.of([SamplingParams(max_tokens=4, logprobs=2)]).flavors == {"plain", "full"}
    assert "penalties" in ProgramNeeds.of([SamplingParams(max_tokens=4, presence_penalty=0.5)]).flavors
    assert ProgramNeeds.of([SamplingParams(max_tokens=4, prompt_logprobs=1)]).heads
    assert greedy.keeps(ForwardShape(64, 64, 8, 64)) and greedy.keeps(ForwardShape(8, 8, 8, 1, False, 8, "plain"))
    assert not greedy.keeps(ForwardShape(8, 8, 8, 1, False, 8, "full"))
    assert greedy.keeps(SamplerShape(8, "plain")) and not greedy.keeps(SamplerShape(8, "full"))
    assert not greedy.keeps(SamplerShape(8, "plain", 0, True)) and not greedy.keeps(HeadShape(64))


def test_a_job_compiles_only_the_programs_its_requests_visit(tiny_dir, monkeypatch):
    """Precompiling on (the suite turns it off): a greedy job makes no head and no "full" or
    "penalties" program, and compiles nothing while it generates."""
    from jaxllm import LLM

    monkeypatch.setenv("JAXLLM_PRECOMPILE", "1")
    monkeypatch.setenv("JAXLLM_COMPILE_CACHE", "off")
    requests = _token_requests(3, 6)
    results = run_batch(str(tiny_dir("llama")), requests, progress=False, **TINY_KWARGS)
    _check_exactly_once_rows(results, [r["custom_id"] for r in requests])
    summary = results.summary
    assert summary["compile_in_generation_s"] == 0 and summary["programs_compiled"] > 0
    monkeypatch.setenv("JAXLLM_PRECOMPILE", "0")
    with LLM(model=str(tiny_dir("llama")), max_seq_len=summary["engines"][0]["max_seq_len"], **TINY_KWARGS) as llm:
        everything = len(llm._engine.runner.bucket_shapes())
    assert summary["programs_compiled"] < everything


def _check_exactly_once_rows(results: list[dict], ids: list[str]) -> None:
    assert sorted(r["custom_id"] for r in results) == sorted(ids)
    assert all(r["response"]["status_code"] == 200 for r in results)
