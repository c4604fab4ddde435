"""The residual add + RMSNorm kernel (pallas_kernels/rms_norm.py) against `add_rms_norm`, its jnp
reference, alone and inside the model's forward pass (one device and a tensor-parallel mesh)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.checkpoints import hf
from jaxllm.layers import attention
from jaxllm.layers.norms import add_rms_norm
from jaxllm.models.batch import build_batch
from jaxllm.models.params import unflatten_paths
from jaxllm.models.transformer import forward, init_kv_cache
from jaxllm.sharding import make_mesh
from pallas_kernels.rms_norm import add_rms_norm_kernel
from tests.paged_kv import INTERPRET, lower_for_h100


@pytest.mark.parametrize(
    "rows,dim,dtype,weight_dtype,offset",
    [(2, 4096, jnp.bfloat16, jnp.bfloat16, 0.0), (5, 576, jnp.float32, jnp.float32, 0.0),
     (3, 640, jnp.bfloat16, jnp.bfloat16, 1.0), (48, 64, jnp.bfloat16, jnp.float32, 0.0)],  # fmt: skip
)
def test_matches_add_rms_norm(rows, dim, dtype, weight_dtype, offset):
    """With and without the add: the sum bit for bit, the norm within one rounding of its dtype (the
    sum of squares is reduced in another order); a hidden size that is not a power of two (masked),
    Gemma's (1 + weight) order, a float32 weight over bfloat16 rows (the result promotes), and row
    counts that are not powers of two."""
    rng = np.random.default_rng(rows)
    x, delta = (jnp.asarray(rng.normal(size=(rows, dim)) * 3, dtype) for _ in range(2))
    weight = jnp.asarray(rng.normal(size=(dim,)), weight_dtype)
    for d in (delta, None):
        want = add_rms_norm(x, d, weight, 1e-6, offset)
        got = add_rms_norm_kernel(x, d, weight, eps=1e-6, offset=offset, interpret=INTERPRET)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32))
        ulp = float(jnp.finfo(got[1].dtype).eps)
        np.testing.assert_allclose(np.asarray(got[1], np.float32), np.asarray(want[1], np.float32), rtol=2 * ulp, atol=ulp)


def test_rejects_mismatched_shapes():
    x = jnp.zeros((2, 8))
    with pytest.raises(ValueError, match=r"weight \(4,\)"):
        add_rms_norm_kernel(x, None, jnp.zeros((4,)), eps=1e-6, interpret=True)
    with pytest.raises(ValueError, match=r"delta \(2, 4\)"):
        add_rms_norm_kernel(x, jnp.zeros((2, 4)), jnp.zeros((8,)), eps=1e-6, interpret=True)


def test_lowers_for_the_gpu_as_one_triton_call():
    rows = jax.ShapeDtypeStruct((2, 4096), jnp.bfloat16)
    weight = jax.ShapeDtypeStruct((4096,), jnp.bfloat16)
    text = lower_for_h100(functools.partial(add_rms_norm_kernel, eps=1e-5), rows, rows, weight)
    assert text.count("__gpu$xla.gpu.triton") == 1


@pytest.mark.parametrize("tp", [1, 2])
def test_the_forward_pass_with_the_kernel_gives_the_same_logits(tp, tiny_dir, monkeypatch):
    """The 'xla' backend with its norms swapped for the interpreted kernel (as the 'pallas' backend
    has them on GPUs): the same float32 logits at every position of a ragged two-sequence prefill and
    a decode, on one device and split over two (each device runs the kernel on its replica)."""
    cfg = hf.read_config(tiny_dir("gemma3"))  # sandwich norms and Gemma's (1 + weight)
    params = unflatten_paths({k: jnp.asarray(v, jnp.float32) for k, v in hf.load_hf_tensors(tiny_dir("gemma3"), cfg)},
                             cfg)  # fmt: skip
    mesh = make_mesh(tp) if tp > 1 else None  # the tiny model's 2 KV heads split as they are
    calls = []

    def kernel_norm(x, delta, weight, eps, offset=0.0):
        calls.append(delta is None)
        return add_rms_norm_kernel(x, delta, weight, eps=eps, offset=offset, interpret=True)

    prefill = build_batch([[5, 17, 42, 99, 3], [11, 12, 13]], [0, 0], [[3, 1], [2, 4]], 4, num_tokens=8, num_seqs=2,
                          pages_per_seq=2)  # fmt: skip
    decode = build_batch([[7], [8]], [5, 3], [[3, 1], [2, 4]], 4, num_tokens=2, num_seqs=2, pages_per_seq=2)

    def run():
        step = jax.jit(lambda batch, cache, every: forward(params, batch, cache, cfg, all_logits=every, mesh=mesh),
                       static_argnums=2)  # fmt: skip
        first, cache = step(prefill, init_kv_cache(cfg, 8, 4, jnp.float32), True)
        second, _ = step(decode, cache, False)
        return np.asarray(first), np.asarray(second)

    want = run()
    monkeypatch.setitem(attention.ADD_NORMS, "xla", kernel_norm)
    got = run()
    # Per forward: the first layer's norm alone, then one add + norm in each block's middle and end.
    assert calls == ([True] + [False] * (2 * cfg.num_layers)) * 2
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=0)
