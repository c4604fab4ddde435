"""Prompt adapters (prompt tuning): jaxllm equals transformers fed the concatenated embeddings
(float32, tiny Llama and Gemma 3), per request in mixed batches; virtual tokens never reach the
outputs; bad adapters are refused at the boundary."""

import json

import numpy as np
import pytest
import torch

from jaxllm import LLM, LoraConfig, LoRARequest, PromptAdapterRequest, SamplingParams
from tests import tiny

# Short prompts: with their virtual tokens every batch here fits one 16-token step bucket.
PROMPTS = [[5, 17, 42], [11], [300, 12]]
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=0)
ENGINE = dict(dtype="float32", skip_tokenizer_init=True, max_batch_size=4, max_num_tokens=32)
TOLERANCE = 1e-4
MAX_DIFFS: dict[str, float] = {}


@pytest.fixture(scope="module")
def prompt_adapters(tmp_path_factory):
    """name -> (directory, embeddings [num_virtual_tokens, hidden])."""
    root = tmp_path_factory.mktemp("prompt_adapters")
    return {
        "llama4": tiny.save_prompt_adapter("llama", root / "llama4", 4, seed=1),
        "llama6": tiny.save_prompt_adapter("llama", root / "llama6", 6, seed=2),
        "gemma5": tiny.save_prompt_adapter("gemma3", root / "gemma5", 5, seed=3),
    }


IDS = {"llama4": 1, "llama6": 2, "gemma5": 3}


def adapter_req(prompt_adapters, name: str) -> PromptAdapterRequest:
    return PromptAdapterRequest(name, IDS[name], str(prompt_adapters[name][0]))


@pytest.fixture(scope="module")
def llama(tiny_dir):
    """Prompt adapters and LoRA on one engine (requests may use both)."""
    llm = LLM(model=str(tiny_dir("llama")), enable_prompt_adapter=True, max_prompt_adapter_token=8,
              max_prompt_adapters=2, lora_config=LoraConfig(max_lora_rank=4, max_loras=1), **ENGINE)  # fmt: skip
    yield llm
    llm.shutdown()
    print("\nprompt adapter parity, max |logprob difference|:", json.dumps(MAX_DIFFS, indent=1))


@pytest.fixture(scope="module")
def models(tiny_hf):
    return tiny_hf


def reference(model, table: np.ndarray | None, prompt: list[int], max_tokens: int):
    """transformers fed inputs_embeds = cat(table, embed(prompt)), greedy: (tokens, their logprobs,
    [len(prompt) + max_tokens, V] logprobs at the user's positions)."""
    embed = model.get_input_embeddings()  # Gemma 3's scales its output, as transformers does for ids
    with torch.no_grad():
        tokens = list(prompt)
        for _ in range(max_tokens + 1):
            x = embed(torch.tensor([tokens]))
            if table is not None:
                x = torch.cat([torch.tensor(table)[None], x], dim=1)
            logprobs = torch.log_softmax(model(inputs_embeds=x).logits[0].float(), -1).numpy()
            logprobs = logprobs[len(table) if table is not None else 0 :]
            tokens.append(int(logprobs[-1].argmax()))
    generated = tokens[len(prompt) : len(prompt) + max_tokens]
    chosen = np.array([logprobs[len(prompt) - 1 + i, t] for i, t in enumerate(generated)])
    return generated, chosen, logprobs


def _record(name: str, diff: float) -> None:
    MAX_DIFFS[name] = max(MAX_DIFFS.get(name, 0.0), float(diff))
    assert diff < TOLERANCE, f"{name}: {diff}"


def _tokens_and_logprobs(out):
    tokens = out.outputs[0].token_ids
    return tokens, np.array([entry[t].logprob for entry, t in zip(out.outputs[0].logprobs, tokens)])


def test_llama_matches_transformers_fed_the_embeddings(llama, prompt_adapters, models):
    """Greedy tokens, their logprobs, and the prompt logprobs and context logits of the user's tokens
    (the virtual positions are computed and skipped)."""
    names = ["llama4", "llama6", None]
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=0, prompt_logprobs=0, return_context_logits=True)
    requests = [adapter_req(prompt_adapters, n) if n else None for n in names]
    outs = llama.generate(PROMPTS, params, use_tqdm=False, prompt_adapter_request=requests)
    for name, prompt, out in zip(names, PROMPTS, outs):
        table = prompt_adapters[name][1] if name else None
        ref_tokens, ref_chosen, ref_rows = reference(models("llama"), table, prompt, 8)
        tokens, logprobs = _tokens_and_logprobs(out)
        assert tokens == ref_tokens, (name, prompt)
        _record("llama vs inputs_embeds", np.abs(logprobs - ref_chosen).max())
        assert out.prompt_token_ids == prompt and out.outputs[0].token_ids == tokens  # the user's ids only
        prompt_logprobs = out.outputs[0].prompt_logprobs
        assert len(prompt_logprobs) == len(prompt) and prompt_logprobs[0] is None
        for j in range(1, len(prompt)):
            entry = prompt_logprobs[j]
            assert set(entry) == {prompt[j]}
            _record("llama prompt_logprobs", abs(entry[prompt[j]].logprob - ref_rows[j - 1, prompt[j]]))
        context = torch.log_softmax(torch.as_tensor(out.context_logits), -1).numpy()
        assert context.shape == (len(prompt), 320)
        _record("llama context logits", np.abs(context - ref_rows[: len(prompt)]).max())


