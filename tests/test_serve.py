"""`jaxllm serve`: the OpenAI-compatible server, driven by the official `openai` client.

One server (and a second with an API key) over the session's SmolLM2 engine, on free loopback
ports in background threads; a subprocess test runs the real command and stops it with SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from jaxllm.serve.app import ServerState  # noqa: E402
from jaxllm.serve.server import build_server  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = "smollm2-test"
API_KEY = "sekret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Running:
    def __init__(self, state: ServerState):
        self.state = state
        self.port = _free_port()
        self.server = build_server(state, "127.0.0.1", self.port, drain_timeout=5, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def servers(smollm2_llm):
    plain = _Running(ServerState(model_name=MODEL, llm=smollm2_llm, max_body_bytes=64 * 1024))
    keyed = _Running(ServerState(model_name=MODEL, llm=smollm2_llm, api_key=API_KEY))
    yield plain, keyed
    plain.stop()
    keyed.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_health_version_models(server):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]
    models = openai.OpenAI(base_url=server.url + "/v1", api_key="x").models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_usage_and_length(client, smollm2_llm):
    prompt = "The capital of France is"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})  # fmt: skip
    choice = out.choices[0]
    assert choice.finish_reason == "length" and choice.text
    ref = smollm2_llm.generate(prompt, __import__("jaxllm").SamplingParams(max_tokens=6, ignore_eos=True))
    assert choice.text == ref.outputs[0].text
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert out.usage.completion_tokens == 6 and out.usage.total_tokens == out.usage.prompt_tokens + 6
    # vLLM's return_token_ids: the choice's token ids (and the prompt's), streamed too
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
    assert out.choices[0].token_ids == ref.outputs[0].token_ids
    assert out.choices[0].prompt_token_ids == ref.prompt_token_ids
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
    assert [t for chunk in stream for t in chunk.choices[0].token_ids] == ref.outputs[0].token_ids


def test_streamed_chat_joins_to_unstreamed(client):
    messages = _chat("Name three colours.")
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert full.choices[0].message.role == "assistant" and full.usage.completion_tokens > 0
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})  # fmt: skip
    parts, reasons, usage = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            reasons.append(c.finish_reason)
    assert "".join(parts) == full.choices[0].message.content
    assert reasons[-1] == full.choices[0].finish_reason in ("stop", "length")
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens


def test_n_logprobs_seed(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0.8, seed=7, n=2, logprobs=2,
                  extra_body={"ignore_eos": True})  # fmt: skip
    out = client.completions.create(**kwargs)
    assert sorted(c.index for c in out.choices) == [0, 1]
    for c in out.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
        assert all(len(top) <= 2 for top in lp.top_logprobs) and all(v <= 0 for v in lp.token_logprobs)
    assert out.usage.completion_tokens == 10
    again = client.completions.create(**kwargs)  # seeded: the same samples
    assert [c.text for c in again.choices] == [c.text for c in out.choices]
    chat = client.chat.completions.create(model=MODEL, messages=_chat("Hi"), max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=3)  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob for t in content)


def test_beam_search_through_the_openai_client(client, smollm2_llm):
    """vLLM's use_beam_search extension: best_of beams, the n best, as LLM.generate gives them."""
    from jaxllm import SamplingParams

    prompt = "The capital of France is"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, n=2,
                                    extra_body={"use_beam_search": True, "best_of": 3, "length_penalty": 1.0,
                                                "early_stopping": True})  # fmt: skip
    ref = smollm2_llm.generate(prompt, SamplingParams(use_beam_search=True, best_of=3, n=2, length_penalty=1.0,
                                                      early_stopping=True, max_tokens=8))  # fmt: skip
    assert [c.text for c in out.choices] == [o.text for o in ref.outputs]
    with pytest.raises(openai.BadRequestError, match="temperature > 0 is not allowed"):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0.7,
                                  extra_body={"use_beam_search": True})  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="applies to beam search only"):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, extra_body={"length_penalty": 1.0})


def test_stop_and_logit_bias(client, smollm2_llm):
    prompt = "1, 2, 3, 4, 5,"
    base = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    stop = base.strip().split(",")[1].strip() if "," in base.strip() else base.strip()[:2]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert out.choices[0].finish_reason == "stop" and stop not in out.choices[0].text
    assert base.startswith(out.choices[0].text)
    first = smollm2_llm.tokenizer(base, add_special_tokens=False)["input_ids"][0]
    banned = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0,
                                       logit_bias={str(first): -100}, user="tester")  # fmt: skip
    assert smollm2_llm.tokenizer(banned.choices[0].text, add_special_tokens=False)["input_ids"][0] != first


def test_errors(servers, client):
    plain, keyed = servers
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL, messages=_chat("x"), max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):  # vLLM's 400, not a clip
        client.completions.create(model=MODEL, prompt="x", max_tokens=10**6)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}], max_tokens=2)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    bad = httpx.post(plain.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}
    big = httpx.post(plain.url + "/v1/completions", json={"model": MODEL, "prompt": "x" * 100_000})
    assert big.status_code == 413 and "limit" in big.json()["error"]["message"]
    # the key: every route but /health
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(keyed.url + "/metrics").status_code == 401
    assert httpx.get(keyed.url + "/health").status_code == 200
    good = openai.OpenAI(base_url=keyed.url + "/v1", api_key=API_KEY, max_retries=0)
    assert good.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0).choices[0].text
    # still serving after all that
    assert client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0).usage.completion_tokens


def test_tokenize_detokenize(server, smollm2_llm):
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "hello world"}).json()["tokens"]
    assert ids == list(smollm2_llm.tokenizer("hello world")["input_ids"])
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"].endswith("hello world")
    chat_ids = httpx.post(server.url + "/tokenize", json={"messages": _chat("hi")}).json()["tokens"]
    assert len(chat_ids) > len(ids)


