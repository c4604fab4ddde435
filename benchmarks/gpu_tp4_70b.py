"""Llama-3.1-70B shape, bf16 random weights, tensor_parallel_size=4 on four GPUs, in one call: time
from LLM(...) to the first token, greedy agreement with a bf16 reference computed layer by layer,
batch-1 decode against the weight-streaming floor, offline 128/128 throughput.

    PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 python3 benchmarks/gpu_tp4_70b.py --out $OUT
    python benchmarks/gpu_tp4_70b.py --smoke     # CPU, 8 virtual devices, the SmolLM2 shape

The reference: the engine's greedy tokens are checked teacher-forced. Prompt and generated tokens
go through the model once more, one layer at a time, each layer's weights gathered onto one device
and run by the dense causal forward (jaxllm.models.transformer.decoder_layer, no paging, no
sharding); at each generated position the reference's argmax must be the engine's token. Where
they differ, the reference's gap between the two tokens' logits says whether it was a near-tie.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

from common import batch1_ms, default_out, engine, greedy, hbm_tbs, offline, recorder, synthetic

if "--smoke" in sys.argv:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


def layer_by_layer_logits(llm, tokens: list[int]):
    """float32 logits [len(tokens), V] of the engine's weights, one layer at a time on one device."""
    import jax
    import jax.numpy as jnp

    from jaxllm.models.transformer import dense_causal_attention, decoder_layer, embed, final_hidden_to_logits

    cfg, params = llm.engine_config, llm._engine.runner.params
    device = jax.devices()[0]
    ids = jnp.asarray([tokens], jnp.int32)
    positions = jnp.arange(len(tokens))[None]

    @functools.partial(jax.jit, static_argnums=(2,))
    def layer(lp, x, index):
        def attend(q, k, v, i):
            return dense_causal_attention(q, k, v, scale=cfg.attn_scale, window=cfg.layer_window(i))

        return decoder_layer(lp, x, positions, index, cfg, attend)

    x = jax.device_put(embed({"embed": jax.device_put(params["embed"], device)}, jax.device_put(ids, device), cfg,
                             params["embed"].dtype), device)  # fmt: skip
    for index, lp in enumerate(params["layers"]):
        # Layers of one kind (window, RoPE) share a compilation: key it by the first of that kind.
        kind = cfg.layer_types.index(cfg.layer_types[index])
        x = layer(jax.device_put(lp, device), x, kind)
    head = {k: jax.device_put(params[k], device) for k in ("final_norm", "embed", "lm_head") if k in params}
    return jax.jit(lambda h, x: final_hidden_to_logits(h, x, cfg))(head, x)[0]


def teacher_forced_agreement(llm, prompts, outputs) -> dict:
    import numpy as np

    agree, total, gaps = 0, 0, []
    for prompt, generated in zip(prompts, outputs):
        logits = np.asarray(layer_by_layer_logits(llm, list(prompt) + list(generated)))
        for j, token in enumerate(generated):
            row = logits[len(prompt) - 1 + j]
            best = int(row.argmax())
            total += 1
            if best == token:
                agree += 1
            else:
                gaps.append(float(row[best] - row[token]))
    return {"tokens_equal": agree, "tokens": total, "logit_gaps_where_different": gaps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=default_out())
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    model, tp, tokens, decode_n, n_offline = "llama-3.1-70b", 4, 16, 64, 256
    args.max_batch, args.max_tokens, args.max_seq_len = 256, 8192, 2304
    if args.smoke:
        model, tokens, decode_n, n_offline = "smollm2-135m", 4, 8, 8
        args.max_batch, args.max_tokens, args.max_seq_len = 8, 256, 512
    import jax

    result, save = recorder(Path(args.out) / "gpu_tp4_70b.json", device=jax.devices()[0].device_kind,
                            devices=jax.device_count(), model=model, tensor_parallel_size=tp)  # fmt: skip

    prompts = [p * k for p, k in zip(synthetic(4, 1, 1000, 0), (7, 40, 130, 300))]
    t0 = time.perf_counter()
    with engine(model, tp, None, args, [(512, 300), (4, 1), (128, 128), (1, 1)]) as llm:
        from jaxllm import SamplingParams

        llm.generate([5, 6, 7], SamplingParams(max_tokens=1), use_tqdm=False)
        save("llm_to_first_token_s", time.perf_counter() - t0)
        weights = sum(x.nbytes for x in jax.tree.leaves(llm._engine.runner.params))
        save("weight_bytes", weights)
        vocab = llm.config.vocab_size
        wall: dict = {}
        ms = batch1_ms(llm, vocab, decode_n, llm._engine.runner.config.decode_steps, wall)
        floor = weights / (tp * hbm_tbs(jax.devices()[0].device_kind) * 1e12) * 1e3
        save("batch1_decode", {"ms_per_token": ms, "wall_ms_per_token": wall["ms"], "floor_ms": floor,
                               "over_floor": ms / floor})  # fmt: skip
        outs = [ids for ids, _ in greedy(llm, prompts, tokens)]
        save("greedy_vs_layer_by_layer_bf16", teacher_forced_agreement(llm, prompts, outs))
        save("offline_128_128", offline(llm, 128, 128, n_offline, vocab))
    r = result
    print(f"\n== {model} bf16 random weights, TP={tp} on {r['devices']} x {r['device']} ==")
    print(f"LLM() to first token {r['llm_to_first_token_s']:.1f} s; batch-1 decode {r['batch1_decode']['ms_per_token']:.2f} "
          f"ms/token = {r['batch1_decode']['over_floor']:.2f}x the {r['batch1_decode']['floor_ms']:.2f} ms floor")
    g = r["greedy_vs_layer_by_layer_bf16"]
    print(f"greedy vs layer-by-layer reference: {g['tokens_equal']}/{g['tokens']}; "
          f"offline 128/128 {r['offline_128_128']['output_tok_s']:.0f} tok/s")


if __name__ == "__main__":
    main()