def test_mixed_batch_equals_each_request_alone(llama, prompt_adapters, models):
    adapters = [adapter_req(prompt_adapters, "llama6"), None, adapter_req(prompt_adapters, "llama4")]
    mixed = llama.generate(PROMPTS, GREEDY, use_tqdm=False, prompt_adapter_request=adapters)
    for prompt, adapter, out in zip(PROMPTS, adapters, mixed):
        alone = llama.generate(prompt, GREEDY, use_tqdm=False, prompt_adapter_request=adapter)
        tokens, logprobs = _tokens_and_logprobs(out)
        assert tokens == alone.outputs[0].token_ids and out.prompt_token_ids == prompt
        _record("mixed batch vs alone", np.abs(logprobs - _tokens_and_logprobs(alone)[1]).max())
    assert tiny.hf_greedy(models("llama"), PROMPTS[0], 8) != mixed[0].outputs[0].token_ids  # it changes the output


def test_gemma3_virtual_tokens_are_not_scaled(tiny_dir, prompt_adapters, models):
    """Gemma 3 scales token embeddings by sqrt(hidden); transformers takes the virtual ones as they are."""
    with LLM(model=str(tiny_dir("gemma3")), enable_prompt_adapter=True, max_prompt_adapter_token=8, **ENGINE) as llm:
        outs = llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False,
                            prompt_adapter_request=[adapter_req(prompt_adapters, "gemma5"), None])  # fmt: skip
    for prompt, table, out in zip(PROMPTS, [prompt_adapters["gemma5"][1], None], outs):
        ref_tokens, ref_chosen, _ = reference(models("gemma3"), table, prompt, 8)
        tokens, logprobs = _tokens_and_logprobs(out)
        assert tokens == ref_tokens
        _record("gemma3 vs inputs_embeds", np.abs(logprobs - ref_chosen).max())


def test_prompt_adapter_and_lora_together(llama, prompt_adapters, tmp_path):
    """One request with both: PEFT's LoRA model fed the prompt adapter's embeddings."""
    adapter_dir, _, peft_model = tiny.save_lora("llama", tmp_path, rank=4, alpha=8, seed=4, merge=False)
    out = llama.generate(PROMPTS[0], GREEDY, use_tqdm=False, lora_request=LoRARequest("l", 1, str(adapter_dir)),
                         prompt_adapter_request=adapter_req(prompt_adapters, "llama4"))  # fmt: skip
    ref_tokens, ref_chosen, _ = reference(peft_model.base_model.model, prompt_adapters["llama4"][1], PROMPTS[0], 8)
    tokens, logprobs = _tokens_and_logprobs(out)
    assert tokens == ref_tokens
    _record("llama prompt adapter + LoRA vs PEFT", np.abs(logprobs - ref_chosen).max())


def test_bad_prompt_adapters_are_refused_and_the_engine_keeps_serving(llama, prompt_adapters, tiny_dir, tmp_path):
    too_long = tiny.save_prompt_adapter("llama", tmp_path / "long", 12)[0]
    narrow = tiny.save_prompt_adapter("llama-odd", tmp_path / "narrow", 3)[0]  # hidden 48; llama's is 64
    lora = tiny.save_lora("llama", tmp_path / "lora", rank=2, alpha=2, merge=False)[0]
    (tmp_path / "empty").mkdir()
    llama.generate(PROMPTS[1], GREEDY, use_tqdm=False, prompt_adapter_request=adapter_req(prompt_adapters, "llama4"))
    cases = [
        (PromptAdapterRequest("l", 11, str(too_long)), "12 virtual tokens exceed max_prompt_adapter_token=8"),
        (PromptAdapterRequest("n", 12, str(narrow)), r"prompt_embeddings has shape \(3, 48\); this model needs \(3, 64"),
        (PromptAdapterRequest("r", 13, str(lora)), "peft_type='LORA'; allowed: 'PROMPT_TUNING'"),
        (PromptAdapterRequest("e", 14, str(tmp_path / "empty")), "no adapter_config.json"),
        (PromptAdapterRequest("x", 1, str(prompt_adapters["llama6"][0])), "prompt adapter id 1 .* already serves"),
    ]
    for adapter, message in cases:
        with pytest.raises(ValueError, match=message):
            llama.generate(PROMPTS[0], GREEDY, use_tqdm=False, prompt_adapter_request=adapter)
    with pytest.raises(ValueError, match=r"prompt length 1020 \+ 4 virtual tokens leaves no room for a new token within "
                                         r"max_seq_len=1024; allowed: at most 1019 prompt tokens"):  # fmt: skip
        llama.generate([5] * 1020, SamplingParams(max_tokens=1),
                       prompt_adapter_request=adapter_req(prompt_adapters, "llama4"))
    with pytest.raises(ValueError, match="prompt_adapter_local_path='/nonexistent' is not a directory"):
        PromptAdapterRequest("m", 15, "/nonexistent")
    with pytest.raises(TypeError, match="prompt_adapter_request"):
        llama.generate(PROMPTS[0], GREEDY, prompt_adapter_request=3)
    with pytest.raises(ValueError, match="enable_prompt_adapter=True needs max_prompt_adapter_token >= 1"):
        LLM(model=str(tiny_dir("llama")), enable_prompt_adapter=True)
    with pytest.raises(ValueError, match="max_prompt_adapter_token=-1"):
        LLM(model=str(tiny_dir("llama")), max_prompt_adapter_token=-1)
    with LLM(model=str(tiny_dir("llama")), **ENGINE) as plain:
        with pytest.raises(ValueError, match="prompt 1: prompt_adapter_request='llama4' needs an LLM with prompt "
                                             "adapters enabled"):  # fmt: skip
            plain.generate(PROMPTS[:2], GREEDY, prompt_adapter_request=[None, adapter_req(prompt_adapters, "llama4")])
    out = llama.generate(PROMPTS[0], GREEDY, use_tqdm=False,
                         prompt_adapter_request=adapter_req(prompt_adapters, "llama6"))
    assert len(out.outputs[0].token_ids) == 8  # still serving
