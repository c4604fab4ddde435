"""Disaggregated serving: a context_only request on one LLM, its generation_only continuation on another
(another device, another tensor-parallel degree and page size, another process) give exactly the
tokens of one aggregated request; and faults stay contained: a fake peer (a real TCP server on a
loopback port sending crafted bytes), idle connections, expiry and shutdown cost no pages, threads
or hanging futures."""

import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxllm import DisaggregatedParams, KvCacheConfig, LLM, RequestError, SamplingParams
from jaxllm.engine import kv_state, kv_transfer
from jaxllm.engine.engine import EngineShutdown

PROMPTS = [list(range(3, 40)), [5, 17, 42, 99, 3, 250, 7]]
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True, logprobs=1)
SAMPLED = SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.9, top_p=0.95, seed=11)
pytestmark = pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 (virtual) devices")
CLUSTER_SECRET = "pair-secret"
IO_TIMEOUT_MS = 1500  # the pair's context server: short, so idle connections close within the test
MAX_CONNECTIONS = 3


def _llm(path, devices, **kwargs):
    return LLM(model=str(path), dtype="float32", skip_tokenizer_init=True, max_batch_size=8, max_num_tokens=128,
               tensor_parallel_size=len(devices), devices=devices, **kwargs)  # fmt: skip


@pytest.fixture(scope="module")
def pair(tiny_dir):
    """A context LLM on device 1 (pages of 32) and a generation LLM over devices 2 and 3 (TP=2, pages
    of 16), on the odd-sized tiny Llama whose 3 KV heads TP=2 pads to 4."""
    d = jax.devices()
    ctx = _llm(tiny_dir("llama-odd"), [d[1]], cache_transceiver_config=dict(
        kv_transfer_timeout_ms=30_000, cluster_secret=CLUSTER_SECRET, io_timeout_ms=IO_TIMEOUT_MS,
        max_connections=MAX_CONNECTIONS))  # fmt: skip
    gen = _llm(tiny_dir("llama-odd"), [d[2], d[3]], kv_cache_config=KvCacheConfig(tokens_per_block=16),
               cache_transceiver_config={"cluster_secret": CLUSTER_SECRET})  # fmt: skip
    yield ctx, gen
    ctx.shutdown()
    gen.shutdown()


def context_only(llm, prompt, params):
    out = llm.generate(prompt, params, use_tqdm=False, disaggregated_params=DisaggregatedParams(request_type="context_only"))
    dp = out.outputs[0].disaggregated_params
    assert out.outputs[0].token_ids == dp.first_gen_tokens and len(dp.first_gen_tokens) == 1
    assert out.outputs[0].finish_reason == "length" and dp.ctx_request_id == out.request_id
    return dp


def generation_only(llm, prompt, params, dp):
    follow = DisaggregatedParams(request_type="generation_only", first_gen_tokens=dp.first_gen_tokens,
                                 ctx_request_id=dp.ctx_request_id, opaque_state=dp.opaque_state)  # fmt: skip
    return llm.generate(prompt, params, use_tqdm=False, disaggregated_params=follow)


def test_two_halves_give_the_aggregated_tokens(pair, tiny_llm):
    ctx, gen = pair
    whole_llm = tiny_llm("llama-odd")
    free_before = ctx._engine.block_manager.num_free_blocks
    for params in (GREEDY, SAMPLED):
        whole = whole_llm.generate(PROMPTS, params, use_tqdm=False)
        for prompt, ref in zip(PROMPTS, whole):
            split = generation_only(gen, prompt, params, context_only(ctx, prompt, params))
            assert split.outputs[0].token_ids == ref.outputs[0].token_ids
            assert split.outputs[0].finish_reason == "length"
            if params.logprobs is not None:
                got = [next(iter(e.values())).logprob for e in split.outputs[0].logprobs]
                want = [next(iter(e.values())).logprob for e in ref.outputs[0].logprobs]
                np.testing.assert_allclose(got, want, atol=1e-4)
    assert ctx._engine.block_manager.num_free_blocks == free_before  # fetched pages were released
    assert not ctx._engine.parked


