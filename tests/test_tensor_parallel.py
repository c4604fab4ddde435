"""Tensor parallelism on 8 virtual CPU devices: the same tokens as one device, and the planned shardings."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm import LLM, SamplingParams
from jaxllm.sharding import plan_tensor_parallel
from jaxllm.models.params import flatten_paths
from tests import tiny

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 12], list(range(30, 70))]
PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)
FAMILIES = tiny.FAMILIES + ["llama-odd"]


def _tokens(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]


@pytest.fixture(scope="module")
def single(tiny_llm):
    return {name: _tokens(tiny_llm(name)) for name in FAMILIES}


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (virtual) devices")
@pytest.mark.parametrize("name", FAMILIES)
def test_tp_gives_the_single_device_tokens(name, tiny_dir, single):
    # TP=2 and TP=8 (the most padding and replication); TP=4 has its own tests (odd shapes, 70B heads).
    for n in (2, 8):
        with LLM(model=str(tiny_dir(name)), dtype="float32", skip_tokenizer_init=True, tensor_parallel_size=n,
                 max_batch_size=4, max_num_tokens=64) as llm:  # fmt: skip
            assert _tokens(llm) == single[name], f"{name} TP={n}"
            cfg = llm.engine_config
            assert cfg.num_kv_heads % n == 0 and cfg.num_heads % n == 0
            runner = llm._engine.runner
            flat = flatten_paths(runner.params)
            expect = {"embed": P("tp", None), "final_norm": P(None), "layers.0.wq": P(None, "tp", None),
                      "layers.0.wk": P(None, "tp", None), "layers.0.wo": P("tp", None, None),
                      "layers.0.w_up": P(None, "tp"), "layers.0.w_down": P("tp", None), "layers.1.attn_norm": P(None)}  # fmt: skip
            for path, spec in expect.items():
                assert flat[path].sharding.spec == spec, path
                assert len(flat[path].sharding.device_set) == n
            k_pages = runner.kv_cache[0][0]
            assert k_pages.sharding.spec == P("tp") and k_pages.shape[0] == cfg.num_kv_heads
            shard = k_pages.addressable_shards[0].data
            assert shard.shape[0] == cfg.num_kv_heads // n  # each device holds only its KV heads


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 (virtual) devices")
def test_sampling_over_vocabulary_shards_matches_one_device(tiny_dir, tiny_llm):
    """Plain sampling under TP reads the vocabulary-split logits without gathering them: the same
    greedy and seeded tokens, ranks and top log-probs (to rounding), also with a padded vocabulary."""
    params = [SamplingParams(max_tokens=9, ignore_eos=True, logprobs=3),
              SamplingParams(max_tokens=9, temperature=0.9, seed=11, ignore_eos=True, logprobs=2),
              SamplingParams(max_tokens=9, temperature=1.5, seed=12, ignore_eos=True)]  # fmt: skip

    def run(llm):
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        return [(o.outputs[0].token_ids, [sorted((t, l.logprob, l.rank) for t, l in e.items())
                                          for e in o.outputs[0].logprobs or []]) for o in outs]  # fmt: skip

    expected = run(tiny_llm("llama-odd"))
    with LLM(model=str(tiny_dir("llama-odd")), dtype="float32", skip_tokenizer_init=True, tensor_parallel_size=4,
             max_batch_size=4, max_num_tokens=64) as llm:  # fmt: skip
        assert llm.engine_config.padded_vocab_size  # 330 does not split over 4 devices
        got = run(llm)
    for (tokens, lps), (ref_tokens, ref_lps) in zip(got, expected):
        assert tokens == ref_tokens
        for entry, ref in zip(lps, ref_lps):
            assert [(t, r) for t, _, r in entry] == [(t, r) for t, _, r in ref]
            assert np.allclose([lp for _, lp, _ in entry], [lp for _, lp, _ in ref], atol=1e-4)


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 (virtual) devices")
@pytest.mark.parametrize("ids", [[329], [0, 83, 84, 329, 5, 5]])
def test_vocabulary_parallel_embedding_lookup_is_exact(ids):
    """The embedding table split over 4 devices by vocabulary rows (padded 330 -> 336) gives exactly
    table[ids], for one id (a decode step of batch 1) and for several, with one all-reduce of the
    rows and no gather of the table."""
    from jax.sharding import Mesh, NamedSharding

    from jaxllm.layers.adapters import lookup_rows

    mesh = Mesh(np.array(jax.devices()[:4]), ("tp",))
    table = jax.random.normal(jax.random.key(0), (336, 16), jax.numpy.float32).astype(jax.numpy.bfloat16)
    sharded = jax.device_put(table, NamedSharding(mesh, P("tp", None)))
    ids = jax.numpy.asarray(ids, jax.numpy.int32)
    fn = jax.jit(lambda t, i: lookup_rows(t, i, mesh, "tp"))
    np.testing.assert_array_equal(np.asarray(fn(sharded, ids)), np.asarray(table[ids]))
    hlo = fn.lower(sharded, ids).compile().as_text()
    assert "all-gather" not in hlo and hlo.count("all-reduce(") == 1
    # The model's embedding takes this path under a mesh (with and without a prompt-adapter table).
    from jaxllm.config import ModelConfig, RopeConfig
    from jaxllm.models.transformer import embed

    cfg = ModelConfig("LlamaForCausalLM", "llama", vocab_size=330, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=8, rms_norm_eps=1e-5, rope=RopeConfig(theta=1e4))  # fmt: skip
    for prompt_table in (None, jax.numpy.ones((3, 16), jax.numpy.bfloat16)):
        model = jax.jit(lambda t, i, pt: embed({"embed": t}, i, cfg, jax.numpy.bfloat16, pt, mesh))
        np.testing.assert_array_equal(np.asarray(model(sharded, ids, prompt_table)), np.asarray(table[ids]))
        assert "shard_map" in str(jax.make_jaxpr(model)(sharded, ids, prompt_table))


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 (virtual) devices")
def test_dummy_weights_are_init_params_at_every_tp_size(tiny_dir):
    """load_format='dummy' draws the checkpoint's random weights (init_params, seed 0, compiled) whatever
    the layout: TP=1 holds exactly those arrays, and TP=4 (padded heads, MLP and vocabulary) the same model."""
    from jaxllm.models.params import init_params, unfuse_params

    args = dict(load_format="dummy", dtype="float32", skip_tokenizer_init=True, max_batch_size=4, max_num_tokens=64)
    with LLM(model=str(tiny_dir("llama-odd")), **args) as llm:
        expected = flatten_paths(jax.jit(lambda: init_params(llm.config, jax.numpy.float32, jax.random.key(0)))())
        got = flatten_paths(unfuse_params(llm._engine.runner.params, llm.config))  # (one device: fused)
        assert got.keys() == expected.keys()
        for path, value in expected.items():
            np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(value), err_msg=path)
        tokens = _tokens(llm)
    with LLM(model=str(tiny_dir("llama-odd")), tensor_parallel_size=4, **args) as llm:
        assert not llm.tp_plan.is_identity
        assert _tokens(llm) == tokens


def test_plan_pads_and_replicates_heads():
    from jaxllm.config import ModelConfig, RopeConfig

    base = ModelConfig("LlamaForCausalLM", "llama", vocab_size=330, hidden_size=48, intermediate_size=100, num_layers=1,
                       num_heads=6, num_kv_heads=3, head_dim=8, rms_norm_eps=1e-5, rope=RopeConfig(theta=1e4))  # fmt: skip
    two = plan_tensor_parallel(base, 2)
    assert (two.padded_kv_heads, two.kv_replicas, two.padded_group) == (4, 1, 2)
    eight = plan_tensor_parallel(base, 8)
    assert (eight.padded_kv_heads, eight.kv_replicas, eight.padded_group) == (4, 2, 2)
    assert (eight.padded_intermediate_size, eight.padded_vocab_size) == (104, 336)
    w = np.random.default_rng(0).normal(size=(48, 3, 8)).astype(np.float32)
    assert np.array_equal(eight.restore("layers.0.wk", eight.transform("layers.0.wk", w)), w)
    wq = np.random.default_rng(1).normal(size=(48, 6, 8)).astype(np.float32)
    assert np.array_equal(eight.restore("layers.0.wq", eight.transform("layers.0.wq", wq)), wq)
    assert plan_tensor_parallel(base, 3).is_identity is False and plan_tensor_parallel(base, 1).is_identity


def test_bad_tensor_parallel_sizes():
    for n, error, message in [(0, ValueError, "tensor_parallel_size=0"), (-2, ValueError, "tensor_parallel_size=-2"),
                              (64, ValueError, "exceeds the 8 available devices"), ("2", ValueError, "tensor_parallel_size='2'")]:  # fmt: skip
        with pytest.raises(error, match=message):
            LLM(model="/nonexistent", tensor_parallel_size=n)
