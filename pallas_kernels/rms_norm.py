"""The residual add and the RMSNorm after it, in one kernel.

A decoder layer ends its attention and its MLP with `x = x + out; h = rms_norm(x, w)`. XLA makes
two or three kernels of that (the add, the reduction, and the normalisation fused into whatever
reads it), each a launch of a few microseconds at batch 1. This kernel reads x and out once and
writes both the new residual stream and the normalised rows (the "fused add + RMSNorm" of other
engines). Without `delta` it is the norm alone.

`jaxllm.layers.norms.add_rms_norm` is the plain-jnp reference, and the rounding is the same step by
step: the sum is rounded to x's dtype before it is normalised, and the two weight orders of
`rms_norm` (Llama: weight * normalised-then-rounded; Gemma: (1 + weight) in float32) are kept.

One program handles a block of whole rows; a hidden size that is not a power of two is padded in
registers and masked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_decode_attention import load_rows, pow2_divisor

# Elements of the [rows, hidden] float32 tile one program holds: a decode step's rows of an
# 8B model (hidden 4096) take one or two programs; a prefill chunk T / 2 of them.
TILE_ELEMENTS = 8192


def _add_rms_norm_kernel(*refs, has_delta: bool, eps: float, offset: float, dim: int, row_block: int,
                         dim_block: int):  # fmt: skip
    """x_ref, [d_ref,] w_ref -> [s_ref,] h_ref; all [T, D] but w_ref [D]."""
    if has_delta:
        x_ref, d_ref, w_ref, s_ref, h_ref = refs
    else:
        (x_ref, w_ref, h_ref), d_ref, s_ref = refs, None, None
    rows = pl.program_id(0) * row_block + jnp.arange(row_block)
    cols = jnp.arange(dim_block)
    col_ok = cols < dim
    mask = None if dim_block == dim else jnp.broadcast_to(col_ok[None, :], (row_block, dim_block))
    x = load_rows(x_ref, rows, cols, mask)
    if has_delta:
        x = (x.astype(jnp.float32) + load_rows(d_ref, rows, cols, mask).astype(jnp.float32)).astype(s_ref.dtype)
        at = s_ref.at[rows[:, None], cols[None, :]]
        plgpu.store(at, x) if mask is None else plgpu.store(at, x, mask=mask)
    x32 = x.astype(jnp.float32)
    w = plgpu.load(w_ref.at[cols]) if mask is None else plgpu.load(w_ref.at[cols], mask=col_ok, other=0.0)
    w = w.astype(jnp.float32)[None, :]
    normed = x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=1, keepdims=True) / dim + eps)
    if offset:
        h = normed * (offset + w)
    else:
        h = w * normed.astype(x.dtype).astype(jnp.float32)
    at = h_ref.at[rows[:, None], cols[None, :]]
    h = h.astype(h_ref.dtype)
    plgpu.store(at, h) if mask is None else plgpu.store(at, h, mask=mask)


def add_rms_norm_kernel(x: jax.Array, delta: jax.Array | None, weight: jax.Array, *, eps: float, offset: float = 0.0,
                        interpret: bool = False) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """`jaxllm.layers.norms.add_rms_norm` as one Pallas kernel: same arguments, same result.

    x, delta: [..., D] (delta None: the norm of x alone); weight: [D].
    Returns (x + delta in x's dtype, or x itself without delta; rms_norm of it).
    """
    dim = x.shape[-1]
    if weight.shape != (dim,) or (delta is not None and delta.shape != x.shape):
        raise ValueError(f"add_rms_norm_kernel: x {x.shape}, delta {None if delta is None else delta.shape} and "
                         f"weight {weight.shape} must be [..., D], the same, and [D]")  # fmt: skip
    out_dtype = x.dtype if offset else jnp.result_type(weight.dtype, x.dtype)
    rows = x.reshape(-1, dim)
    num_rows = rows.shape[0]
    dim_block = pl.next_power_of_2(dim)
    row_block = pow2_divisor(num_rows, max(1, TILE_ELEMENTS // dim_block))
    has_delta = delta is not None
    kernel = functools.partial(_add_rms_norm_kernel, has_delta=has_delta, eps=float(eps), offset=float(offset),
                               dim=dim, row_block=row_block, dim_block=dim_block)  # fmt: skip
    whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731
    out_shape = [jax.ShapeDtypeStruct(rows.shape, out_dtype)]
    operands = [rows, weight]
    if has_delta:
        out_shape.insert(0, jax.ShapeDtypeStruct(rows.shape, x.dtype))
        operands.insert(1, delta.reshape(rows.shape))
    outs = pl.pallas_call(
        kernel,
        grid=(num_rows // row_block,),
        in_specs=[whole(op.shape) for op in operands],
        out_specs=[whole(rows.shape) for _ in out_shape],
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=4 if dim_block <= 4096 else 8, num_stages=1),
        interpret=interpret,
        name="add_rms_norm" if has_delta else "rms_norm",
    )(*operands)
    h = outs[-1].reshape(x.shape)
    return (outs[0].reshape(x.shape) if has_delta else x), h