def test_transfer_over_tcp(pair, tiny_llm, monkeypatch):
    """The path another process takes: the context's pages travel over the context LLM's TCP server."""
    ctx, gen = pair
    monkeypatch.setattr(kv_transfer, "_LOCAL_ENGINES", weakref.WeakValueDictionary())
    prompt = PROMPTS[0]
    ref = tiny_llm("llama-odd").generate(prompt, GREEDY, use_tqdm=False)
    dp = context_only(ctx, prompt, GREEDY)
    assert json.loads(dp.opaque_state)["endpoint"].startswith("127.0.0.1:")
    assert generation_only(gen, prompt, GREEDY, dp).outputs[0].token_ids == ref.outputs[0].token_ids
    with pytest.raises(RequestError, match="no parked context"):  # one fetch per context
        generation_only(gen, prompt, GREEDY, dp)


_CONTEXT_PROCESS = textwrap.dedent("""
    import json, sys
    from jaxllm import DisaggregatedParams, LLM, SamplingParams
    llm = LLM(model=sys.argv[1], dtype="float32", skip_tokenizer_init=True, max_batch_size=8, max_num_tokens=128)
    out = llm.generate(json.loads(sys.argv[2]), SamplingParams(max_tokens=10, ignore_eos=True), use_tqdm=False,
                       disaggregated_params=DisaggregatedParams(request_type="context_only"))
    dp = out.outputs[0].disaggregated_params
    print(json.dumps({"first": dp.first_gen_tokens, "id": dp.ctx_request_id, "state": dp.opaque_state.decode()}), flush=True)
    sys.stdin.readline()  # serve the pages until the test is done
    llm.shutdown()
""")


def test_generation_in_another_process_than_the_context(tiny_dir, tiny_llm):
    path, prompt = tiny_dir("llama"), PROMPTS[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "XLA_FLAGS": ""}
    proc = subprocess.Popen([sys.executable, "-c", _CONTEXT_PROCESS, str(path), json.dumps(prompt)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line, "the context process printed nothing"
        sent = json.loads(line)
        gen = tiny_llm("llama")
        dp = DisaggregatedParams(request_type="generation_only", first_gen_tokens=sent["first"],
                                 ctx_request_id=sent["id"], opaque_state=sent["state"].encode())  # fmt: skip
        params = SamplingParams(max_tokens=10, ignore_eos=True)
        split = gen.generate(prompt, params, use_tqdm=False, disaggregated_params=dp)
        assert split.outputs[0].token_ids == gen.generate(prompt, params, use_tqdm=False).outputs[0].token_ids
    finally:
        proc.communicate("done\n", timeout=60)


def test_unfetched_contexts_are_released(tiny_dir):
    """Contexts nobody fetches (three, two of them the same prompt sharing cached pages) give every page back."""
    with _llm(tiny_dir("llama"), [jax.devices()[1]], cache_transceiver_config={"kv_transfer_timeout_ms": 1}) as llm:
        free = llm._engine.block_manager.num_free_blocks
        outs = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[0]], GREEDY, use_tqdm=False,
                            disaggregated_params=DisaggregatedParams(request_type="context_only"))  # fmt: skip
        dp = outs[0].outputs[0].disaggregated_params
        deadline = time.monotonic() + 10
        while llm._engine.parked and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not llm._engine.parked
        assert llm._engine.block_manager.num_free_blocks == free
        with pytest.raises(RequestError, match="no parked context"):
            generation_only(llm, PROMPTS[0], GREEDY, dp)


