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

from jaxllm.engine.kv_state import KVLayout, KVTransferError, mac, proves

logger = logging.getLogger(__name__)

WIRE_VERSION = 2
# Frame bounds. The hello and the ask hold a few ids, hex secrets and nonces (~300 bytes); a reply's
# header holds the context's metadata, whose prompt token ids grow with the prompt (up to 10 digits
# and a separator each), and the arrays' raw bytes follow it: exactly the shapes `KVLayout` allows
# (K and V of every layer, [num_kv_heads, num_tokens <= max_seq_len, head_dim]), read only once checked.
HELLO_MAX_BYTES = 1024
ASK_MAX_BYTES = 4096
SEND_PIECE_BYTES = 4 << 20  # pages go out in pieces this size, each within io_timeout_s
_LOCAL_ENGINES: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()  # llm_id -> Engine


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
        proof = mac(key, "server", their_nonce, nonce) if key is not None else None
        try:
            if key is not None and not proves(key, ask.get("proof"), "client", nonce, their_nonce):
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


def unregister_local(llm_id: str, engine) -> None:
    """`engine` shut down: fetches of its contexts go to its (closed) endpoint and fail there."""
    if _LOCAL_ENGINES.get(llm_id) is engine:
        del _LOCAL_ENGINES[llm_id]


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
        proof = mac(key, "client", their_nonce, nonce) if key is not None else None
        try:
            _send_frame(sock, {"ctx_request_id": state["ctx_request_id"], "secret": state["secret"], "nonce": nonce,
                               "proof": proof})  # fmt: skip
        except OSError as e:
            raise KVTransferError(f"the connection to {endpoint} failed: {e}") from None
        header = _recv_frame(sock, layout.max_header_bytes, f"the reply of {endpoint}", time.monotonic() + io_timeout_s)
        said = f" (it said: {str(header['error'])[:500]})" if "error" in header else ""
        if key is not None and not proves(key, header.get("proof"), "server", nonce, their_nonce):
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

