"""Moving a prompt's KV pages from one LLM to another (disaggregated serving).

A `context_only` request ends after its first token; the engine keeps ("parks") its pages and
returns an `opaque_state` naming where they are. A `generation_only` request on another LLM fetches
them with that state, checks them against its own layout, writes them into its own pages and
continues decoding.

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

What a peer is trusted with (README.md, "What the KV transfer port trusts"): every frame's length is
checked against a bound before it is read (an ask by ASK_MAX_BYTES; a reply by the receiving LLM's
cache geometry, `KVLayout`), every array's dtype and shape against the local layout before a byte of
it is read, every read has a timeout, and a server serves at most `max_connections` connections at
once (more are answered 'busy' and closed). With a cluster secret both ends prove they hold it
(HMAC over fresh nonces) before anything else, and the states a context LLM makes carry an HMAC the
generation LLM checks before it connects anywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import socketserver
import struct
import threading
import time
import weakref
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

STATE_VERSION = 1
WIRE_VERSION = 2
CLUSTER_SECRET_ENV = "JAXLLM_KV_CLUSTER_SECRET"
# Frame bounds. The hello and the ask hold a few ids, hex secrets and nonces (~300 bytes); a reply's
# header holds the context's metadata, whose prompt token ids grow with the prompt (up to 10 digits
# and a separator each), and the arrays' raw bytes follow it: exactly the shapes `KVLayout` allows
# (K and V of every layer, [num_kv_heads, num_tokens <= max_seq_len, head_dim]), read only once checked.
HELLO_MAX_BYTES = 1024
ASK_MAX_BYTES = 4096
HEADER_BASE_BYTES = 64 * 1024
HEADER_BYTES_PER_TOKEN = 16
SEND_PIECE_BYTES = 4 << 20  # pages go out in pieces this size, each within io_timeout_s
_LOCAL_ENGINES: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()  # llm_id -> Engine


class KVTransferError(RuntimeError):
    """The context state could not be fetched (expired, already taken, unreachable, mismatched, malformed)."""


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """The portable pages this LLM accepts: per layer K and V, each [num_kv_heads, num_tokens, head_dim]
    of `dtype`, for at most `max_tokens` KV positions (the LLM's max_seq_len)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # numpy name of the KV cache dtype ('float32', 'bfloat16', ...)
    max_tokens: int

    @property
    def max_header_bytes(self) -> int:
        return HEADER_BASE_BYTES + HEADER_BYTES_PER_TOKEN * self.max_tokens

    def shape(self, num_tokens: int) -> tuple[int, int, int]:
        return (self.num_kv_heads, num_tokens, self.head_dim)

    def check_count(self, num_tokens: Any) -> int:
        if type(num_tokens) is not int or not 1 <= num_tokens <= self.max_tokens:
            raise KVTransferError(f"the context's num_tokens={num_tokens!r} is invalid; allowed: an int in "
                                  f"[1, {self.max_tokens}] (this LLM's max_seq_len)")  # fmt: skip
        return num_tokens

    def check_described(self, described: Any, num_tokens: int) -> None:
        """A reply header's [[dtype name, shape], ...] against this layout, before any array byte is read."""
        want = [self.dtype, list(self.shape(num_tokens))]
        if not isinstance(described, list) or len(described) != 2 * self.num_layers:
            count = len(described) if isinstance(described, list) else type(described).__name__
            raise KVTransferError(f"the reply describes {count} arrays; allowed: {2 * self.num_layers} "
                                  f"(K and V of {self.num_layers} layers)")  # fmt: skip
        for index, entry in enumerate(described):
            if entry != want:
                raise KVTransferError(f"array {index} of the reply is {str(entry)[:200]}; allowed: {want} "
                                      "([dtype, [num_kv_heads, num_tokens, head_dim]] of this LLM)")  # fmt: skip

    def check_pages(self, arrays: Any, num_tokens: int) -> None:
        """Received arrays (numpy or jax) against this layout, before anything is written into the cache."""
        if not isinstance(arrays, (list, tuple)) or len(arrays) != 2 * self.num_layers:
            count = len(arrays) if isinstance(arrays, (list, tuple)) else type(arrays).__name__
            raise KVTransferError(f"the context came with {count} arrays; allowed: {2 * self.num_layers} "
                                  f"(K and V of {self.num_layers} layers)")  # fmt: skip
        want = self.shape(num_tokens)
        for index, array in enumerate(arrays):
            shape, dtype = tuple(getattr(array, "shape", ())), getattr(array, "dtype", None)
            if shape != want or dtype is None or jnp.dtype(dtype).name != self.dtype:
                raise KVTransferError(f"array {index} of the context is {dtype} {shape}; allowed: {self.dtype} {want}")


def check_meta(meta: Any, layout: KVLayout, vocab_size: int) -> int:
    """A context's metadata (from `Disaggregation.export` in engine/disaggregated.py, maybe from a
    peer) before it is used; returns its num_tokens (KV positions)."""
    if not isinstance(meta, dict):
        raise KVTransferError(f"the context's metadata is a {type(meta).__name__}; allowed: a JSON object")
    num_tokens = layout.check_count(meta.get("num_tokens"))
    first = meta.get("first_token")
    if type(first) is not int or not 0 <= first < vocab_size:
        raise KVTransferError(f"the context's first_token={first!r} is invalid; allowed: a token id in "
                              f"[0, {vocab_size})")  # fmt: skip
    for name, kinds in (("first_logprob", (int, float)), ("first_rank", (int, type(None))), ("seed", (int,)),
                        ("prompt_token_ids", (list,))):  # fmt: skip
        if not isinstance(meta.get(name), kinds) or isinstance(meta.get(name), bool):
            raise KVTransferError(f"the context's {name}={str(meta.get(name))[:100]} is invalid; allowed: "
                                  f"{' or '.join(k.__name__ for k in kinds)}")  # fmt: skip
    return num_tokens


@dataclasses.dataclass(frozen=True)
class TransferSettings:
    """What an engine needs to park, serve and receive contexts."""

    llm_id: str
    fingerprint: str  # see `fingerprint`
    layout: KVLayout  # the pages this LLM accepts from a context LLM
    plan: Any = None  # the engine's TPPlan (None: one device)
    host: str = "127.0.0.1"  # where the TCP server listens (0.0.0.0: every interface)
    port: int = 0  # 0: any free port
    timeout_s: float = 60.0  # how long parked pages wait for their generation_only request
    io_timeout_s: float = 30.0  # the longest wait for a peer: connecting, one small frame, any gap in the pages
    max_connections: int = 8  # connections the server serves at once
    cluster_key: bytes | None = dataclasses.field(default=None, repr=False)  # see `cluster_key`


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


def cluster_key(configured: str | None) -> bytes | None:
    """The cluster secret as an HMAC key: `CacheTransceiverConfig.cluster_secret`, else the
    JAXLLM_KV_CLUSTER_SECRET environment variable; None (no peer authentication) if neither is set."""
    value = configured if configured is not None else os.environ.get(CLUSTER_SECRET_ENV)
    return value.encode() if value else None


def adapter_ids(lora_request, prompt_adapter_request) -> list:
    """[LoRA id, prompt adapter id] of a request (None where it has none): its pages depend on them."""
    return [getattr(lora_request, "lora_int_id", None), getattr(prompt_adapter_request, "prompt_adapter_id", None)]


def _mac(key: bytes, *parts: str) -> str:
    return hmac.new(key, "\x00".join(("jaxllm-kv",) + parts).encode(), hashlib.sha256).hexdigest()


def _proves(key: bytes, proof: Any, *parts: str) -> bool:
    """Whether `proof` (from a peer) is `_mac(key, *parts)`, compared in constant time."""
    return isinstance(proof, str) and hmac.compare_digest(proof, _mac(key, *parts))


def encode_state(key: bytes | None = None, **fields) -> bytes:
    """An opaque_state; signed (its field 'mac') when the context LLM has a cluster secret."""
    state = {"v": STATE_VERSION, **fields}
    if key is not None:
        state["mac"] = _mac(key, "state", json.dumps(state, sort_keys=True))
    return json.dumps(state, sort_keys=True).encode()


_STATE_FIELDS = {"v": int, "llm_id": str, "pid": int, "endpoint": str, "ctx_request_id": int, "secret": str,
                 "fingerprint": str, "num_tokens": int, "seed": int, "adapters": list}  # fmt: skip


def decode_state(opaque_state: bytes, key: bytes | None = None) -> dict:
    """The fields of an opaque_state made by `encode_state`; ValueError for anything else, and, when
    this LLM has a cluster secret, for a state not signed with it."""
    try:
        state = json.loads(bytes(opaque_state).decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"disaggregated_params.opaque_state is not a jaxllm context state ({e})") from None
    if (not isinstance(state, dict) or not set(_STATE_FIELDS) <= set(state) or state["v"] != STATE_VERSION
            or any(type(state[name]) is not kind for name, kind in _STATE_FIELDS.items())):  # fmt: skip
        raise ValueError("disaggregated_params.opaque_state is not a jaxllm context state (missing or mistyped "
                         "fields, or another version)")  # fmt: skip
    body = json.dumps({k: v for k, v in state.items() if k != "mac"}, sort_keys=True)
    if key is not None and not _proves(key, state.get("mac"), "state", body):
        raise ValueError("disaggregated_params.opaque_state is not signed with this LLM's cluster secret; allowed: "
                         f"states made by a context LLM with the same cache_transceiver_config.cluster_secret "
                         f"(or {CLUSTER_SECRET_ENV})")  # fmt: skip
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


# ---- the wire ----------------------------------------------------------------------------------------
# A frame is an 8-byte big-endian length, then that many bytes of JSON. One connection fetches one context:
#   server -> client  hello  {"v", "nonce", "auth"}
#   client -> server  ask    {"ctx_request_id", "secret", "nonce", "proof"}
#   server -> client  reply  {"meta", "arrays": [[dtype, shape], ...], "proof"}, then each array's raw bytes;
#                     or     {"error", "proof"}
# "proof" is the HMAC of both nonces under the cluster secret (None without one), so each side knows
# the other holds it before trusting what it sends.
def _send_frame(sock: socket.socket, obj: dict) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(struct.pack("!Q", len(data)) + data)


def _recv_exact(sock: socket.socket, n: int, what: str, deadline: float | None = None) -> bytearray:
    """n bytes (n already checked against its bound). Each wait is the socket's timeout at most, and
    all of them together end at `deadline` (time.monotonic()) when one is given."""
    idle = sock.gettimeout()
    buffer, got = bytearray(n), 0
    view = memoryview(buffer)
    try:
        while got < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(min(idle, left) if idle is not None else left)
            count = sock.recv_into(view[got:], min(n - got, 1 << 22))
            if count == 0:
                raise KVTransferError(f"the peer closed the connection during {what} (after {got} of {n} bytes)")
            got += count
    except TimeoutError:
        raise KVTransferError(f"timed out waiting for {what} (after {got} of {n} bytes)") from None
    except OSError as e:
        raise KVTransferError(f"the connection failed during {what}: {e}") from None
    finally:
        view.release()
        try:
            sock.settimeout(idle)
        except OSError:
            pass
    return buffer


def _recv_frame(sock: socket.socket, max_bytes: int, what: str, deadline: float | None) -> dict:
    (n,) = struct.unpack("!Q", _recv_exact(sock, 8, what, deadline))
    if n > max_bytes:
        raise KVTransferError(f"{what} announces {n} bytes; allowed: at most {max_bytes}")
    try:
        obj = json.loads(bytes(_recv_exact(sock, n, what, deadline)))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise KVTransferError(f"{what} is not JSON ({str(e)[:100]})") from None
    if not isinstance(obj, dict):
        raise KVTransferError(f"{what} is a JSON {type(obj).__name__}; allowed: an object")
    return obj


class _Handler(socketserver.BaseRequestHandler):
    def setup(self) -> None:
        self.server.track(self.request, True)  # type: ignore[attr-defined]

    def finish(self) -> None:
        self.server.track(self.request, False)  # type: ignore[attr-defined]

    def handle(self) -> None:
        server: KVTransferServer = self.server  # type: ignore[assignment]
        sock, key = self.request, server.cluster_key
        sock.settimeout(server.io_timeout_s)
        nonce = secrets.token_hex(16)
        try:
            _send_frame(sock, {"v": WIRE_VERSION, "nonce": nonce, "auth": key is not None})
            ask = _recv_frame(sock, ASK_MAX_BYTES, "the ask", time.monotonic() + server.io_timeout_s)
        except (KVTransferError, OSError) as e:
            _answer_error(sock, f"{type(e).__name__}: {e}")
            return
        their_nonce = ask.get("nonce") if isinstance(ask.get("nonce"), str) else ""
        proof = _mac(key, "server", their_nonce, nonce) if key is not None else None
        try:
            if key is not None and not _proves(key, ask.get("proof"), "client", nonce, their_nonce):
                raise KVTransferError("authentication failed: this LLM serves only peers holding its cluster secret")
            ctx_request_id, secret = ask.get("ctx_request_id"), ask.get("secret")
            if type(ctx_request_id) is not int or not isinstance(secret, str):
                raise KVTransferError("the ask needs an int ctx_request_id and a str secret")
            meta, arrays = server.export(ctx_request_id, secret)
        except Exception as e:  # tell the client why, then hang up
            _answer_error(sock, f"{type(e).__name__}: {e}", proof)
            return
        host = [np.ascontiguousarray(np.asarray(a)) for a in arrays]
        try:
            _send_frame(sock, {"meta": meta, "arrays": [[a.dtype.name, list(a.shape)] for a in host], "proof": proof})
            for a in host:  # in pieces: sendall's timeout bounds a whole call, io_timeout_s bounds a pause
                data = memoryview(a.view(np.uint8).reshape(-1))
                for start in range(0, len(data), SEND_PIECE_BYTES):
                    sock.sendall(data[start : start + SEND_PIECE_BYTES])
        except OSError as e:  # the client left or stopped reading for io_timeout_s
            logger.warning("sending context %d to %s failed: %s", ctx_request_id, self.client_address, e)


def _answer_error(sock: socket.socket, message: str, proof: str | None = None) -> None:
    try:
        _send_frame(sock, {"error": message, "proof": proof})
    except OSError:
        pass


class KVTransferServer(socketserver.ThreadingTCPServer):
    """Serves parked contexts to other processes: one connection fetches one context.

    At most `max_connections` connections are served at once, one thread each; another is answered
    'busy' and closed at once (the client reports it), so idle or slow peers cannot multiply threads.
    A connection whose ask has not arrived within `io_timeout_s` is closed, and so is one that stops
    reading the pages for that long.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 16  # connections the kernel queues before this server accepts them

    def __init__(self, export: Callable[[int, str], tuple[dict, list]], host: str, port: int, *,
                 cluster_key: bytes | None = None, io_timeout_s: float = 30.0, max_connections: int = 8):  # fmt: skip
        self.export = export
        self.cluster_key = cluster_key
        self.io_timeout_s = io_timeout_s
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__((host, port), _Handler)
        self._thread = threading.Thread(target=self.serve_forever, name="jaxllm-kv-transfer", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::"):
            host = socket.gethostname()
        return f"{host}:{port}"

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            request.settimeout(1.0)
            _answer_error(request, f"busy: this LLM serves {self.max_connections} connections at once; try again")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # starts process_request_thread
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def track(self, sock: socket.socket, is_open: bool) -> None:
        with self._open_lock:
            (self._open.add if is_open else self._open.discard)(sock)

    def close(self) -> None:
        """Stop accepting and end the connections being served."""
        self.shutdown()
        self.server_close()
        with self._open_lock:
            for sock in list(self._open):
                hang_up(sock)


def hang_up(sock: socket.socket) -> None:
    """End a connection another thread may be blocked on (its recv returns or fails at once)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def register_local(llm_id: str, engine) -> None:
    _LOCAL_ENGINES[llm_id] = engine


def fetch(state: dict, layout: KVLayout, *, key: bytes | None = None, io_timeout_s: float = 30.0,
          on_connect: Callable[[socket.socket], None] | None = None) -> tuple[dict, list]:  # fmt: skip
    """The context's portable pages: (meta, [k0, v0, k1, v1, ...]), from this process if the context
    LLM lives here, else over TCP from its endpoint. Over TCP the reply's arrays are checked against
    `layout` before their bytes are read; the caller checks the meta (`check_meta`) and the arrays of
    either path (`KVLayout.check_pages`). `on_connect` receives the socket (to end it from elsewhere)."""
    engine = _LOCAL_ENGINES.get(state["llm_id"]) if state["pid"] == os.getpid() else None
    if engine is not None:
        return engine.export_kv(int(state["ctx_request_id"]), str(state["secret"]), timeout=io_timeout_s)
    endpoint = state["endpoint"]
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise KVTransferError(f"the context LLM {state['llm_id']} is not in this process and its endpoint "
                              f"{endpoint[:100]!r} is not host:port")  # fmt: skip
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=io_timeout_s)
    except OSError as e:
        raise KVTransferError(f"cannot reach the context LLM at {endpoint}: {e}") from None
    if on_connect is not None:
        on_connect(sock)
    with sock:
        hello = _recv_frame(sock, HELLO_MAX_BYTES, f"the hello of {endpoint}", time.monotonic() + io_timeout_s)
        if "error" in hello:
            raise KVTransferError(f"the context LLM at {endpoint} refused: {str(hello['error'])[:500]}")
        their_nonce, nonce = hello.get("nonce"), secrets.token_hex(16)
        if not isinstance(their_nonce, str) or hello.get("v") != WIRE_VERSION:
            raise KVTransferError(f"the peer at {endpoint} is not a jaxllm KV transfer server (wire version "
                                  f"{WIRE_VERSION})")  # fmt: skip
        proof = _mac(key, "client", their_nonce, nonce) if key is not None else None
        try:
            _send_frame(sock, {"ctx_request_id": state["ctx_request_id"], "secret": state["secret"], "nonce": nonce,
                               "proof": proof})  # fmt: skip
        except OSError as e:
            raise KVTransferError(f"the connection to {endpoint} failed: {e}") from None
        header = _recv_frame(sock, layout.max_header_bytes, f"the reply of {endpoint}", time.monotonic() + io_timeout_s)
        said = f" (it said: {str(header['error'])[:500]})" if "error" in header else ""
        if key is not None and not _proves(key, header.get("proof"), "server", nonce, their_nonce):
            raise KVTransferError(f"the peer at {endpoint} did not prove the cluster secret{said}")
        if said:
            raise KVTransferError(f"the context LLM at {endpoint} refused: {str(header['error'])[:500]}")
        meta = header.get("meta")
        num_tokens = layout.check_count(meta.get("num_tokens") if isinstance(meta, dict) else None)
        layout.check_described(header.get("arrays"), num_tokens)
        dtype, shape = jnp.dtype(layout.dtype), layout.shape(num_tokens)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        arrays = [np.frombuffer(_recv_exact(sock, nbytes, f"array {i} from {endpoint}"), dtype=dtype).reshape(shape)
                  for i in range(2 * layout.num_layers)]  # fmt: skip
    return meta, arrays


def new_secret() -> str:
    return secrets.token_hex(16)