def test_a_shut_down_context_llm_leaves_the_in_process_registry(tiny_dir, tiny_llm):
    """A context parked by an LLM that has since shut down: its continuation in this process fails
    at the context LLM's closed endpoint (the shut-down engine is no longer handed out, though a
    reference to it is still held), and the generation LLM goes on serving."""
    prompt = PROMPTS[1]
    ctx = _llm(tiny_dir("llama"), [jax.devices()[1]])
    dp = context_only(ctx, prompt, GREEDY)
    engine = ctx._engine  # (held: the registry's weak reference alone would not keep it)
    ctx.shutdown()
    gen = tiny_llm("llama")
    with pytest.raises(RequestError, match="cannot reach the context LLM at"):
        generation_only(gen, prompt, GREEDY, dp)
    del engine
    assert gen.generate(prompt, GREEDY, use_tqdm=False).outputs[0].token_ids


def test_bad_disaggregated_requests(pair, tiny_llm):
    ctx, gen = pair
    prompt = PROMPTS[1]
    with pytest.raises(ValueError, match="request_type='prefill'"):
        DisaggregatedParams(request_type="prefill")
    with pytest.raises(ValueError, match="needs its context state"):
        gen.generate(prompt, GREEDY, disaggregated_params=DisaggregatedParams(request_type="generation_only"))
    with pytest.raises(ValueError, match="not a jaxllm context state"):
        gen.generate(prompt, GREEDY, disaggregated_params=DisaggregatedParams(
            request_type="generation_only", first_gen_tokens=[3], opaque_state=b"\x00garbage"))  # fmt: skip
    with pytest.raises(ValueError, match="n=1 and best_of=1"):
        ctx.generate(prompt, SamplingParams(n=2, temperature=1.0),
                     disaggregated_params=DisaggregatedParams(request_type="context_only"))  # fmt: skip
    dp = context_only(ctx, prompt, GREEDY)
    with pytest.raises(ValueError, match="a generation_only request takes the same prompt"):
        generation_only(gen, prompt + [9], GREEDY, dp)
    with pytest.raises(ValueError, match="another model"):
        generation_only(tiny_llm("llama"), prompt, GREEDY, dp)
    # The context is still parked after those refusals, and both engines keep serving.
    ref = tiny_llm("llama-odd").generate(prompt, GREEDY, use_tqdm=False)
    assert generation_only(gen, prompt, GREEDY, dp).outputs[0].token_ids == ref.outputs[0].token_ids


def test_adapters_travel_with_the_context(tiny_dir, tmp_path):
    """A request with a LoRA adapter and a prompt adapter: the pages (virtual tokens included) depend on
    both, so the generation side must name the same ones, and then gives the aggregated tokens."""
    from jaxllm import LoraConfig, LoRARequest, PromptAdapterRequest
    from tests import tiny

    lora_dir, _, _ = tiny.save_lora("llama", tmp_path / "lora", rank=4, alpha=8, seed=5, merge=False)
    prompt_dir, _ = tiny.save_prompt_adapter("llama", tmp_path / "prompt", num_virtual_tokens=3, seed=6)
    lora, virtual = LoRARequest("l", 1, str(lora_dir)), PromptAdapterRequest("p", 1, str(prompt_dir))
    engine = dict(lora_config=LoraConfig(max_lora_rank=4, max_loras=1), max_prompt_adapter_token=4)
    d = jax.devices()
    prompt = PROMPTS[1]
    with _llm(tiny_dir("llama"), [d[1]], **engine) as ctx, _llm(tiny_dir("llama"), [d[2]], **engine) as gen:
        whole = ctx.generate(prompt, GREEDY, use_tqdm=False, lora_request=lora, prompt_adapter_request=virtual)
        out = ctx.generate(prompt, GREEDY, use_tqdm=False, lora_request=lora, prompt_adapter_request=virtual,
                           disaggregated_params=DisaggregatedParams(request_type="context_only"))  # fmt: skip
        dp = out.outputs[0].disaggregated_params
        follow = DisaggregatedParams(request_type="generation_only", first_gen_tokens=dp.first_gen_tokens,
                                     ctx_request_id=dp.ctx_request_id, opaque_state=dp.opaque_state)  # fmt: skip
        with pytest.raises(ValueError, match="takes the same adapters"):
            gen.generate(prompt, GREEDY, disaggregated_params=follow, lora_request=lora)
        split = gen.generate(prompt, GREEDY, use_tqdm=False, lora_request=lora, prompt_adapter_request=virtual,
                             disaggregated_params=follow)  # fmt: skip
        assert split.prompt_token_ids == prompt
        assert split.outputs[0].token_ids == whole.outputs[0].token_ids


