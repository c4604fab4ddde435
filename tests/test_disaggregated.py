"""Disaggregated serving: a context_only request on one LLM, its generation_only continuation on another
(another device, another tensor-parallel degree and page size, another process) give exactly the
tokens of one aggregated request."""

import json
import os
import subprocess
import sys
import textwrap
import time
import weakref
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxllm import DisaggregatedParams, KvCacheConfig, LLM, RequestError, SamplingParams
from jaxllm.engine import kv_transfer

PROMPTS = [list(range(3, 40)), [5, 17, 42, 99, 3, 250, 7]]
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True, logprobs=1)
SAMPLED = SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.9, top_p=0.95, seed=11)
pytestmark = pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 (virtual) devices")


def _llm(path, devices, **kwargs):
    return LLM(model=str(path), dtype="float32", skip_tokenizer_init=True, max_batch_size=8, max_num_tokens=128,
               tensor_parallel_size=len(devices), devices=devices, **kwargs)  # fmt: skip


@pytest.fixture(scope="module")
def pair(tiny_dir):
    """A context LLM on device 1 (pages of 32) and a generation LLM over devices 2 and 3 (TP=2, pages
    of 16), on the odd-sized tiny Llama whose 3 KV heads TP=2 pads to 4."""
    d = jax.devices()
    ctx = _llm(tiny_dir("llama-odd"), [d[1]], cache_transceiver_config={"kv_transfer_timeout_ms": 30_000})
    gen = _llm(tiny_dir("llama-odd"), [d[2], d[3]], kv_cache_config=KvCacheConfig(tokens_per_block=16))
    yield ctx, gen
    ctx.shutdown()
    gen.shutdown()


def context_only(llm, prompt, params):
    out = llm.generate(prompt, params, use_tqdm=False, disaggregated_params=DisaggregatedParams(request_type="context_only"))
    dp = out.outputs[0].disaggregated_params
    assert out.outputs[0].token_ids == dp.first_gen_tokens and len(dp.first_gen_tokens) == 1
    assert out.outputs[0].finish_reason == "length" and dp.ctx_request_id == out.request_id
    return dp


def generation_only(llm, prompt, params, dp):
    follow = DisaggregatedParams(request_type="generation_only", first_gen_tokens=dp.first_gen_tokens,
                                 ctx_request_id=dp.ctx_request_id, opaque_state=dp.opaque_state)  # fmt: skip
    return llm.generate(prompt, params, use_tqdm=False, disaggregated_params=follow)


def test_two_halves_give_the_aggregated_tokens(pair, tiny_llm):
    ctx, gen = pair
    whole_llm = tiny_llm("llama-odd")
    free_before = ctx._engine.block_manager.num_free_blocks
    for params in (GREEDY, SAMPLED):
        whole = whole_llm.generate(PROMPTS, params, use_tqdm=False)
        for prompt, ref in zip(PROMPTS, whole):
            split = generation_only(gen, prompt, params, context_only(ctx, prompt, params))
            assert split.outputs[0].token_ids == ref.outputs[0].token_ids
            assert split.outputs[0].finish_reason == "length"
            if params.logprobs is not None:
                got = [next(iter(e.values())).logprob for e in split.outputs[0].logprobs]
                want = [next(iter(e.values())).logprob for e in ref.outputs[0].logprobs]
                np.testing.assert_allclose(got, want, atol=1e-4)
    assert ctx._engine.block_manager.num_free_blocks == free_before  # fetched pages were released
    assert not ctx._engine.parked


def test_transfer_over_tcp(pair, tiny_llm, monkeypatch):
    """The path another process takes: the context's pages travel over the context LLM's TCP server."""
    ctx, gen = pair
    monkeypatch.setattr(kv_transfer, "_LOCAL_ENGINES", weakref.WeakValueDictionary())
    prompt = PROMPTS[0]
    ref = tiny_llm("llama-odd").generate(prompt, GREEDY, use_tqdm=False)
    dp = context_only(ctx, prompt, GREEDY)
    assert json.loads(dp.opaque_state)["endpoint"].startswith("127.0.0.1:")
    assert generation_only(gen, prompt, GREEDY, dp).outputs[0].token_ids == ref.outputs[0].token_ids
    with pytest.raises(RequestError, match="no parked context"):  # one fetch per context
        generation_only(gen, prompt, GREEDY, dp)


_CONTEXT_PROCESS = textwrap.dedent("""
    import json, sys
    from jaxllm import DisaggregatedParams, LLM, SamplingParams
    llm = LLM(model=sys.argv[1], dtype="float32", skip_tokenizer_init=True, max_batch_size=8, max_num_tokens=128)
    out = llm.generate(json.loads(sys.argv[2]), SamplingParams(max_tokens=10, ignore_eos=True), use_tqdm=False,
                       disaggregated_params=DisaggregatedParams(request_type="context_only"))
    dp = out.outputs[0].disaggregated_params
    print(json.dumps({"first": dp.first_gen_tokens, "id": dp.ctx_request_id, "state": dp.opaque_state.decode()}), flush=True)
    sys.stdin.readline()  # serve the pages until the test is done
    llm.shutdown()
""")


