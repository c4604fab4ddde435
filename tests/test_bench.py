"""`jaxllm bench`: throughput and latency on a tiny model in this process (through the command's
main), the datasets, argument errors, and `bench serve` against a real server (once jaxllm.serve
exists) and against a port nobody listens on."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxllm.bench import datasets
from jaxllm.cli import main

REPO = Path(__file__).resolve().parents[1]
ENGINE = ["--dtype", "float32", "--skip-tokenizer-init", "--max-num-tokens", "256"]


def _run(argv, tmp_path, name="out.json") -> dict:
    out = tmp_path / name
    assert main(["bench", *argv, "--output-json", str(out)]) == 0
    return json.loads(out.read_text())


def _check_consistent(s: dict) -> None:
    """The figures of one summary agree with each other."""
    d = s["total_latency_s"]
    assert d > 0
    assert s["request_throughput_req_s"] == pytest.approx(s["completed"] / d)
    assert s["total_output_throughput_tok_s"] == pytest.approx(s["total_output_tokens"] / d)
    assert s["total_token_throughput_tok_s"] == pytest.approx((s["total_prompt_tokens"] + s["total_output_tokens"]) / d)
    for key in ("ttft_ms", "tpot_ms", "e2e_latency_ms"):
        dist = s[key]
        assert 0 <= dist["p50"] <= dist["p90"] <= dist["p99"], (key, dist)
    assert s["ttft_ms"]["mean"] <= s["e2e_latency_ms"]["mean"]
    assert s["e2e_latency_ms"]["p99"] <= d * 1e3 + 1.0  # no request outlasts its pass
    assert s["per_user_output_speed_tok_s"] == pytest.approx(1e3 / s["tpot_ms"]["mean"])  # 1 / mean TPOT


def test_throughput_fixed_lengths(tiny_dir, tmp_path, capsys):
    result = _run(["throughput", str(tiny_dir("llama")), *ENGINE, "--num-requests", "6", "--input-len", "12",
                   "--output-len", "5", "--breakdown"], tmp_path)  # fmt: skip
    for name in ("measured", "first_pass"):
        s = result[name]
        assert (s["completed"], s["failed"]) == (6, 0)
        assert s["total_output_tokens"] == 6 * 5  # ignore_eos: exactly output_len each
        assert s["total_prompt_tokens"] == 6 * 12
        _check_consistent(s)
    assert result["dataset"]["name"] == "random" and result["dataset"]["num_requests"] == 6
    assert result["engine_args"]["max_batch_size"] == 6
    # --breakdown: every step of each pass traced; the prompts' tokens once each, then 4 decodes each
    # (the first output token comes from the prompt's last position); buckets only add padding.
    assert "where the measured pass's time went" in capsys.readouterr().out
    for name in ("measured", "first_pass"):
        b = result["breakdown"][name]
        assert b["prompt_tokens"] == 6 * 12 and b["tokens"] == 6 * 12 + 6 * 4, b
        assert b["padded_tokens"] >= b["row_tokens"] >= b["tokens"] and 0 < b["useful_token_share"] <= 1
        assert b["steps"] == sum(k["steps"] for k in b["kinds"].values())
        assert sum(k["share_of_time"] for k in b["kinds"].values()) == pytest.approx(1)
        # the dispatch calls are part of the host time (a step's record holds the dispatch of the one
        # the overlap scheduler runs ahead of its read: a kind's own steps may hold none)
        assert 0 < b["mean_dispatch_ms"] <= b["mean_host_ms"]
        assert all(0 <= k["mean_dispatch_ms"] <= k["mean_host_ms"] for k in b["kinds"].values())
        assert set(b["kinds"]) <= {"prefill", "mixed", "decode", "multi-step", "follow-on"}
        # per bucket: the same steps and time, split by the tokens a forward computes
        assert sum(x["steps"] for x in b["buckets"]) == b["steps"]
        assert sum(x["share_of_time"] for x in b["buckets"]) == pytest.approx(1)
        assert all(x["kind"] in b["kinds"] and x["ms_per_forward"] > 0 for x in b["buckets"])


def test_throughput_jsonl(tiny_dir, tmp_path):
    lines = [{"prompt_token_ids": [11, 12, 13, 14], "output_len": 3}, {"prompt_token_ids": list(range(20, 40))},
             {"prompt_token_ids": [50] * 9, "output_len": 7}]  # fmt: skip
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    result = _run(["throughput", str(tiny_dir("llama")), *ENGINE, "--dataset", str(path), "--output-len", "4",
                   "--no-warmup"], tmp_path)  # fmt: skip
    s = result["measured"]
    assert result["first_pass"] is None
    assert s["completed"] == 3 and s["total_output_tokens"] == 3 + 4 + 7 and s["total_prompt_tokens"] == 4 + 20 + 9
    _check_consistent(s)


def test_latency(tiny_dir, tmp_path):
    result = _run(["latency", str(tiny_dir("llama")), *ENGINE, "--num-requests", "2", "--input-len", "10",
                   "--output-len", "6", "--num-scheduler-steps", "1"], tmp_path)  # fmt: skip
    s, warm = result["measured"], result["first_pass"]
    assert (s["completed"], s["total_output_tokens"]) == (2, 12)
    assert warm["completed"] == 1
    assert result["engine_args"]["max_batch_size"] == 1
    _check_consistent(s)
    # One decode a dispatch: every token arrives on its own, 5 gaps a request.
    assert s["itl_ms"]["mean"] is not None and s["itl_ms"]["p50"] <= s["itl_ms"]["p99"]


def test_sharegpt_like_seeded_and_means():
    a = datasets.sharegpt_like(2000, 100, 50, 0.5, 4096, 4096, vocab=1000, seed=3)
    assert a == datasets.sharegpt_like(2000, 100, 50, 0.5, 4096, 4096, vocab=1000, seed=3)
    assert a != datasets.sharegpt_like(2000, 100, 50, 0.5, 4096, 4096, vocab=1000, seed=4)
    prompts, outputs = a
    assert sum(map(len, prompts)) / 2000 == pytest.approx(100, rel=0.05)
    assert sum(outputs) / 2000 == pytest.approx(50, rel=0.05)
    assert all(10 <= t < 990 for p in prompts[:50] for t in p)
    requests = datasets.sharegpt_like_requests(5, 1000, 3, 100, 50, 0.5, 4096, 4096)
    assert [r.prompt for r in requests] == datasets.sharegpt_like(5, 100, 50, 0.5, 4096, 4096, 1000, 3)[0]


def test_benchmarks_common_uses_the_package(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_common", REPO / "benchmarks" / "common.py")
    common = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, common)  # its dataclasses look their module up
    spec.loader.exec_module(common)
    assert common.sharegpt_like(7, 60, 40, 0.8, 512, 256, vocab=500, seed=2) == datasets.sharegpt_like(
        7, 60, 40, 0.8, 512, 256, vocab=500, seed=2)
    assert common.synthetic(3, 8, 500, 1) == datasets.random_token_prompts(3, 8, 500, 1)


@pytest.mark.parametrize("argv, message", [
    (["throughput", "m", "--num-requests", "0"], "positive integer"),
    (["throughput", "m", "--dataset", "nonsense"], "random, sharegpt-like or a .jsonl"),
    (["latency", "m", "--warmup", "-1"], "non-negative"),
    (["serve", "--base-url", "http://x", "--model", "m", "--request-rate", "-2"], "positive number"),
    (["serve", "--base-url", "http://x"], "--model"),
])  # fmt: skip
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_dataset_exits_2_before_the_engine(tmp_path, capsys):
    missing = tmp_path / "none.jsonl"
    assert main(["bench", "throughput", "no-such-model", "--dataset", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"output_len": 3}\n')
    assert main(["bench", "throughput", "no-such-model", "--dataset", str(bad)]) == 2
    assert f"{bad}:2" in capsys.readouterr().err
    bad.write_text('{"prompt": "hi", "output_len": 0}\n')
    assert main(["bench", "latency", "no-such-model", "--dataset", str(bad)]) == 2
    assert "output_len must be a positive int" in capsys.readouterr().err
    bad.write_text('{"prompt": "hi"}\n')
    assert main(["bench", "throughput", "no-such-model", "--dataset", str(bad), "--skip-tokenizer-init"]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    assert main(["bench", "latency", "no-such-model", "--max-batch-size", "4"]) == 2
    assert "batch 1" in capsys.readouterr().err


def test_serve_synthetic_needs_vocab_size(capsys):
    pytest.importorskip("httpx")
    assert main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--model", "m"]) == 2
    assert "--vocab-size" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("load", [[], ["--request-rate", "200", "--max-concurrency", "1"]])
def test_serve_failures_are_counted(load, tmp_path):
    """Nobody listens on the port: every request fails, and each failure is counted with its reason."""
    pytest.importorskip("httpx")
    out = tmp_path / "serve.json"
    rc = main(["bench", "serve", "--base-url", f"http://127.0.0.1:{_free_port()}/v1", "--model", "m", "--vocab-size",
               "100", "--num-requests", "3", "--input-len", "4", "--output-len", "2", "--output-json", str(out), *load])  # fmt: skip
    assert rc == 1
    s = json.loads(out.read_text())["measured"]
    assert (s["num_requests"], s["completed"], s["failed"]) == (3, 0, 3)
    assert sum(s["errors"].values()) == 3 and all("Connect" in e for e in s["errors"])
    assert s["total_output_tokens"] == 0 and s["ttft_ms"]["mean"] is None


def test_completions_url():
    from jaxllm.bench.client import completions_url

    assert completions_url("http://h:8000/", "/v1/completions") == "http://h:8000/v1/completions"
    assert completions_url("http://h:8000/v1", "/v1/completions") == "http://h:8000/v1/completions"


def test_serve_against_a_real_server(request, tmp_path):
    """`jaxllm serve` in a subprocess, loaded by `jaxllm bench serve` over HTTP."""
    pytest.importorskip("jaxllm.serve")
    httpx = pytest.importorskip("httpx")
    smollm2_path = request.getfixturevalue("smollm2_path")  # fetched only when there is a server to run
    port, log = _free_port(), tmp_path / "server.log"
    with log.open("wb") as sink:  # a file, not a pipe: a chatty server must never block on a full pipe
        server = subprocess.Popen([sys.executable, "-m", "jaxllm.cli", "serve", str(smollm2_path), "--port", str(port)],
                                  cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:  # until /health says the model is ready (503 while it loads)
            assert server.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the server was not ready within 180 s"
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        name = httpx.get(f"{base}/v1/models", timeout=5).json()["data"][0]["id"]
        path = tmp_path / "prompts.jsonl"
        prompts = ["What is the capital of France?", "Count to five:", "Hello", "Write a haiku about rain."]
        path.write_text("\n".join(json.dumps({"prompt": p, "output_len": 8}) for p in prompts))
        out = tmp_path / "serve.json"
        rc = main(["bench", "serve", "--base-url", base, "--model", name, "--dataset", str(path), "--max-concurrency",
                   "2", "--ignore-eos", "--output-json", str(out)])  # fmt: skip
        s = json.loads(out.read_text())["measured"]
        assert rc == 0 and (s["completed"], s["failed"]) == (4, 0), s["errors"]
        assert s["total_output_tokens"] == 4 * 8  # ignore_eos: exactly output_len each
        assert s["ttft_ms"]["p50"] <= s["e2e_latency_ms"]["p99"]
        assert s["total_output_throughput_tok_s"] == pytest.approx(s["total_output_tokens"] / s["total_latency_s"])
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
