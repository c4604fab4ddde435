"""The FP8 weight-streaming product (pallas_kernels/fp8_matmul.py) against its plain-jnp reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8_matmul import Fp8MatmulTiling, fp8_matmul, fp8_matmul_reference, plan
from tests.paged_kv import INTERPRET, lower_for_h100

FP8 = jnp.float8_e4m3fn


def _operands(m, k, n, dtype=jnp.bfloat16, seed=0):
    kx, kw, ks = jax.random.split(jax.random.key(seed), 3)
    # rows with a wide spread of magnitudes, so that per-row quantization rounds and saturates
    x = (jax.random.normal(kx, (m, k)) * jnp.logspace(-2, 2.5, k)).astype(dtype)
    w = jnp.clip(jax.random.normal(kw, (k, n)) * 40.0, -448, 448).astype(FP8)
    w_scale = jax.random.uniform(ks, (n,), minval=1e-3, maxval=1e-2)
    # per-row scales below amax / 448 for some rows: their largest values saturate
    x_scale = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=1) / 448 * jnp.linspace(0.5, 1.0, m)
    return x, x_scale, w, w_scale


@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (3, 576, 192), (16, 256, 1024), (7, 1536, 576)])
@pytest.mark.parametrize("quantize_input", [True, False])
def test_fp8_matmul_is_the_reference_product(m, k, n, quantize_input):
    """Products of float8 values are exact in 16-bit floats and float32: the order of the float32 sums
    (slices of K added after) and the output's rounding alone differ from the reference."""
    x, x_scale, w, w_scale = _operands(m, k, n, jnp.float32 if quantize_input else jnp.bfloat16)
    got = fp8_matmul(x, x_scale, w, w_scale, quantize_input=quantize_input, interpret=INTERPRET)
    want = fp8_matmul_reference(x, x_scale, w, w_scale, quantize_input=quantize_input)
    assert got.shape == (m, n) and got.dtype == x.dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    rtol = 1e-5 if x.dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(np.abs(want).max()))


def test_fp8_matmul_in_float16_tiles_and_other_tilings():
    x, x_scale, w, w_scale = _operands(5, 1024, 256, jnp.float32)
    want = np.asarray(fp8_matmul_reference(x, x_scale, w, w_scale))
    for tiling in (Fp8MatmulTiling(compute_dtype="float16"), Fp8MatmulTiling(block_n=64, block_k=128, target_programs=8)):
        got = np.asarray(fp8_matmul(x, x_scale, w, w_scale, tiling=tiling, interpret=INTERPRET))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_plan_fills_the_gpu_with_slices_of_k():
    """Llama-3.1-8B's decode projections: enough programs for 132 multiprocessors, whole 16-row tiles."""
    for k, n in ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)):
        block_n, block_k, splits = plan(1, k, n)
        assert (n // block_n) * splits >= 264 and (k // splits) % block_k == 0 and block_k >= 16


def test_fp8_matmul_refuses_what_it_cannot_do():
    x, x_scale, w, w_scale = _operands(1, 64, 48)
    with pytest.raises(ValueError, match="float8_e4m3fn weight"):
        fp8_matmul(x, x_scale, w.astype(jnp.bfloat16), w_scale)
    with pytest.raises(ValueError, match="x dtype int32"):
        fp8_matmul(x.astype(jnp.int32), x_scale, w, w_scale)
    with pytest.raises(ValueError, match="1 <= M <= 16"):
        fp8_matmul(jnp.zeros((17, 64)), jnp.ones(17), w, w_scale)
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8_matmul(jnp.zeros((1, 60)), x_scale, jnp.zeros((60, 48), FP8), w_scale)
    with pytest.raises(ValueError, match="scales"):
        fp8_matmul(x, jnp.ones(2), w, w_scale)


def test_fp8_matmul_lowers_to_triton_for_h100():
    x, w = jnp.zeros((1, 4096), jnp.bfloat16), jnp.zeros((4096, 6144), FP8)
    for tiling in (Fp8MatmulTiling(), Fp8MatmulTiling(compute_dtype="float16")):
        text = lower_for_h100(lambda x, w: fp8_matmul(x, jnp.ones(1), w, jnp.ones(6144), tiling=tiling), x, w)
        assert text.count("__gpu$xla.gpu.triton") == 1


@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("quantize_input", [True, False])
def test_fp8_matmul_fma_form(m, quantize_input):
    """The CUDA-core form for a row or two: each real row's products summed in float32."""
    x, x_scale, w, w_scale = _operands(m, 512, 384, jnp.float32 if quantize_input else jnp.bfloat16)
    tiling = Fp8MatmulTiling(form="fma", block_n=128, block_k=32, target_programs=12)
    got = np.asarray(fp8_matmul(x, x_scale, w, w_scale, quantize_input=quantize_input, tiling=tiling,
                                interpret=INTERPRET), np.float32)  # fmt: skip
    want = np.asarray(fp8_matmul_reference(x, x_scale, w, w_scale, quantize_input=quantize_input), np.float32)
    rtol = 1e-5 if quantize_input else 1e-2
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(np.abs(want).max()))
    assert lower_for_h100(lambda x, w: fp8_matmul(x, x_scale, w, w_scale, tiling=tiling), x, w).count(
        "__gpu$xla.gpu.triton") == 1  # fmt: skip
