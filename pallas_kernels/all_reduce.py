"""A one-shot all-reduce for small arrays over NVLink: each GPU reads its peers' partial sums
straight from their memory and adds them up, in one Mosaic GPU kernel.

A batch-1 decode step under tensor parallelism all-reduces a few rows of the hidden size twice a
layer (16 KB at Llama-3.1-8B's 4096 in bfloat16, two rows). NCCL's all-reduce of that size took
6.9 us a call on two H200s (benchmarks/RESULTS.md), most of it latency: its ring passes the data
in steps, with a handshake each. Here every device loads each peer's whole array through peer
memory access (`plgpu.remote_ref`, no NVLink multicast) once the kernel has started on all of
them, sums in float32 in device order (so every device holds the same bits), and signals the
peers that it has finished reading before any of them may return and free its input.

Call it inside `jax.shard_map` over the reduced axis, like `lax.psum`, which is its reference.
The sum of two bfloat16 values rounded once, as here, is also what NCCL gives at two devices.

One process driving all the GPUs only: there XLA hands the kernel its peers' ordinary buffer
addresses. With one process per GPU, Mosaic GPU asks XLA to place every argument in collective
memory, which XLA backs with an NVLink multicast object, and the machines this project measures on
forbid creating those (their multicast is off for everyone's sake).

Not used by the model: reducing the o and down projections' outputs with it made a TP=2 batch-1 decode
step slower than XLA's NCCL all-reduces (3.68 against 3.44 ms a token on two H200s; benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

VEC_BYTES = 16  # one 128-bit load per thread and step
TILE_VECTORS = 128 * 8  # a warpgroup's 128 threads, 8 vectors each, per block and loop step
MAX_BLOCKS = 16  # a few KB per block: a 16 KB array takes 2 blocks; latency, not bandwidth, bounds it


def one_shot_all_reduce(x: jax.Array, *, axis_name, interpret: bool = False) -> jax.Array:
    """lax.psum(x, axis_name) of a small floating-point array, inside shard_map over axis_name."""
    num_devices = lax.axis_size(axis_name)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"one_shot_all_reduce: x's dtype {x.dtype} is not floating point")
    size = math.prod(x.shape)
    vec = VEC_BYTES // x.dtype.itemsize
    if size % (128 * vec):
        raise ValueError(f"one_shot_all_reduce: x {x.shape} must hold a multiple of {128 * vec} elements "
                         f"(128 threads x {vec} of {x.dtype})")  # fmt: skip
    tile = math.gcd(size, TILE_VECTORS * vec)
    num_tiles = size // tile
    num_blocks = min(num_tiles, MAX_BLOCKS)
    layout = plgpu.Layout.WG_STRIDED((tile,), vec_size=vec)

    def kernel(x_ref, o_ref, done):
        me = lax.axis_index(axis_name)

        @plgpu.nd_loop((num_tiles,), collective_axes="blocks")
        def _sum_tile(info: plgpu.NDLoopInfo):
            (t,) = info.index
            part = pl.ds(t * tile, tile)
            total = None
            for device in range(num_devices):  # device order: the same rounding on every device
                v = plgpu.layout_cast(plgpu.remote_ref(x_ref, device)[part], layout).astype(jnp.float32)
                total = v if total is None else total + v
            o_ref[part] = total.astype(o_ref.dtype)

        # Each block tells the same block on every peer that it has read that peer's input, and
        # returns only once every peer has read its own.
        for step in range(1, num_devices):
            pl.semaphore_signal(done, device_id=lax.rem(me + step, num_devices))
        pl.semaphore_wait(done, num_devices - 1)

    flat = x.reshape(size)
    out = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((size,), x.dtype),
        grid=(num_blocks,),
        grid_names=("blocks",),
        scratch_types=[plgpu.SemaphoreType.REGULAR],
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret,
    )(flat)
    return out.reshape(x.shape)