# ---- faults stay contained ----------------------------------------------------------------------------
def _frame(obj) -> bytes:
    data = json.dumps(obj).encode() if not isinstance(obj, bytes) else obj
    return struct.pack("!Q", len(data)) + data


class FakePeer:
    """A real TCP server on a loopback port that plays `script(conn)` on every connection it accepts:
    the crafted bytes a broken or hostile context LLM would send."""

    def __init__(self, script):
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._play, args=(conn,), daemon=True).start()

    def _play(self, conn: socket.socket) -> None:
        try:
            self.script(conn)
            while conn.recv(1 << 16):  # hold the connection until the client hangs up
                pass
        except OSError:
            pass

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in self.connections:
            conn.close()


def _hello_then(reply: bytes, hang_up: bool = False):
    """A script: a plausible hello, wait for the ask, then `reply` as it is (then end the connection)."""

    def script(conn: socket.socket) -> None:
        conn.sendall(_frame({"v": kv_transfer.WIRE_VERSION, "nonce": "fake", "auth": False}))
        conn.recv(4096)
        conn.sendall(reply)
        if hang_up:
            conn.shutdown(socket.SHUT_WR)

    return script


def _fake_state(llm, prompt, endpoint: str, key: bytes | None = None) -> DisaggregatedParams:
    """A generation_only request's params naming a context at `endpoint` (an LLM no process has)."""
    state = kv_state.encode_state(key, llm_id="not-an-llm", pid=os.getpid(), endpoint=endpoint, ctx_request_id=1,
                                     secret="0" * 32, fingerprint=llm._kv_fingerprint, num_tokens=len(prompt), seed=0,
                                     adapters=[None, None])  # fmt: skip
    return DisaggregatedParams(request_type="generation_only", first_gen_tokens=[5], ctx_request_id=1,
                               opaque_state=state)  # fmt: skip


def _reply(llm, num_tokens: int, arrays=None, **meta_changes) -> bytes:
    """A reply header as a context LLM sends it (the layout of `llm`), then the bytes of `arrays`."""
    layout = llm._engine.transfer.layout
    if arrays is None:
        arrays = [np.full(layout.shape(num_tokens), 7.0, layout.dtype) for _ in range(2 * layout.num_layers)]
    meta = {"num_tokens": num_tokens, "prompt_token_ids": PROMPTS[1], "first_token": 5, "first_logprob": -1.0,
            "first_rank": 1, "seed": 0, "fingerprint": llm._kv_fingerprint, **meta_changes}  # fmt: skip
    header = _frame({"meta": meta, "arrays": [[a.dtype.name, list(a.shape)] for a in arrays], "proof": None})
    return header + b"".join(a.tobytes() for a in arrays)


