"""The 'pallas' attention backend inside the whole model: same tokens as 'xla' (interpret mode here)."""

import functools

import pytest

from jaxllm import LLM, SamplingParams

PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11], [11, 12], [300, 12, 13, 14, 15, 16, 17, 18, 19]]


@pytest.mark.parametrize("name,tp", [("llama", 1), ("gemma3", 1), ("llama", 2)])
def test_pallas_backend_matches_xla(name, tp, tiny_dir, tiny_llm):
    """The backend rotates q and k in its K/V write (pallas_kernels/kv_write.py), under tensor
    parallelism too (each device's heads, the tables replicated)."""
    params = SamplingParams(max_tokens=4, ignore_eos=True, logprobs=1)
    expected = tiny_llm(name).generate(PROMPTS, params, use_tqdm=False)
    with LLM(model=str(tiny_dir(name)), dtype="float32", skip_tokenizer_init=True, backend="pallas_interpret",
             max_batch_size=4, max_num_tokens=32, kv_cache_config={"tokens_per_block": 8},
             tensor_parallel_size=tp) as llm:  # fmt: skip
        got = llm.generate(PROMPTS, params, use_tqdm=False)
    for e, g in zip(expected, got):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        for a, b in zip(e.outputs[0].logprobs, g.outputs[0].logprobs):
            t = next(iter(a))
            assert abs(a[t].logprob - b[t].logprob) < 1e-4


def test_pallas_backend_with_few_sequences_in_a_wide_mixed_step(tiny_dir, monkeypatch):
    """The ragged kernel over a mixed step's narrow program (B = FEW_SEQS slots for T tokens,
    engine/buckets.py): the same tokens as the full-width program."""
    from jaxllm.engine import buckets as buckets_lib

    prompts = [p * 3 for p in PROMPTS]  # 33, 6 and 27 tokens: one mixed step of T = 128
    params = SamplingParams(max_tokens=4, ignore_eos=True, logprobs=1)
    got, shapes = [], []
    for few in (False, True):
        if few:
            monkeypatch.setattr(buckets_lib, "FEW_SEQS", 4)
            monkeypatch.setattr(buckets_lib, "FEW_SEQS_MIN_TOKENS", 32)
        with LLM(model=str(tiny_dir("llama")), dtype="float32", skip_tokenizer_init=True, backend="pallas_interpret",
                 max_batch_size=16, max_num_tokens=128, kv_cache_config={"tokens_per_block": 8}) as llm:  # fmt: skip
            got.append(llm.generate(prompts, params, use_tqdm=False))
            shapes.append({(s.num_tokens, s.num_seqs) for s in llm._engine.runner.executables
                           if getattr(s, "max_query_len", 1) > 1})  # fmt: skip
    assert shapes == [{(128, 16)}, {(128, 4)}]
    for e, g in zip(*got):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        for a, b in zip(e.outputs[0].logprobs, g.outputs[0].logprobs):
            t = next(iter(a))
            assert abs(a[t].logprob - b[t].logprob) < 1e-5


def test_the_pallas_backends_rotate_in_their_write_unless_switched_off(monkeypatch):
    """Both Pallas backends rotate q and k in their K/V write while ROPE_IN_KV_WRITE says so (the
    default); switched off, the model rotates them, as it does for 'xla'."""
    from jaxllm.layers import attention

    assert attention.get_rope_kv_writer("xla") is None
    assert attention.get_rope_kv_writer("pallas_interpret") is not None
    assert attention.get_rope_kv_writer("pallas") is not None
    monkeypatch.setitem(attention.ROPE_IN_KV_WRITE, "pallas", False)
    assert attention.get_rope_kv_writer("pallas") is None