def _kv(llm) -> dict:
    from jaxllm.engine.stats import kv_cache_stats

    return kv_cache_stats(llm._engine.scheduler.block_manager)


def _aborted(server) -> float:
    families = text_string_to_metric_families(httpx.get(server.url + "/metrics").text)
    return sum(s.value for f in families for s in f.samples
               if s.name == "jaxllm:request_success_total" and s.labels["finished_reason"] == "abort")  # fmt: skip


def test_disconnect_mid_stream_frees_pages(server, smollm2_llm):
    free, aborted = _kv(smollm2_llm)["freeNumBlocks"], _aborted(server)
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert _kv(smollm2_llm)["freeNumBlocks"] < free  # its pages are taken
    _wait_for_pages(smollm2_llm, free)
    body["stream"] = False  # unstreamed: the server notices the closed connection while it waits
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=1.5)
    _wait_for_pages(smollm2_llm, free)
    deadline = time.monotonic() + 5
    while _aborted(server) < aborted + 2:  # both counted under finished_reason="abort"
        assert time.monotonic() < deadline, _aborted(server)
        time.sleep(0.05)


def _wait_for_pages(llm, free: int) -> None:
    deadline = time.monotonic() + 20
    while llm._engine.scheduler.has_work() or _kv(llm)["freeNumBlocks"] != free:
        assert time.monotonic() < deadline, "the aborted request kept its pages"
        time.sleep(0.05)


def test_concurrent_streams_complete(server):
    """40 streams at once (the engine runs 16): each one ends with exactly its max_tokens."""

    async def one(client, i):
        max_tokens = 2 + i % 7 * 3
        stream = await client.completions.create(model=MODEL, prompt=f"Story number {i}:" + " and" * (i % 5),
                                                 max_tokens=max_tokens, temperature=0.7, seed=i, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})  # fmt: skip
        text, usage, reason = "", None, None
        async for chunk in stream:
            usage = chunk.usage or usage
            for c in chunk.choices:
                text += c.text
                reason = c.finish_reason or reason
        return max_tokens, usage.completion_tokens, reason

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120,
                                    http_client=openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=80)))  # fmt: skip
        async with client:
            return await asyncio.gather(*(one(client, i) for i in range(40)))

    results = asyncio.run(main())
    assert all(got == want and reason == "length" for want, got, reason in results), results


def test_metrics(server, client):
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body={"ignore_eos": True})
    text = httpx.get(server.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("jaxllm:num_requests_running", "jaxllm:num_requests_waiting", "jaxllm:kv_cache_usage_perc",
                 "jaxllm:prefix_cache_queries", "jaxllm:prefix_cache_hits", "jaxllm:prompt_tokens",
                 "jaxllm:generation_tokens", "jaxllm:request_success", "jaxllm:time_to_first_token_seconds",
                 "jaxllm:inter_token_latency_seconds", "jaxllm:e2e_request_latency_seconds",
                 "jaxllm:request_queue_time_seconds"):  # fmt: skip
        assert name in families, name
    value = {s.name: s.value for f in families.values() for s in f.samples if not s.labels}
    assert value["jaxllm:generation_tokens_total"] > 0 and value["jaxllm:prompt_tokens_total"] > 0
    assert value["jaxllm:e2e_request_latency_seconds_count"] > 0
    assert value["jaxllm:time_to_first_token_seconds_count"] > 0
    assert 0 <= value["jaxllm:kv_cache_usage_perc"] <= 1
    reasons = {s.labels["finished_reason"] for s in families["jaxllm:request_success"].samples
               if s.name == "jaxllm:request_success_total"}  # fmt: skip
    assert "length" in reasons


def test_cli_without_serve_extra(monkeypatch, capsys):
    from jaxllm import cli

    monkeypatch.setitem(sys.modules, "fastapi", None)
    assert cli.main(["serve", "smollm2"]) == 2
    assert "pip install 'jaxllm[serve]'" in capsys.readouterr().err


def test_cli_serve_starts_and_drains_on_sigterm(smollm2_path, tmp_path):
    """`jaxllm serve` in a subprocess: 503 or refused while loading, /health 200; SIGTERM in the middle
    of a stream lets it finish (the drain), refuses new work, and the process exits 0. The drain
    timeout is generous: the suite runs with JAXLLM_PRECOMPILE=0, so the stream's decode programs
    compile after the signal."""
    extra = tmp_path / "extra.yaml"
    extra.write_text("max_num_tokens: 64\nenable_chunked_prefill: true\n")
    port = _free_port()
    env = dict(os.environ, JAXLLM_LOG="WARNING")
    probe = subprocess.run([sys.executable, "-c", "import jaxllm, sys; print('fastapi' in sys.modules)"],
                           capture_output=True, text=True, env=env, check=True)  # fmt: skip
    assert probe.stdout.strip() == "False"  # the base import never pulls in the serve extra
    proc = subprocess.Popen([sys.executable, "-m", "jaxllm.cli", "serve", str(smollm2_path), "--port", str(port),
                             "--dtype", "float32", "--max-batch-size", "2", "--extra-llm-api-options", str(extra),
                             "--drain-timeout", "120"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline, status = time.monotonic() + 120, None
        while status != 200:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the server did not become healthy"
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code
                assert status in (200, 503)
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        body = {"prompt": "Count:", "max_tokens": 24, "ignore_eos": True, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            try:  # new work is refused while draining: the listening socket is closed, or a 503
                late = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=dict(body, stream=False), timeout=10)
                assert late.status_code == 503, late.text
            except httpx.TransportError:
                pass
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]" and '"completion_tokens": 24' in rest[-2]
        assert proc.wait(30) == 0, proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
