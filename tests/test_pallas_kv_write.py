"""The K/V cache write kernel (pallas_kernels/kv_write.py) against `write_kv`, its jnp reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ModelConfig, RopeConfig
from jaxllm.layers.attention import write_kv
from jaxllm.layers.rope import apply_rotary, rotary_cos_sin
from jaxllm.models.params import split_fused
from pallas_kernels.kv_write import rope_write_kv_kernel, rope_write_kv_reference, write_kv_kernel
from tests.paged_kv import INTERPRET, lower_for_h100


def _case(rng, *, num_kv_heads, num_pages, page_size, head_dim, num_tokens, dtype):
    shape = (num_kv_heads, num_pages, page_size, head_dim)
    k_pages, v_pages = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(num_tokens, num_kv_heads, head_dim)), jnp.float32) for _ in range(2))
    # Distinct slots outside the null page, then two padding tokens that both write slot 0.
    slots = rng.permutation(np.arange(page_size, num_pages * page_size))[:num_tokens].astype(np.int32)
    slots[-2:] = 0
    return k_pages, v_pages, k, v, jnp.asarray(slots)


@pytest.mark.parametrize(
    "num_kv_heads,page_size,head_dim,num_tokens,dtype",
    [(4, 16, 128, 2, jnp.bfloat16), (3, 4, 64, 37, jnp.float32), (1, 8, 80, 5, jnp.bfloat16),
     (2, 16, 256, 48, jnp.bfloat16)],  # fmt: skip
)
def test_matches_write_kv(num_kv_heads, page_size, head_dim, num_tokens, dtype):
    """Same caches as the jnp scatter, including a cast to the cache dtype, token counts that are
    not a power of two, a head_dim that is not one, and padding tokens sharing the null slot."""
    case = _case(np.random.default_rng(num_tokens), num_kv_heads=num_kv_heads, num_pages=num_tokens + 3,
                 page_size=page_size, head_dim=head_dim, num_tokens=num_tokens, dtype=dtype)  # fmt: skip
    want = write_kv(*case)
    got = write_kv_kernel(*case, interpret=INTERPRET)
    # Slot 0 holds whichever padding token wrote last: compare every other slot exactly.
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g[:, 1:], np.float32), np.asarray(w[:, 1:], np.float32))
        np.testing.assert_array_equal(np.asarray(g[:, 0, 1:], np.float32), np.asarray(w[:, 0, 1:], np.float32))


def _rope_case(rng, *, num_heads, num_kv_heads, page_size, head_dim, num_tokens, dtype, cache_dtype=None):
    k_pages, v_pages, k, v, slots = _case(rng, num_kv_heads=num_kv_heads, num_pages=num_tokens + 3,
                                          page_size=page_size, head_dim=head_dim, num_tokens=num_tokens,
                                          dtype=cache_dtype or dtype)  # fmt: skip
    q = jnp.asarray(rng.normal(size=(num_tokens, num_heads, head_dim)), dtype)
    positions = jnp.asarray(rng.integers(0, 40000, num_tokens), jnp.int32)
    cos, sin = rotary_cos_sin(positions, RopeConfig(theta=500000.0), head_dim, dtype)
    return (k_pages, v_pages, q, k.astype(dtype), v.astype(dtype), cos, sin, slots)


def _assert_rope_write_equal(got, want):
    """Equal in bfloat16 and float8 (each product and sum rounded to the dtype leaves a compiler no
    contraction to choose); in float32 within an ulp or two (a fused multiply-add may be used)."""

    def same(g, w):
        assert g.dtype == w.dtype and g.shape == w.shape
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        if want[0].dtype == jnp.float32:
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(g, w)

    same(got[0], want[0])
    for g, w in zip(got[1:], want[1:]):  # slot 0: whichever padding token wrote last
        same(g[:, 1:], w[:, 1:])
        same(g[:, 0, 1:], w[:, 0, 1:])


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,page_size,head_dim,num_tokens,dtype,cache_dtype",
    [(8, 2, 16, 128, 2, jnp.bfloat16, None), (6, 3, 4, 64, 37, jnp.float32, None),
     (4, 1, 8, 80, 5, jnp.bfloat16, None), (4, 2, 16, 256, 48, jnp.bfloat16, None),
     (4, 2, 8, 64, 9, jnp.bfloat16, jnp.float8_e4m3fn), (2, 2, 4, 32, 1, jnp.float32, None),
     (9, 3, 8, 64, 3, jnp.bfloat16, None)],  # fmt: skip
)
def test_rope_write_matches_the_engine_rotation_and_write(num_heads, num_kv_heads, page_size, head_dim, num_tokens,
                                                          dtype, cache_dtype):  # fmt: skip
    """The rotated queries and the caches equal the engine's XLA path (layers/rope.apply_rotary, then
    write_kv) bit for bit: GQA groups (SmolLM2's 3 a KV head too), MHA, a head_dim whose half is not
    a power of two, a float8 cache, one token, token counts that are not a power of two, padding
    tokens on the null slot."""
    k_pages, v_pages, q, k, v, cos, sin, slots = _rope_case(
        np.random.default_rng(num_tokens), num_heads=num_heads, num_kv_heads=num_kv_heads, page_size=page_size,
        head_dim=head_dim, num_tokens=num_tokens, dtype=dtype, cache_dtype=cache_dtype)  # fmt: skip
    engine = (apply_rotary(q, cos, sin), *write_kv(k_pages, v_pages, apply_rotary(k, cos, sin), v, slots))
    half = head_dim // 2
    args = (k_pages, v_pages, q, k, v, cos[:, :half], sin[:, :half], slots)
    _assert_rope_write_equal(rope_write_kv_reference(*args), engine)
    _assert_rope_write_equal(rope_write_kv_kernel(*args, interpret=INTERPRET), engine)


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,num_tokens,dtype,cache_dtype",
    [(8, 2, 128, 2, jnp.bfloat16, None), (9, 3, 64, 37, jnp.float32, None), (4, 4, 80, 5, jnp.bfloat16, None),
     (4, 2, 64, 9, jnp.bfloat16, jnp.float8_e4m3fn)],  # fmt: skip
)
def test_rope_write_reads_the_fused_projection_output(num_heads, num_kv_heads, head_dim, num_tokens, dtype,
                                                      cache_dtype):  # fmt: skip
    """Given the fused QKV projection's output [T, K, G + 2, d] (models/params.py's layout) instead
    of q, k and v, the kernel gives exactly what it gives for their split (split_fused's)."""
    rng = np.random.default_rng(num_tokens + 100)
    k_pages, v_pages, _, _, _, cos, sin, slots = _rope_case(
        rng, num_heads=num_heads, num_kv_heads=num_kv_heads, page_size=8, head_dim=head_dim, num_tokens=num_tokens,
        dtype=dtype, cache_dtype=cache_dtype)  # fmt: skip
    group = num_heads // num_kv_heads
    qkv = jnp.asarray(rng.normal(size=(num_tokens, num_kv_heads, group + 2, head_dim)), dtype)
    cfg = ModelConfig("LlamaForCausalLM", "llama", vocab_size=8, hidden_size=num_heads * head_dim, intermediate_size=8,
                      num_layers=1, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                      rms_norm_eps=1e-5, rope=RopeConfig(theta=1e4))  # fmt: skip
    q, k, v = split_fused(cfg, "wqkv", qkv)
    half = head_dim // 2
    tables = (cos[:, :half], sin[:, :half], slots)
    want = rope_write_kv_kernel(k_pages, v_pages, q, k, v, *tables, interpret=INTERPRET)
    _assert_rope_write_equal(rope_write_kv_kernel(k_pages, v_pages, None, None, None, *tables, qkv=qkv,
                                                  interpret=INTERPRET), want)  # fmt: skip
    _assert_rope_write_equal(rope_write_kv_reference(k_pages, v_pages, None, None, None, *tables, qkv=qkv), want)
    with pytest.raises(ValueError, match="q, k and v, or qkv alone"):
        rope_write_kv_kernel(k_pages, v_pages, q, None, None, *tables, qkv=qkv)
    with pytest.raises(ValueError, match=r"qkv \(.*\) must be \[T, "):
        rope_write_kv_kernel(k_pages, v_pages, None, None, None, *tables, qkv=qkv[:, :, :2])


def test_rope_write_rejects_mismatched_shapes():
    args = list(_rope_case(np.random.default_rng(3), num_heads=4, num_kv_heads=2, page_size=4, head_dim=32,
                           num_tokens=4, dtype=jnp.float32))  # fmt: skip
    args[5], args[6] = args[5][:, :16], args[6][:, :16]
    with pytest.raises(ValueError, match=r"q \(4, 3, 32\)"):
        rope_write_kv_kernel(*args[:2], jnp.zeros((4, 3, 32)), *args[3:])
    with pytest.raises(ValueError, match=r"cos \(4, 32\)"):
        rope_write_kv_kernel(*args[:5], jnp.zeros((4, 32)), *args[6:])


def test_donated_caches_under_jit():
    """Under a jit that donates the caches (as the engine's step does), the result is the same."""
    case = _case(np.random.default_rng(1), num_kv_heads=2, num_pages=6, page_size=4, head_dim=32, num_tokens=4,
                 dtype=jnp.bfloat16)  # fmt: skip
    want = write_kv(*case)
    step = jax.jit(functools.partial(write_kv_kernel, interpret=INTERPRET), donate_argnums=(0, 1))
    got = step(case[0].copy(), case[1].copy(), *case[2:])
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g[:, 1:]), np.asarray(w[:, 1:]))


