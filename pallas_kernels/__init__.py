"""Pallas (Triton) kernels for NVIDIA GPUs over the paged KV cache, each with its plain-jnp reference.

  paged_decode_attention    one query token per sequence, split-K (flash-decoding)
  ragged_paged_attention    prefill and mixed steps: many query tokens per sequence, packed
  write_kv_kernel           a step's keys and values into both caches, in place (kv_write.py)
  rope_write_kv_kernel      the same with the rotary embedding of the step's queries and keys

Each entry validates its inputs (ValueError) and takes `interpret=` to run in the Pallas
interpreter on the CPU. The pages may be float8 E4M3 (an fp8 KV cache) under float32 / bfloat16 /
float16 queries: the attention kernels upcast each K/V tile, the write saturates into it. This
package does not import jaxllm: `jaxllm.layers.attention` chooses the kernel for a step
(`paged_attention_pallas`) from its batch metadata.
"""

from __future__ import annotations

from pallas_kernels.kv_write import rope_write_kv_kernel, rope_write_kv_reference, write_kv_kernel, write_kv_reference
from pallas_kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_reference
from pallas_kernels.ragged_paged_attention import ragged_paged_attention, ragged_paged_attention_reference

__all__ = [
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "rope_write_kv_kernel",
    "rope_write_kv_reference",
    "write_kv_kernel",
    "write_kv_reference",
]
