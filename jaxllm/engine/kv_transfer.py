"""Moving a prompt's KV pages from one LLM to another (disaggregated serving).

A `context_only` request ends after its first token; the engine keeps ("parks") its pages and
returns an `opaque_state` naming where they are. A `generation_only` request on another LLM fetches
them with that state, writes them into its own pages and continues decoding.

Where the pages travel:
  * same process (two LLMs on different devices): the context engine gathers the pages into device
    arrays and the generation engine copies them onto its own devices (device to device);
  * another process or host: over TCP from a small server each LLM starts on its first
    `context_only` request (`CacheTransceiverConfig.host` / `port`); the arrays travel as raw bytes.
Both go through the context engine's thread (`Engine.export_kv`), which owns the cache.

The pages travel in a portable layout: per layer, K and V as [num_kv_heads, num_tokens, head_dim]
in the checkpoint's KV heads (tensor-parallel padding and replication undone), so the two LLMs may
differ in page size and tensor-parallel degree; they must share the model, its KV dtype and head
layout. The state carries a fingerprint of those and a one-time secret that authorizes the fetch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import socket
import socketserver
import struct
import threading
import weakref
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

STATE_VERSION = 1
_LOCAL_ENGINES: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()  # llm_id -> Engine


class KVTransferError(RuntimeError):
    """The context state could not be fetched (expired, already taken, unreachable, mismatched)."""


@dataclasses.dataclass(frozen=True)
class TransferSettings:
    """What an engine needs to park, serve and receive contexts."""

    llm_id: str
    fingerprint: str  # see `fingerprint`
    plan: Any = None  # the engine's TPPlan (None: one device)
    host: str = "127.0.0.1"  # where the TCP server listens (0.0.0.0: every interface)
    port: int = 0  # 0: any free port
    timeout_s: float = 60.0  # how long parked pages wait for their generation_only request


@dataclasses.dataclass
class ParkedContext:
    """A finished context_only request whose pages wait for their generation_only request."""

    seq: Any  # the Sequence still holding the pages (prompt, then its first token)
    secret: str
    deadline: float  # time.monotonic() after which the pages are released


def fingerprint(cfg, kv_dtype) -> str:
    """What two LLMs must share for their KV pages to be interchangeable."""
    fields = (cfg.architecture, cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
              cfg.head_dim, repr(cfg.rope), repr(cfg.rope_local), cfg.layer_types, jnp.dtype(kv_dtype).name)  # fmt: skip
    return hashlib.sha256(repr(fields).encode()).hexdigest()[:16]


def adapter_ids(lora_request, prompt_adapter_request) -> list:
    """[LoRA id, prompt adapter id] of a request (None where it has none): its pages depend on them."""
    return [getattr(lora_request, "lora_int_id", None), getattr(prompt_adapter_request, "prompt_adapter_id", None)]


def encode_state(**fields) -> bytes:
    return json.dumps({"v": STATE_VERSION, **fields}, sort_keys=True).encode()


def decode_state(opaque_state: bytes) -> dict:
    """The fields of an opaque_state made by `encode_state`; ValueError for anything else."""
    try:
        state = json.loads(bytes(opaque_state).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"disaggregated_params.opaque_state is not a jaxllm context state ({e})") from None
    needed = {"v", "llm_id", "pid", "endpoint", "ctx_request_id", "secret", "fingerprint", "num_tokens", "seed",
              "adapters"}
    if not isinstance(state, dict) or not needed <= set(state) or state["v"] != STATE_VERSION:
        raise ValueError("disaggregated_params.opaque_state is not a jaxllm context state (missing fields or version)")
    return state


# ---- layout: the engine's KV heads <-> the checkpoint's ------------------------------------------
def to_portable(k: np.ndarray, num_tokens: int, plan) -> np.ndarray:
    """[K_engine, pages, page_size, d] gathered pages -> [K, num_tokens, d] in the checkpoint's heads.
    num_tokens counts KV positions (a prompt adapter's virtual tokens included)."""
    heads, pages, page_size, head_dim = k.shape
    k = k.reshape(heads, pages * page_size, head_dim)[:, :num_tokens]
    if plan is not None and not plan.is_identity:
        k = k[: plan.num_kv_heads * plan.kv_replicas : plan.kv_replicas]
    return k


def from_portable(k, plan, page_size: int, num_pages: int, xp=np):
    """[K, num_tokens, d] -> [K_engine, num_pages, page_size, d] (zero-padded pages)."""
    if plan is not None and not plan.is_identity:
        k = xp.pad(k, ((0, plan.padded_kv_heads - plan.num_kv_heads), (0, 0), (0, 0)))
        k = xp.repeat(k, plan.kv_replicas, axis=0)
    heads, tokens, head_dim = k.shape
    k = xp.pad(k, ((0, 0), (0, num_pages * page_size - tokens), (0, 0)))
    return k.reshape(heads, num_pages, page_size, head_dim)


# ---- the wire: length-prefixed JSON headers and raw arrays ------------------------------------------
def _send_json(sock: socket.socket, obj: dict) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(struct.pack("!Q", len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 22))
        if not chunk:
            raise KVTransferError("the context LLM closed the connection mid-transfer")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv_json(sock: socket.socket) -> dict:
    (n,) = struct.unpack("!Q", _recv_exact(sock, 8))
    return json.loads(_recv_exact(sock, n).decode())


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock = self.request
        try:
            ask = _recv_json(sock)
            meta, arrays = self.server.export(int(ask["ctx_request_id"]), str(ask["secret"]))  # type: ignore[attr-defined]
        except Exception as e:  # tell the client why, then hang up
            _send_json(sock, {"error": f"{type(e).__name__}: {e}"})
            return
        host = [np.asarray(a) for a in arrays]
        _send_json(sock, {"meta": meta, "arrays": [[a.dtype.name, list(a.shape)] for a in host]})
        for a in host:
            sock.sendall(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data)


class KVTransferServer(socketserver.ThreadingTCPServer):
    """Serves parked contexts to other processes: one connection fetches one context."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, export: Callable[[int, str], tuple[dict, list]], host: str, port: int):
        super().__init__((host, port), _Handler)
        self.export = export
        self._thread = threading.Thread(target=self.serve_forever, name="jaxllm-kv-transfer", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::"):
            host = socket.gethostname()
        return f"{host}:{port}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def register_local(llm_id: str, engine) -> None:
    _LOCAL_ENGINES[llm_id] = engine


def fetch(state: dict, timeout: float = 60.0) -> tuple[dict, list]:
    """The context's portable pages: (meta, [k0, v0, k1, v1, ...]), from this process if the context
    LLM lives here, else over TCP from its endpoint."""
    engine = _LOCAL_ENGINES.get(state["llm_id"]) if state["pid"] == os.getpid() else None
    if engine is not None:
        return engine.export_kv(int(state["ctx_request_id"]), str(state["secret"]))
    host, _, port = str(state["endpoint"]).rpartition(":")
    if not host:
        raise KVTransferError(f"the context LLM {state['llm_id']} is not in this process and has no endpoint")
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except OSError as e:
        raise KVTransferError(f"cannot reach the context LLM at {state['endpoint']}: {e}") from None
    with sock:
        _send_json(sock, {"ctx_request_id": state["ctx_request_id"], "secret": state["secret"]})
        header = _recv_json(sock)
        if "error" in header:
            raise KVTransferError(f"the context LLM at {state['endpoint']} refused: {header['error']}")
        arrays = []
        for dtype_name, shape in header["arrays"]:
            dtype = jnp.dtype(dtype_name)
            size = int(np.prod(shape)) * dtype.itemsize
            arrays.append(np.frombuffer(_recv_exact(sock, size), dtype=dtype).reshape(shape))
    return header["meta"], arrays


def new_secret() -> str:
    return secrets.token_hex(16)