def _bad_replies(llm):
    """(what the peer does, its script, the error the request must fail with)."""
    layout, n = llm._engine.transfer.layout, len(PROMPTS[1])
    shape = layout.shape(n)
    wrong_head_dim = [np.zeros((shape[0], n, shape[2] + 1), layout.dtype)] * (2 * layout.num_layers)
    wrong_dtype = [np.zeros(shape, np.float16)] * (2 * layout.num_layers)
    full = _reply(llm, n)
    return [
        ("garbage instead of a hello", lambda c: c.sendall(b"\xff" * 64), "announces 18446744073709551615 bytes"),
        ("a 2^40-byte length prefix", _hello_then(struct.pack("!Q", 1 << 40) + b"x" * (1 << 20)),
         "announces 1099511627776 bytes; allowed: at most"),
        ("a header that is not JSON", _hello_then(_frame(b"\x00{garbage")), "is not JSON"),
        ("too few arrays", _hello_then(_reply(llm, n, wrong_dtype[:1])), "describes 1 arrays; allowed"),
        ("a wrong head_dim", _hello_then(_reply(llm, n, wrong_head_dim)), "array 0 of the reply is"),
        ("a wrong dtype", _hello_then(_reply(llm, n, wrong_dtype)), "'float16'"),
        ("more tokens than the prompt", _hello_then(_reply(llm, n + 1)), f"holds {n + 1} KV positions"),
        ("a first token outside the vocabulary", _hello_then(_reply(llm, n, first_token=10**9)),
         "first_token=1000000000"),
        ("pages cut short", _hello_then(full[: len(full) // 2], hang_up=True), "closed the connection during array"),
    ]


def test_a_fake_peer_cannot_fill_the_cache(tiny_llm):
    """A generation_only request whose state names a peer that sends garbage, a huge length prefix or wrongly
    shaped pages fails at once with the reason, takes no page and reads no more than the bounds allow."""
    llm = tiny_llm("llama-odd")
    bm = llm._engine.block_manager
    for what, script, error in _bad_replies(llm):
        peer = FakePeer(script)
        free, started = bm.num_free_blocks, time.monotonic()
        try:
            with pytest.raises(RequestError, match=error):
                dp = _fake_state(llm, PROMPTS[1], peer.endpoint)
                llm.generate(PROMPTS[1], GREEDY, use_tqdm=False, disaggregated_params=dp)
        finally:
            peer.close()
        assert time.monotonic() - started < 5, what  # no timeout was needed: each is refused as it arrives
        assert bm.num_free_blocks == free, what
        assert not llm._engine.requests, what


def test_a_peer_without_the_cluster_secret_is_refused(pair):
    """With a cluster secret: a state not signed with it is refused before any connection; a signed state
    naming a peer that cannot prove the secret is refused before its pages are read; a client with the
    wrong secret gets nothing from the context LLM, whose context stays parked for the right one."""
    ctx, gen = pair
    bm = gen._engine.block_manager
    free = bm.num_free_blocks
    peer = FakePeer(_hello_then(_reply(gen, len(PROMPTS[1]))))  # well-shaped pages, but no proof
    try:
        with pytest.raises(ValueError, match="not signed with this LLM's cluster secret"):
            gen.generate(PROMPTS[1], GREEDY, disaggregated_params=_fake_state(gen, PROMPTS[1], peer.endpoint))
        forged = _fake_state(gen, PROMPTS[1], peer.endpoint, key=b"another-secret")
        with pytest.raises(ValueError, match="not signed with this LLM's cluster secret"):
            gen.generate(PROMPTS[1], GREEDY, disaggregated_params=forged)
        signed = _fake_state(gen, PROMPTS[1], peer.endpoint, key=CLUSTER_SECRET.encode())
        with pytest.raises(RequestError, match="did not prove the cluster secret"):
            gen.generate(PROMPTS[1], GREEDY, use_tqdm=False, disaggregated_params=signed)
    finally:
        peer.close()
    assert bm.num_free_blocks == free and len(peer.connections) == 1  # the unsigned states never connected

    dp = context_only(ctx, PROMPTS[1], GREEDY)
    state, layout = json.loads(dp.opaque_state), gen._engine.transfer.layout
    state["llm_id"] = "elsewhere"  # over TCP, as from another process
    with pytest.raises(kv_state.KVTransferError, match="did not prove the cluster secret.*authentication failed"):
        kv_transfer.fetch(state, layout, key=b"wrong-secret")
    with pytest.raises(kv_state.KVTransferError, match="authentication failed"):
        kv_transfer.fetch(state, layout, key=None)
    assert dp.ctx_request_id in ctx._engine.parked
    meta, arrays = kv_transfer.fetch(state, layout, key=CLUSTER_SECRET.encode())
    layout.check_pages(arrays, meta["num_tokens"])
    assert dp.ctx_request_id not in ctx._engine.parked


def test_the_server_bounds_its_connections(pair):
    """More idle connections than max_connections: the extra ones are answered 'busy' at once and add no
    thread; the idle ones are closed after io_timeout_ms; a 2^40-byte ask is refused without reading it."""
    ctx, _ = pair
    dp = context_only(ctx, PROMPTS[1], GREEDY)  # the server runs from the first parked context
    host, _, port = json.loads(dp.opaque_state)["endpoint"].rpartition(":")
    threads = threading.active_count()
    conns = [socket.create_connection((host, int(port)), timeout=10) for _ in range(MAX_CONNECTIONS + 4)]
    opened = time.monotonic()
    try:
        first = [kv_transfer._recv_frame(c, 4096, "the first frame", None) for c in conns]
        busy = [f for f in first if "busy" in str(f.get("error"))]
        served = [c for c, f in zip(conns, first) if "nonce" in f]
        # (a slot of the fetch above may still be on its way back: one served connection fewer then)
        assert MAX_CONNECTIONS - 1 <= len(served) <= MAX_CONNECTIONS and len(busy) == len(conns) - len(served)
        assert threading.active_count() - threads <= MAX_CONNECTIONS
        for conn in served:  # the idle ones: an error, then the server hangs up
            frame = kv_transfer._recv_frame(conn, 4096, "the idle answer", None)
            assert "timed out waiting for the ask" in frame["error"] and conn.recv(1) == b""
        idle_closed = time.monotonic() - opened
        assert IO_TIMEOUT_MS / 1e3 * 0.9 <= idle_closed < IO_TIMEOUT_MS / 1e3 + 3
    finally:
        for conn in conns:
            conn.close()
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        kv_transfer._recv_frame(conn, 4096, "the hello", None)
        started = time.monotonic()
        conn.sendall(struct.pack("!Q", 1 << 40))  # and no data: the answer must not wait for any
        frame = kv_transfer._recv_frame(conn, 4096, "the answer", None)
        assert "announces 1099511627776 bytes; allowed: at most 4096" in frame["error"]
        assert time.monotonic() - started < 1.0
    assert dp.ctx_request_id in ctx._engine.parked  # and the server still serves it
    state = json.loads(dp.opaque_state) | {"llm_id": "elsewhere"}
    kv_transfer.fetch(state, ctx._engine.transfer.layout, key=CLUSTER_SECRET.encode())


def test_shutdown_answers_every_fetch_from_a_stalled_peer(tiny_dir):
    """Six generation_only requests fetching from a peer that accepts and never answers (four on the
    fetch threads, two queued behind them): shutdown fails all six with EngineShutdown at once."""
    peer = FakePeer(lambda conn: None)  # holds every connection, sends nothing
    llm = _llm(tiny_dir("llama"), [jax.devices()[1]])  # io_timeout_ms stays 30 s: only shutdown ends the wait
    try:
        bm = llm._engine.block_manager
        free = bm.num_free_blocks
        dp = _fake_state(llm, PROMPTS[1], peer.endpoint)
        outs = [llm.generate_async(PROMPTS[1], GREEDY, disaggregated_params=dp) for _ in range(6)]
        deadline = time.monotonic() + 10
        while len(peer.connections) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(peer.connections) == 4
        # (what the engine held, taken before shutdown takes the engine apart)
        requests, disaggregated, started = llm._engine.requests, llm._engine.disaggregated, time.monotonic()
        llm.shutdown()
        for out in outs:
            with pytest.raises(RequestError) as failed:
                out.result(timeout=2.0)
            assert isinstance(failed.value.__cause__, EngineShutdown)
        assert time.monotonic() - started < 5
        assert bm.num_free_blocks == free and not requests and not disaggregated.pending_imports
    finally:
        llm.shutdown()
        peer.close()