def test_the_rotating_write_switch_is_part_of_the_program_cache_key(tiny_dir, monkeypatch):
    """Flipping ROPE_IN_KV_WRITE changes the engine's description, so the program cache never
    serves programs traced with the other setting."""
    from jaxllm.engine import programs
    from jaxllm.layers import attention

    with LLM(model=str(tiny_dir("llama")), dtype="float32", skip_tokenizer_init=True, backend="pallas_interpret",
             max_batch_size=4, max_num_tokens=32) as llm:  # fmt: skip
        runner = llm._engine.runner
        on = programs.engine_description(runner)
        monkeypatch.setitem(attention.ROPE_IN_KV_WRITE, "pallas_interpret", False)
        off = programs.engine_description(runner)
    assert on.pop("rope_in_kv_write") and not off.pop("rope_in_kv_write")
    assert on == off


def test_pallas_backend_matches_xla_into_an_fp8_cache_with_an_odd_head_dim(tiny_dir):
    """Mistral's tiny variant (head_dim 24: the rotating write takes 4 columns of each half at a
    time; a sliding window) writing a float8 cache: 'pallas_interpret' gives 'xla''s tokens."""
    params = SamplingParams(max_tokens=4, ignore_eos=True, logprobs=1)
    got = []
    for backend in ("xla", "pallas_interpret"):
        with LLM(model=str(tiny_dir("mistral")), dtype="float32", skip_tokenizer_init=True, backend=backend,
                 max_batch_size=4, max_num_tokens=32,
                 kv_cache_config={"tokens_per_block": 8, "dtype": "fp8"}) as llm:  # fmt: skip
            got.append(llm.generate(PROMPTS, params, use_tqdm=False))
    for e, g in zip(*got):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        for a, b in zip(e.outputs[0].logprobs, g.outputs[0].logprobs):
            t = next(iter(a))
            assert abs(a[t].logprob - b[t].logprob) < 1e-4


def _pallas_calls(jaxpr):
    """Every pallas_call equation of a jaxpr, nested jaxprs (jit, shard_map) included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                yield from _pallas_calls(inner)


def test_the_rotating_write_reads_the_fused_projection_where_it_lies():
    """With fused projections (the engine's layout on one device), the rotating write is handed the
    QKV product's output itself, [T * K * (G + 2), d] rows, not q, k and v sliced out of it: a custom
    call's operands are not fused, so each slice would be a copy (one kernel each)."""
    import jax
    import jax.numpy as jnp

    from jaxllm.config import ModelConfig, RopeConfig
    from jaxllm.layers.batch import BatchMetadata
    from jaxllm.models.params import fuse_layer, init_params
    from jaxllm.models.transformer import paged_layer

    cfg = ModelConfig("LlamaForCausalLM", "llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                      rope=RopeConfig(theta=1e4))  # fmt: skip
    lp = fuse_layer(init_params(cfg, jnp.float32, jax.random.key(0))["layers"][0], cfg)
    i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
    batch = BatchMetadata(token_ids=i32([3, 4]), positions=i32([3, 5]), slot_mapping=i32([11, 21]),
                          token_seq=i32([0, 1]), query_start=i32([0, 1, 2]), seq_lens=i32([4, 6]),
                          block_tables=i32([[1], [2]]), logits_indices=i32([0, 1]))  # fmt: skip
    pages = jnp.zeros((2, 4, 8, 16), jnp.float32)
    step = functools.partial(paged_layer, lp, cfg=cfg, layer=0, backend="pallas_interpret")
    jaxpr = jax.make_jaxpr(lambda x, kp, vp, b: step(x, kp, vp, b, None, None))(jnp.ones((2, 64)), pages, pages, batch)
    [write] = [e for e in _pallas_calls(jaxpr.jaxpr) if "rope_write_kv" in str(e.params.get("name"))]
    shapes = [tuple(v.aval.shape) for v in write.invars]
    assert shapes.count((2 * 2 * (2 + 2), 16)) == 3  # the fused rows, read as q, k and v
    assert (2 * 4, 16) not in shapes and (2 * 2, 16) not in shapes
