"""ModelRunner: owns the weights and the KV cache on the device, and the one jitted step.

The scheduler hands it a list of (sequence, token count); it packs them into a `BatchMetadata`
padded to a shape bucket, builds the `SamplingBatch`, runs `step` (forward + sampling, KV cache
donated) and returns host numpy results.

Shape buckets (each distinct bucket compiles once):
  decode-only steps: B = T in SEQ_BUCKETS (powers of two up to max_batch_size), max_query_len 1;
  mixed steps:       T in TOKEN_BUCKETS (powers of two from 16 up to max_num_tokens),
                     B in SEQ_BUCKETS, max_query_len a power of two <= T;
  pages per sequence P in powers of two up to ceil(max_seq_len / page_size).
Static sampling switches (logprobs count, truncation, penalties, bias, bans) and the logits mode
(last token, or every token for prompt_logprobs / context logits) also key compilations; requests
that use none of them share the plain variant.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.layers import sampling as sampling_lib
from jaxllm.models.batch import BatchMetadata, build_batch
from jaxllm.models.transformer import forward, init_kv_cache
from jaxllm.sampling_params import MAX_LOGPROBS

logger = logging.getLogger(__name__)


def powers_of_two(low: int, high: int) -> list[int]:
    """[low, 2*low, ..., high] with `high` itself as the last bucket."""
    buckets, b = [], low
    while b < high:
        buckets.append(b)
        b *= 2
    buckets.append(high)
    return buckets


def bucket_for(value: int, buckets: list[int]) -> int:
    for b in buckets:
        if value <= b:
            return b
    raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    max_num_tokens: int
    max_batch_size: int
    max_seq_len: int
    page_size: int
    num_pages: int
    backend: str = "xla"
    kv_dtype: Any = None  # None: the weights' dtype


@dataclasses.dataclass
class StepRequest:
    """One scheduled sequence, as the runner needs it."""

    token_ids: list[int]  # tokens computed this step
    start: int  # position of the first of them
    block_table: list[int]
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    counter: int = 0
    num_logprobs: int = 0
    logit_bias: np.ndarray | None = None
    penalty_tokens: list[int] | None = None
    penalty_counts: list[int] | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    banned_tokens: list[int] | None = None
    prompt_logprobs_next: list[int] | None = None  # next tokens of this chunk, for prompt_logprobs
    want_all_logits: bool = False  # return logits of every token of this chunk (context logits)
    want_last_logits: bool = False  # return the last token's logits (generation logits, processors)


class ModelRunner:
    def __init__(self, cfg: ModelConfig, params: dict, config: RunnerConfig, kv_sharding=None, mesh=None):
        self.cfg = cfg
        self.params = params
        self.config = config
        self.dtype = params["embed"].dtype
        self.kv_dtype = config.kv_dtype or self.dtype
        self.kv_sharding = kv_sharding
        self.mesh = mesh
        self.kv_cache = self._new_cache()
        self.seq_buckets = powers_of_two(1, config.max_batch_size)
        self.token_buckets = powers_of_two(min(16, config.max_num_tokens), config.max_num_tokens)
        max_pages = -(-config.max_seq_len // config.page_size)
        self.page_buckets = powers_of_two(1, max_pages)
        self.compiled_shapes: set[tuple] = set()
        self._lock = threading.Lock()
        self._step = jax.jit(
            functools.partial(_step, cfg=cfg, backend=config.backend),
            static_argnames=("logits_mode",),
            donate_argnums=(1,),
        )

    def _new_cache(self):
        cache = init_kv_cache(self.cfg, self.config.num_pages, self.config.page_size, self.kv_dtype)
        if self.kv_sharding is not None:
            cache = jax.device_put(cache, self.kv_sharding)
        return cache

    def reset_cache(self) -> None:
        """Drop and rebuild the KV cache (after a failed step left the donated buffers invalid)."""
        self.kv_cache = self._new_cache()

    @property
    def num_compilations(self) -> int:
        return len(self.compiled_shapes)

    # ---- packing ---------------------------------------------------------------------------
    def bucket_shape(self, requests: list[StepRequest]) -> tuple[int, int, int, int]:
        """(num_tokens T, num_seqs B, pages_per_seq P, max_query_len Q) for a step."""
        lens = [len(r.token_ids) for r in requests]
        B = bucket_for(len(requests), self.seq_buckets)
        pages = max(len(r.block_table) for r in requests)
        P = bucket_for(pages, self.page_buckets)
        if max(lens) == 1:
            return B, B, P, 1
        T = bucket_for(sum(lens), self.token_buckets)
        Q = min(T, 1 << (max(lens) - 1).bit_length())
        return T, B, P, Q

    def _sampling_batch(self, requests: list[StepRequest], B: int) -> sampling_lib.SamplingBatch:
        n = len(requests)

        def col(name, dtype, fill):
            arr = np.full(B, fill, dtype)
            arr[:n] = [getattr(r, name) for r in requests]
            return arr

        seeds = np.zeros((B, 2), np.uint32)
        for i, r in enumerate(requests):
            seeds[i] = (r.seed >> 32) & 0xFFFFFFFF, r.seed & 0xFFFFFFFF
        truncate = any(r.top_k > 0 or r.top_p < 1.0 or r.min_p > 0 for r in requests if r.temperature > 0)
        penalize = any(
            r.repetition_penalty != 1.0 or r.presence_penalty != 0.0 or r.frequency_penalty != 0.0 for r in requests
        )
        logit_bias = None
        if any(r.logit_bias is not None for r in requests):
            logit_bias = np.zeros((B, self.cfg.vocab_size), np.float32)
            for i, r in enumerate(requests):
                if r.logit_bias is not None:
                    logit_bias[i] = r.logit_bias
        penalty_tokens = penalty_counts = rep = pres = freq = None
        if penalize:
            L = 1 << max(1, max(len(r.penalty_tokens or []) for r in requests) - 1).bit_length()
            penalty_tokens = np.full((B, L), -1, np.int32)
            penalty_counts = np.zeros((B, L), np.int32)
            for i, r in enumerate(requests):
                toks = r.penalty_tokens or []
                penalty_tokens[i, : len(toks)] = toks
                penalty_counts[i, : len(toks)] = r.penalty_counts or [0] * len(toks)
            rep = col("repetition_penalty", np.float32, 1.0)
            pres = col("presence_penalty", np.float32, 0.0)
            freq = col("frequency_penalty", np.float32, 0.0)
        banned = None
        if any(r.banned_tokens for r in requests):
            N = 1 << max(0, max(len(r.banned_tokens or []) for r in requests) - 1).bit_length()
            banned = np.full((B, N), -1, np.int32)
            for i, r in enumerate(requests):
                if r.banned_tokens:
                    banned[i, : len(r.banned_tokens)] = r.banned_tokens
        num_logprobs = MAX_LOGPROBS if any(r.num_logprobs for r in requests) else 0
        return sampling_lib.SamplingBatch(
            temperature=col("temperature", np.float32, 0.0),
            top_k=col("top_k", np.int32, 0),
            top_p=col("top_p", np.float32, 1.0),
            min_p=col("min_p", np.float32, 0.0),
            seeds=seeds,
            counters=col("counter", np.int32, 0),
            logit_bias=logit_bias,
            penalty_tokens=penalty_tokens,
            penalty_counts=penalty_counts,
            repetition_penalty=rep,
            presence_penalty=pres,
            frequency_penalty=freq,
            banned_tokens=banned,
            num_logprobs=num_logprobs,
            truncate=truncate,
            penalize=penalize,
        )

    def run(self, requests: list[StepRequest]) -> dict[str, np.ndarray]:
        """Run one step; returns host arrays with a row per request (padding rows cut off).

        Keys: tokens, logprob, rank, (top_ids, top_logprobs), and when asked for:
        prompt_logprob / prompt_rank / prompt_top_ids / prompt_top_logprobs per packed token,
        all_logits [tokens, V], last_logits [requests, V].
        """
        T, B, P, Q = self.bucket_shape(requests)
        batch = build_batch(
            [r.token_ids for r in requests],
            [r.start for r in requests],
            [r.block_table for r in requests],
            self.config.page_size,
            num_tokens=T,
            num_seqs=B,
            pages_per_seq=P,
            max_query_len=Q,
        )
        sampling = self._sampling_batch(requests, B)
        want_prompt = any(r.prompt_logprobs_next is not None for r in requests)
        want_all = any(r.want_all_logits for r in requests)
        want_last = any(r.want_last_logits for r in requests)
        logits_mode = "all" if want_all else "prompt" if want_prompt else "last+" if want_last else "last"
        next_tokens = np.zeros(T, np.int32)
        if want_prompt:
            offset = 0
            for r in requests:
                if r.prompt_logprobs_next is not None:
                    next_tokens[offset : offset + len(r.prompt_logprobs_next)] = r.prompt_logprobs_next
                offset += len(r.token_ids)
        shape_key = (T, B, P, Q, logits_mode, sampling.num_logprobs, sampling.truncate, sampling.penalize,
                     None if sampling.logit_bias is None else "bias",
                     None if sampling.banned_tokens is None else sampling.banned_tokens.shape,
                     None if sampling.penalty_tokens is None else sampling.penalty_tokens.shape)  # fmt: skip
        with self._lock:
            self.compiled_shapes.add(shape_key)
            out, self.kv_cache = self._step(self.params, self.kv_cache, batch, sampling, next_tokens, logits_mode=logits_mode)
        host = jax.device_get(out)
        n = len(requests)
        result = {k: v[:n] for k, v in host.items() if not k.startswith(("prompt_", "all_"))}
        for k, v in host.items():
            if k.startswith(("prompt_", "all_")):
                result[k] = v  # per packed token; the caller slices by its offsets
        return result


def _step(params, kv_cache, batch: BatchMetadata, sampling, next_tokens, *, cfg, backend, logits_mode):
    """forward + sample: the one function the runner jits. kv_cache is donated."""
    every_token = logits_mode in ("all", "prompt")
    logits, kv_cache = forward(params, batch, kv_cache, cfg, backend=backend, all_logits=every_token)
    last = logits[batch.logits_indices] if every_token else logits
    out = sampling_lib.sample(last, sampling)
    if every_token:
        prompt = sampling_lib.prompt_logprobs(logits, next_tokens, sampling.num_logprobs or 1)
        out.update({f"prompt_{k}": v for k, v in prompt.items()})
    if logits_mode == "all":
        out["all_logits"] = logits
    if logits_mode != "last":
        out["last_logits"] = last
    return out, kv_cache