def test_generation_in_another_process_than_the_context(tiny_dir, tiny_llm):
    path, prompt = tiny_dir("llama"), PROMPTS[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "XLA_FLAGS": ""}
    proc = subprocess.Popen([sys.executable, "-c", _CONTEXT_PROCESS, str(path), json.dumps(prompt)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line, "the context process printed nothing"
        sent = json.loads(line)
        gen = tiny_llm("llama")
        dp = DisaggregatedParams(request_type="generation_only", first_gen_tokens=sent["first"],
                                 ctx_request_id=sent["id"], opaque_state=sent["state"].encode())  # fmt: skip
        params = SamplingParams(max_tokens=10, ignore_eos=True)
        split = gen.generate(prompt, params, use_tqdm=False, disaggregated_params=dp)
        assert split.outputs[0].token_ids == gen.generate(prompt, params, use_tqdm=False).outputs[0].token_ids
    finally:
        proc.communicate("done\n", timeout=60)


def test_unfetched_contexts_are_released(tiny_dir):
    with _llm(tiny_dir("llama"), [jax.devices()[1]], cache_transceiver_config={"kv_transfer_timeout_ms": 1}) as llm:
        free = llm._engine.block_manager.num_free_blocks
        dp = context_only(llm, PROMPTS[0], GREEDY)
        deadline = time.monotonic() + 10
        while llm._engine.parked and time.monotonic() < deadline:
            time.sleep(0.02)
        assert llm._engine.block_manager.num_free_blocks == free
        with pytest.raises(RequestError, match="no parked context"):
            generation_only(llm, PROMPTS[0], GREEDY, dp)


def test_bad_disaggregated_requests(pair, tiny_llm):
    ctx, gen = pair
    prompt = PROMPTS[1]
    with pytest.raises(ValueError, match="request_type='prefill'"):
        DisaggregatedParams(request_type="prefill")
    with pytest.raises(ValueError, match="needs its context state"):
        gen.generate(prompt, GREEDY, disaggregated_params=DisaggregatedParams(request_type="generation_only"))
    with pytest.raises(ValueError, match="not a jaxllm context state"):
        gen.generate(prompt, GREEDY, disaggregated_params=DisaggregatedParams(
            request_type="generation_only", first_gen_tokens=[3], opaque_state=b"\x00garbage"))  # fmt: skip
    with pytest.raises(ValueError, match="n=1 and best_of=1"):
        ctx.generate(prompt, SamplingParams(n=2, temperature=1.0),
                     disaggregated_params=DisaggregatedParams(request_type="context_only"))  # fmt: skip
    dp = context_only(ctx, prompt, GREEDY)
    with pytest.raises(ValueError, match="a generation_only request takes the same prompt"):
        generation_only(gen, prompt + [9], GREEDY, dp)
    with pytest.raises(ValueError, match="another model"):
        generation_only(tiny_llm("llama"), prompt, GREEDY, dp)
    # The context is still parked after those refusals, and both engines keep serving.
    ref = tiny_llm("llama-odd").generate(prompt, GREEDY, use_tqdm=False)
    assert generation_only(gen, prompt, GREEDY, dp).outputs[0].token_ids == ref.outputs[0].token_ids


def test_adapters_travel_with_the_context(tiny_dir, tmp_path):
    """A request with a LoRA adapter and a prompt adapter: the pages (virtual tokens included) depend on
    both, so the generation side must name the same ones, and then gives the aggregated tokens."""
    from jaxllm import LoraConfig, LoRARequest, PromptAdapterRequest
    from tests import tiny

    lora_dir, _, _ = tiny.save_lora("llama", tmp_path / "lora", rank=4, alpha=8, seed=5, merge=False)
    prompt_dir, _ = tiny.save_prompt_adapter("llama", tmp_path / "prompt", num_virtual_tokens=3, seed=6)
    lora, virtual = LoRARequest("l", 1, str(lora_dir)), PromptAdapterRequest("p", 1, str(prompt_dir))
    engine = dict(lora_config=LoraConfig(max_lora_rank=4, max_loras=1), max_prompt_adapter_token=4)
    d = jax.devices()
    prompt = PROMPTS[1]
    with _llm(tiny_dir("llama"), [d[1]], **engine) as ctx, _llm(tiny_dir("llama"), [d[2]], **engine) as gen:
        whole = ctx.generate(prompt, GREEDY, use_tqdm=False, lora_request=lora, prompt_adapter_request=virtual)
        out = ctx.generate(prompt, GREEDY, use_tqdm=False, lora_request=lora, prompt_adapter_request=virtual,
                           disaggregated_params=DisaggregatedParams(request_type="context_only"))  # fmt: skip
        dp = out.outputs[0].disaggregated_params
        follow = DisaggregatedParams(request_type="generation_only", first_gen_tokens=dp.first_gen_tokens,
                                     ctx_request_id=dp.ctx_request_id, opaque_state=dp.opaque_state)  # fmt: skip
        with pytest.raises(ValueError, match="takes the same adapters"):
            gen.generate(prompt, GREEDY, disaggregated_params=follow, lora_request=lora)
        split = gen.generate(prompt, GREEDY, use_tqdm=False, lora_request=lora, prompt_adapter_request=virtual,
                             disaggregated_params=follow)  # fmt: skip
        assert split.prompt_token_ids == prompt
        assert split.outputs[0].token_ids == whole.outputs[0].token_ids
