"""Llama-3.1-70B at tensor_parallel_size=4, as far as the CPU goes (the run itself needs four GPUs:
benchmarks/gpu_tp4_70b.py): the plan's per-device memory from abstract shapes, and the same code path
at TP=4 on virtual CPU devices with the 70B head layout at a tiny scale."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.checkpoints import loader
from jaxllm.engine.kv_planner import activation_reserve, bytes_per_token
from jaxllm.models.params import flatten_paths, init_params
from jaxllm.sharding import make_mesh, param_shardings, plan_tensor_parallel

CONFIG_70B = Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "llama-3.1-70b"
GiB = 1 << 30
pytestmark = pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 (virtual) devices")


def per_device_weight_bytes(cfg, tp: int, dtype=jnp.bfloat16) -> int:
    """Bytes of weights on each device under the TP plan, from jax.eval_shape (nothing allocated)."""
    plan = plan_tensor_parallel(cfg, tp)
    engine_cfg = plan.engine_config(cfg)
    shardings = param_shardings(engine_cfg, make_mesh(tp))
    abstract = jax.eval_shape(jax.jit(lambda: init_params(engine_cfg, dtype, jax.random.key(0)), out_shardings=shardings))
    total = 0
    for leaf, sharding in zip(flatten_paths(abstract).values(), flatten_paths(shardings).values()):
        total += int(np.prod(sharding.shard_shape(leaf.shape))) * jnp.dtype(leaf.dtype).itemsize
    return total


def test_70b_at_tp4_fits_an_80gb_gpu_with_a_useful_kv_cache():
    cfg = loader.read_config(loader.resolve(str(CONFIG_70B)))
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.hidden_size) == (80, 64, 8, 8192)
    weights = per_device_weight_bytes(cfg, 4)
    assert 32.5 * GiB < weights < 33.5 * GiB  # 70.6 B parameters in bf16, a quarter each
    per_token = bytes_per_token(cfg, jnp.bfloat16, tp_kv_shards=4)
    assert per_token == 80 * 2 * 2 * 128 * 2  # 2 of the 8 KV heads on each device
    reserve = activation_reserve(cfg, max_num_tokens=8192, max_batch_size=256)
    kv_tokens = 256 * 1024  # e.g. 128 sequences of 2k tokens
    assert weights + reserve + kv_tokens * per_token < 70 * GiB


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (virtual) devices")
def test_70b_head_layout_at_tp4_gives_the_single_device_tokens(tiny_dir, tiny_llm):
    prompts = [[5, 17, 42, 99, 3, 250, 7], list(range(30, 90))]
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=1)
    single = tiny_llm("llama-70b-shape").generate(prompts, params, use_tqdm=False)
    with LLM(model=str(tiny_dir("llama-70b-shape")), dtype="float32", skip_tokenizer_init=True, tensor_parallel_size=4,
             max_batch_size=4, max_num_tokens=64) as llm:  # fmt: skip
        assert llm.tp_plan.is_identity  # 8 KV heads and 32 query heads split evenly, as 70B's do
        k_pages = llm._engine.runner.kv_cache[0][0]
        assert k_pages.addressable_shards[0].data.shape[0] == 2
        split = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(single, split):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        got = [next(iter(e.values())).logprob for e in b.outputs[0].logprobs]
        want = [next(iter(e.values())).logprob for e in a.outputs[0].logprobs]
        np.testing.assert_allclose(got, want, atol=1e-4)
