"""The one-shot all-reduce kernel (pallas_kernels/all_reduce.py) against lax.psum, its reference.

The kernel reads peers' memory, which the Pallas interpreter cannot model: here it is lowered for
two abstract H100s; on a machine with two or more GPUs it is run and compared with psum bit for bit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from pallas_kernels.all_reduce import one_shot_all_reduce

GPUS = [d for d in jax.devices() if d.platform == "gpu"]


def _over(mesh, fn):
    return jax.shard_map(fn, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)


def test_lowers_for_two_gpus_as_one_mosaic_kernel():
    try:
        device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
        mesh = jax.sharding.AbstractMesh((2,), ("tp",), abstract_device=device)
    except (AttributeError, TypeError) as e:
        pytest.skip(f"this jax cannot describe an abstract GPU: {e}")
    fn = _over(mesh, functools.partial(one_shot_all_reduce, axis_name="tp"))
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(fn).trace(jax.ShapeDtypeStruct((2, 4096), jnp.bfloat16)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1


@pytest.mark.parametrize(
    "shape,dtype,message",
    [((2, 4096), jnp.int32, "int32 is not floating point"), ((2, 100), jnp.bfloat16, r"\(2, 100\) must hold a multiple of 1024")],
)
def test_rejects_what_it_cannot_reduce(shape, dtype, message):
    mesh = Mesh(np.array(jax.devices()[:1]), ("tp",))
    fn = _over(mesh, functools.partial(one_shot_all_reduce, axis_name="tp"))
    with pytest.raises(ValueError, match=message):
        jax.jit(fn).trace(jax.ShapeDtypeStruct(shape, dtype))


@pytest.mark.skipif(len(GPUS) < 2, reason="needs two GPUs")
@pytest.mark.parametrize("shape,dtype", [((2, 4096), jnp.bfloat16), ((16, 4096), jnp.bfloat16), ((2, 1024), jnp.float32)])
def test_equals_psum_on_the_gpus(shape, dtype):
    mesh = Mesh(np.array(GPUS), ("tp",))
    rng = np.random.default_rng(0)
    # A different partial sum on every device: stack one per device and split it over the mesh.
    parts = jax.device_put(jnp.asarray(rng.normal(size=(len(GPUS), *shape)), dtype),
                           jax.sharding.NamedSharding(mesh, P("tp")))  # fmt: skip

    def run(reduce):
        fn = jax.shard_map(lambda a: reduce(a[0])[None], mesh=mesh, in_specs=P("tp"), out_specs=P("tp"), check_vma=False)
        return np.asarray(jax.jit(fn)(parts), np.float32)

    got = run(functools.partial(one_shot_all_reduce, axis_name="tp"))
    want = run(lambda a: jax.lax.psum(a, "tp"))
    for device in range(len(GPUS)):  # every device holds the sum, the same bits everywhere
        np.testing.assert_array_equal(got[device], got[0])
    if len(GPUS) == 2:  # two values rounded once: NCCL's sum too
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-2 if dtype == jnp.bfloat16 else 1e-6)
