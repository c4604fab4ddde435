"""What two LLMs agree on to move a prompt's KV pages (disaggregated serving; the TCP side is
kv_transfer.py): the receiving cache's layout and the checks of what arrives against it, the
opaque state a context request returns (HMAC-signed under a cluster secret), and the portable page
layout (per layer, K and V as [num_kv_heads, num_tokens, head_dim] in the checkpoint's KV heads).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import secrets
from typing import Any

import jax.numpy as jnp
import numpy as np

STATE_VERSION = 1
CLUSTER_SECRET_ENV = "JAXLLM_KV_CLUSTER_SECRET"
# A reply's header holds the context's metadata, whose prompt token ids grow with the prompt (up to
# 10 digits and a separator each): its bound (KVLayout.max_header_bytes).
HEADER_BASE_BYTES = 64 * 1024
HEADER_BYTES_PER_TOKEN = 16


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


def mac(key: bytes, *parts: str) -> str:
    return hmac.new(key, "\x00".join(("jaxllm-kv",) + parts).encode(), hashlib.sha256).hexdigest()


def proves(key: bytes, proof: Any, *parts: str) -> bool:
    """Whether `proof` (from a peer) is `mac(key, *parts)`, compared in constant time."""
    return isinstance(proof, str) and hmac.compare_digest(proof, mac(key, *parts))


def encode_state(key: bytes | None = None, **fields) -> bytes:
    """An opaque_state; signed (its field 'mac') when the context LLM has a cluster secret."""
    state = {"v": STATE_VERSION, **fields}
    if key is not None:
        state["mac"] = mac(key, "state", json.dumps(state, sort_keys=True))
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
    if key is not None and not proves(key, state.get("mac"), "state", body):
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


def new_secret() -> str:
    return secrets.token_hex(16)
