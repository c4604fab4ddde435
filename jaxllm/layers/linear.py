"""A decoder's projections: x @ w, contracting x's last axes with w's leading ones.

Each projection has a name (the weight's, models/params.py) and contracts one axis of x, or two for
the output projection ([T, H, d] @ [H, d, D]). A backend gives `project(name, x, w)`:

- 'xla' (the reference, `dense_projection`): one dot_general that XLA compiles, and under tensor
  parallelism partitions itself, inserting the all-reduces after the row-parallel products.
- 'pallas': a product of at most `MAX_ROWS` rows (a decode step's) goes to the few-row kernel
  (pallas_kernels/skinny_matmul.py), which streams the weight without XLA's split-K reductions;
  under tensor parallelism each device multiplies its own shard (shard_map, the weight's spec from
  the rules table), and the row-parallel products (contracted axes split over the mesh) are summed
  by `psum`, the all-reduce XLA would insert. Wider products, weights it cannot tile and mixed
  dtypes take the reference. On the CPU the kernel runs in the Pallas interpreter.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

ProjectFn = Callable[[str, jax.Array, jax.Array], jax.Array]

# How many of a weight's leading axes each projection contracts.
CONTRACTED = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1, "lm_head": 1}


def dense_projection(name: str, x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.tensordot(x, w, CONTRACTED[name])


def _tile(x_shape: tuple, w_shape: tuple, n: int):
    """The kernel's tiles for x [..., K...] @ w [K..., N...], or None when the kernel does not apply."""
    from pallas_kernels.skinny_matmul import MAX_ROWS, tile_for

    if math.prod(x_shape[:-n]) > MAX_ROWS:
        return None
    return tile_for(math.prod(w_shape[:n]), math.prod(w_shape[n:]))


def _few_rows(x: jax.Array, w: jax.Array, n: int, tile) -> jax.Array:
    from pallas_kernels.skinny_matmul import skinny_matmul

    lead, out = x.shape[:-n], w.shape[n:]
    k = math.prod(w.shape[:n])
    y = skinny_matmul(x.reshape(-1, k), w.reshape(k, -1), tile, interpret=jax.default_backend() == "cpu")
    return y.reshape(*lead, *out)


def few_row_projection(mesh=None, weight_specs: dict[str, P] | None = None) -> ProjectFn:
    """The 'pallas' projection; with a tensor-parallel `mesh`, `weight_specs` gives each weight's
    PartitionSpec (jaxllm/sharding.py:spec_for of its logical axes)."""

    def project(name: str, x: jax.Array, w: jax.Array) -> jax.Array:
        n = CONTRACTED[name]
        if mesh is not None and name in ("wo", "w_down") and math.prod(x.shape[:-n]) <= 16:
            from pallas_kernels.all_reduce import one_shot_all_reduce

            spec = tuple(weight_specs[name]) + (None,) * (w.ndim - len(weight_specs[name]))
            lead = (None,) * (x.ndim - n)

            def local_ar(a, b):
                return one_shot_all_reduce(dense_projection(name, a, b), axis_name="tp")

            return jax.shard_map(local_ar, mesh=mesh, in_specs=(P(*lead, *spec[:n]), P(*spec)),
                                 out_specs=P(*lead, *spec[n:]), check_vma=False)(x, w)
        return dense_projection(name, x, w)
        if x.dtype != w.dtype:
            return dense_projection(name, x, w)
        if mesh is None:
            tile = _tile(x.shape, w.shape, n)
            return dense_projection(name, x, w) if tile is None else _few_rows(x, w, n, tile)
        spec = tuple(weight_specs[name]) + (None,) * (w.ndim - len(weight_specs[name]))
        local_w = tuple(d // (mesh.shape[a] if a else 1) for d, a in zip(w.shape, spec))
        tile = _tile((*x.shape[:-n], *local_w[:n]), local_w, n)
        if tile is None:
            return dense_projection(name, x, w)
        summed = tuple(a for a in spec[:n] if a is not None)
        lead = (None,) * (x.ndim - n)

        def local(a, b):
            y = _few_rows(a, b, n, tile)
            return jax.lax.psum(y, summed) if summed else y

        return jax.shard_map(local, mesh=mesh, in_specs=(P(*lead, *spec[:n]), P(*spec)), out_specs=P(*lead, *spec[n:]),
                             check_vma=False)(x, w)  # fmt: skip

    return project


def get_projection(backend: str, mesh=None, weight_specs: dict[str, P] | None = None) -> ProjectFn:
    """The projection of attention backend `backend` ('pallas': the few-row kernel; any other: XLA's)."""
    return few_row_projection(mesh, weight_specs) if backend == "pallas" else dense_projection
