"""The few-row matmul kernel (pallas_kernels/skinny_matmul.py) against jnp.dot, its reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.skinny_matmul import SkinnyConfig, skinny_matmul
from tests.paged_kv import INTERPRET, lower_for_h100


@pytest.mark.parametrize(
    "rows,k,n,dtype,config",
    [(2, 512, 128, jnp.float32, SkinnyConfig(32, 128, 1)), (3, 1024, 64, jnp.float32, SkinnyConfig(16, 128, 2)),
     (2, 512, 96, jnp.bfloat16, SkinnyConfig(32, 256, 2)), (16, 256, 64, jnp.bfloat16, SkinnyConfig(64, 64, 1))],  # fmt: skip
)
def test_matches_dot(rows, k, n, dtype, config):
    """Row counts below 16 and not powers of two (masked), K split over programs (partial sums added
    after the kernel), and both dtypes; float32 sums in another order, so within rounding."""
    rng = np.random.default_rng(rows + k)
    x, w = jnp.asarray(rng.normal(size=(rows, k)), dtype), jnp.asarray(rng.normal(size=(k, n)), dtype)
    got = skinny_matmul(x, w, config, interpret=INTERPRET)
    want = jnp.dot(x, w, preferred_element_type=jnp.float32, precision="highest").astype(dtype)
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
    ulp = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2 * ulp,
                               atol=1e-5 * scale if dtype == jnp.float32 else 0)  # fmt: skip


def test_rejects_shapes_it_cannot_tile():
    x = jnp.zeros((2, 256))
    with pytest.raises(ValueError, match=r"at most 16 rows"):
        skinny_matmul(jnp.zeros((17, 256)), jnp.zeros((256, 64)), interpret=True)
    with pytest.raises(ValueError, match=r"blocks of 512 x 32"):
        skinny_matmul(x, jnp.zeros((256, 64)), SkinnyConfig(32, 256, 2), interpret=True)


def test_lowers_for_the_gpu_as_one_triton_call():
    x = jax.ShapeDtypeStruct((2, 4096), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((4096, 3072), jnp.bfloat16)
    text = lower_for_h100(lambda a, b: skinny_matmul(a, b, SkinnyConfig(32, 256, 1)), x, w)
    assert text.count("__gpu$xla.gpu.triton") == 1