def test_rejects_mismatched_shapes():
    case = _case(np.random.default_rng(2), num_kv_heads=2, num_pages=6, page_size=4, head_dim=32, num_tokens=4,
                 dtype=jnp.float32)  # fmt: skip
    with pytest.raises(ValueError, match=r"k \(4, 3, 32\)"):
        write_kv_kernel(case[0], case[1], jnp.zeros((4, 3, 32)), case[3], case[4])


@pytest.mark.parametrize("num_tokens,head_dim", [(2, 128), (8192, 128), (6, 80)])
def test_lowers_to_triton_for_h100(num_tokens, head_dim):
    """The compiled path is one Triton kernel whose outputs alias the caches."""
    pages = jax.ShapeDtypeStruct((4, 512, 16, head_dim), jnp.bfloat16)
    new = jax.ShapeDtypeStruct((num_tokens, 4, head_dim), jnp.bfloat16)
    slots = jax.ShapeDtypeStruct((num_tokens,), jnp.int32)
    text = lower_for_h100(write_kv_kernel, pages, pages, new, new, slots)
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert "output_operand_aliases" in text
    q = jax.ShapeDtypeStruct((num_tokens, 16, head_dim), jnp.bfloat16)
    table = jax.ShapeDtypeStruct((num_tokens, head_dim // 2), jnp.bfloat16)
    text = lower_for_h100(rope_write_kv_kernel, pages, pages, q, new, new, table, table, slots)
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert "output_operand_aliases" in text
    qkv = jax.ShapeDtypeStruct((num_tokens, 4, 6, head_dim), jnp.bfloat16)
    fused = lambda kp, vp, c, s, sl, x: rope_write_kv_kernel(kp, vp, None, None, None, c, s, sl, qkv=x)  # noqa: E731
    text = lower_for_h100(fused, pages, pages, table, table, slots, qkv)
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert "output_operand_aliases" in text
