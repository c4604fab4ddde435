"""Run by tests/test_multiprocess.py under `python -m jaxllm.launch` (process 0 only)."""

import asyncio
import json
import sys

import jax

from jaxllm import LLM, SamplingParams

out_file, model = sys.argv[1], sys.argv[2]
# A third argument, a calibration dataset: FP8 weights and KV cache calibrated on it (the leader's
# scales sent to the follower).
calibrated = {"quant_config": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"},
              "calib_config": {"calib_dataset": sys.argv[3]}} if len(sys.argv) > 3 else {}  # fmt: skip
PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 12], list(range(30, 70))]
MAX_TOKENS = 24
with LLM(model=model, dtype="float32", skip_tokenizer_init=True, tensor_parallel_size=jax.device_count(),
         max_batch_size=4, max_num_tokens=64, **calibrated) as llm:  # fmt: skip
    runner = llm._engine.runner
    runner.precompile(runner.bucket_shapes()[:2], progress=False)  # the followers compile them too, meanwhile
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)  # several dispatches: follow-ons
    tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    streamed = []
    for partial in llm.generate_async(PROMPTS[0], params, streaming=True):
        streamed += partial.outputs[0].token_ids_diff

    async def run_async():
        return (await llm.generate_async(PROMPTS[2], params)).outputs[0].token_ids

    result = {
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "tokens": tokens,
        "streamed": streamed,
        "async": asyncio.run(run_async()),
        "stats": len(llm.get_stats(timeout=2)),
        "follow_ons": llm._engine.num_follow_ons,
    }
    if calibrated:  # this process's copy of a replicated scale
        result["k_scale"] = float(runner.params["layers"][1]["k_scale"].addressable_data(0))
with open(out_file, "w") as f:
    json.dump(result, f)
