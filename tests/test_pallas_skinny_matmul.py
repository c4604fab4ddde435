"""The few-row matmul kernel (pallas_kernels/skinny_matmul.py) against jnp.dot, its reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

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


def test_tile_rule():
    """Column blocks of 32 (64 when that still gives 96 programs), K split when columns are few, and
    None where the kernel cannot tile (the projection then takes XLA's GEMM)."""
    from pallas_kernels.skinny_matmul import tile_for

    assert tile_for(4096, 4096) == SkinnyConfig(32, 256, 1, 4, 4)
    assert tile_for(4096, 7168) == SkinnyConfig(64, 256, 1, 4, 3)
    assert tile_for(4096, 2048) == SkinnyConfig(32, 256, 2, 4, 4)
    assert tile_for(4096, 512) == SkinnyConfig(32, 256, 4, 4, 4)
    assert tile_for(64, 64) == SkinnyConfig(32, 16, 4, 4, 4)
    assert tile_for(48, 330) is None


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 (virtual) devices")
@pytest.mark.parametrize("tp", [1, 2])
def test_projections_through_the_kernel_match_xla(tp):
    """The 'pallas' projections (jaxllm/layers/linear.py) against the XLA reference for every kind of
    weight: column-parallel, the two-axis output projection and the row-parallel ones summed over the
    mesh; the kernel is in the program, and more than 16 rows take XLA's product."""
    from jax.sharding import NamedSharding

    from jaxllm.layers.linear import dense_projection, few_row_projection
    from jaxllm.sharding import make_mesh

    mesh = make_mesh(tp) if tp > 1 else None
    specs = {"wq": P(None, "tp", None), "wo": P("tp", None, None), "w_down": P("tp", None), "lm_head": P(None, "tp")}
    rng = np.random.default_rng(tp)
    cases = {"wq": ((2, 64), (64, 4, 16)), "wo": ((3, 4, 16), (4, 16, 64)), "w_down": ((2, 128), (128, 64)),
             "lm_head": ((2, 64), (64, 256))}  # fmt: skip
    project = few_row_projection(mesh, specs if mesh else None)
    for name, (xs, ws) in cases.items():
        x, w = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (xs, ws))
        if mesh is not None:
            w = jax.device_put(w, NamedSharding(mesh, specs[name]))
        fn = jax.jit(lambda a, b, name=name: project(name, a, b))
        assert "skinny_matmul" in str(fn.trace(x, w).jaxpr), name
        np.testing.assert_allclose(np.asarray(fn(x, w)), np.asarray(dense_projection(name, x, w)), rtol=1e-5, atol=1e-5)
    wide = jnp.ones((17, 64), jnp.float32)
    w = jnp.ones((64, 4, 16), jnp.float32)
    assert "skinny_matmul" not in str(jax.jit(lambda a, b: project("wq", a, b)).trace(wide, w).jaxpr)
