"""jaxllm computes what transformers computes: tiny checkpoints of every family, float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.checkpoints import hf
from jaxllm.engine.step_inputs import build_batch
from jaxllm.models.params import fuse_params, unflatten_paths, unfuse_params
from jaxllm.models.transformer import forward, forward_dense, init_kv_cache
from jaxllm import SamplingParams
from tests import tiny

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11], [300, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 31],
           [8, 9, 10, 60, 61, 62, 63, 64, 65, 66, 67, 68]]  # fmt: skip


def _load(path):
    cfg = hf.read_config(path)
    flat = {k: jnp.asarray(v, jnp.float32) for k, v in hf.load_hf_tensors(path, cfg)}
    return cfg, unflatten_paths(flat, cfg)


@pytest.fixture(scope="module")
def reference(tiny_hf):
    return tiny_hf


@pytest.mark.parametrize("name", tiny.FAMILIES)
def test_logprobs_match_transformers_dense_and_paged(name, tiny_dir, reference):
    cfg, params = _load(tiny_dir(name))
    model = reference(name)
    ids = PROMPTS[2] + PROMPTS[0]  # 27 tokens: longer than every sliding window
    ref = tiny.hf_logprobs(model, ids)
    dense = jax.nn.log_softmax(forward_dense(params, jnp.asarray([ids]), cfg)[0], -1)
    np.testing.assert_allclose(np.asarray(dense), ref, atol=1e-4, rtol=0)
    # Paged: the same tokens as a prefill in three chunks of different sizes, page size 4.
    cache = init_kv_cache(cfg, 16, 4, jnp.float32)
    table = [3, 9, 1, 12, 5, 14, 7, 2]  # shuffled pages
    got, start = [], 0
    for chunk in (ids[:5], ids[5:6], ids[6:]):
        batch = build_batch([chunk], [start], [table], 4, num_tokens=32, num_seqs=2, pages_per_seq=8)
        logits, cache = forward(params, batch, cache, cfg, all_logits=True)
        got.append(np.asarray(jax.nn.log_softmax(logits[: len(chunk)], -1)))
        start += len(chunk)
    np.testing.assert_allclose(np.concatenate(got), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama", "gemma3", "qwen2"])
def test_fused_projections_compute_what_separate_ones_do(name, tiny_dir):
    """The engine's fused layout (one q/k/v product, one gate/up product a layer) unfuses to the
    checkpoint's exactly, and the dense and the paged forward give the same logits over it."""
    cfg, params = _load(tiny_dir(name))
    fused = fuse_params(params, cfg)
    layer = fused["layers"][0]
    G = cfg.q_per_kv
    assert layer["wqkv"].shape == (cfg.hidden_size, cfg.num_kv_heads, G + 2, cfg.head_dim)
    assert layer["w_gate_up"].shape == (cfg.hidden_size, 2, cfg.intermediate_size)
    assert not {"wq", "wk", "wv", "w_gate", "w_up"} & set(layer)
    # each KV head's group: its query heads, then its k and v
    np.testing.assert_array_equal(np.asarray(layer["wqkv"][:, 1, G]), np.asarray(params["layers"][0]["wk"][:, 1]))
    np.testing.assert_array_equal(np.asarray(layer["wqkv"][:, 1, 0]), np.asarray(params["layers"][0]["wq"][:, G]))
    jax.tree.map(np.testing.assert_array_equal, unfuse_params(fused, cfg), params)
    ids = jnp.asarray([PROMPTS[2] + PROMPTS[0]])
    np.testing.assert_allclose(np.asarray(forward_dense(fused, ids, cfg)), np.asarray(forward_dense(params, ids, cfg)),
                               atol=1e-5, rtol=0)  # fmt: skip
    batch = build_batch([PROMPTS[0], PROMPTS[3]], [0, 0], [[1, 2, 3], [4, 5, 6]], 4, num_tokens=32, num_seqs=2,
                        pages_per_seq=3)  # fmt: skip
    got, _ = forward(fused, batch, init_kv_cache(cfg, 8, 4, jnp.float32), cfg, all_logits=True)
    want, _ = forward(params, batch, init_kv_cache(cfg, 8, 4, jnp.float32), cfg, all_logits=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_paged_attention_online_softmax_chunks(tiny_dir, reference, monkeypatch):
    """The XLA attention's multi-chunk path (long contexts) agrees with transformers too."""
    from jaxllm.layers import attention

    monkeypatch.setattr(attention, "XLA_CHUNK_KEYS", 8)  # two pages of 4 per chunk
    cfg, params = _load(tiny_dir("gemma3"))
    ids = PROMPTS[2] + PROMPTS[3]
    ref = tiny.hf_logprobs(reference("gemma3"), ids)
    cache = init_kv_cache(cfg, 16, 4, jnp.float32)
    batch = build_batch([ids], [0], [[4, 2, 6, 8, 10, 1, 3, 5]], 4, num_tokens=32, num_seqs=1, pages_per_seq=8)
    logits, _ = forward(params, batch, cache, cfg, all_logits=True)
    np.testing.assert_allclose(np.asarray(jax.nn.log_softmax(logits[: len(ids)], -1)), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", tiny.FAMILIES)
def test_greedy_batch_matches_transformers(name, tiny_llm, reference):
    """16 greedy tokens for prompts of different lengths, generated as one batch."""
    llm = tiny_llm(name)
    model = reference(name)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == tiny.hf_greedy(model, prompt, 16), f"{name}: prompt {prompt}"
        assert out.outputs[0].finish_reason == "length"


def test_greedy_logprobs_reported_match_transformers(tiny_llm, reference):
    llm = tiny_llm("qwen3")
    model = reference("qwen3")
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=8, ignore_eos=True, logprobs=3), use_tqdm=False)
    tokens = out.outputs[0].token_ids
    ref = tiny.hf_logprobs(model, PROMPTS[0] + tokens)
    for i, (token, entry) in enumerate(zip(tokens, out.outputs[0].logprobs)):
        row = ref[len(PROMPTS[0]) - 1 + i]
        assert entry[token].rank == 1
        assert abs(entry[token].logprob - row[token]) < 1e-4
        top3 = np.argsort(-row)[:3]
        assert set(top3) <= set(entry)
        for rank, t in enumerate(top3):
            assert abs(entry[int(t)].logprob - row[t]) < 1e-4 and entry[int(t)].rank == rank + 1
