"""The FP8 weight-streaming product (pallas_kernels/fp8_matmul.py) against its float32 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8_matmul import fp8_matmul, fp8_matmul_reference, plan
from tests.paged_kv import INTERPRET, lower_for_h100

FP8 = jnp.float8_e4m3fn


def _operands(m, k, n, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    # a wide spread of magnitudes up to E4M3's largest: subnormals to 448 (E4M3FN has no infinity)
    x = jnp.clip(jax.random.normal(kx, (m, k)) * jnp.logspace(-2, 2.5, k), -448, 448).astype(FP8)
    w = jnp.clip(jax.random.normal(kw, (k, n)) * 40.0, -448, 448).astype(FP8)
    return x, w


@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (3, 576, 192), (16, 256, 1024), (7, 1536, 576)])
def test_fp8_matmul_is_the_float32_product(m, k, n):
    """Products of float8 values are exact in bf16 / float32: only the order of the float32 sums
    (slices of K added after) differs from the reference."""
    x, w = _operands(m, k, n)
    got = fp8_matmul(x, w, interpret=INTERPRET)
    want = fp8_matmul_reference(x, w)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4 * float(jnp.abs(want).max()))


def test_plan_fills_the_gpu_with_slices_of_k():
    """Llama-3.1-8B's decode projections: enough programs for 132 multiprocessors, whole 16-row tiles."""
    for k, n in ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)):
        block_n, block_k, splits = plan(1, k, n)
        assert (n // block_n) * splits >= 264 and (k // splits) % block_k == 0 and block_k >= 16


def test_fp8_matmul_refuses_what_it_cannot_do():
    x, w = _operands(1, 64, 48)
    with pytest.raises(ValueError, match="float8_e4m3fn operands"):
        fp8_matmul(x.astype(jnp.bfloat16), w)
    with pytest.raises(ValueError, match="1 <= M <= 16"):
        fp8_matmul(jnp.zeros((17, 64), FP8), w)
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8_matmul(jnp.zeros((1, 60), FP8), jnp.zeros((60, 48), FP8))


def test_fp8_matmul_lowers_to_triton_for_h100():
    x, w = jnp.zeros((1, 4096), FP8), jnp.zeros((4096, 6144), FP8)
    assert lower_for_h100(fp8_matmul, x, w).count("__gpu$xla.gpu.triton") == 1
