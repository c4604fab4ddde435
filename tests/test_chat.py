"""LLM.chat: conversations rendered with the model's chat template, as transformers renders them."""

import pytest

from jaxllm import SamplingParams

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


def test_chat_prompt_is_transformers_rendering_without_a_second_bos(smollm2_llm, smollm2_hf):
    _, hf_tok = smollm2_hf
    expected = list(hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False))
    out = smollm2_llm.chat(CHAT, GREEDY, use_tqdm=False)
    assert out.prompt_token_ids == expected
    assert out.prompt == hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert out.outputs[0].token_ids == smollm2_llm.generate(expected, GREEDY, use_tqdm=False).outputs[0].token_ids
    assert out.outputs[0].text  # an instruct model answers a rendered chat (a raw prompt may end at once)


def test_chat_takes_a_list_of_conversations_and_text_parts(smollm2_llm):
    parts = [CHAT[0], {"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]}]
    outs = smollm2_llm.chat([CHAT, parts], GREEDY, use_tqdm=False)
    assert isinstance(outs, list) and len(outs) == 2
    assert outs[0].prompt_token_ids == outs[1].prompt_token_ids
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    cont = smollm2_llm.chat(CHAT + [{"role": "assistant", "content": "Blue"}], GREEDY, use_tqdm=False,
                            add_generation_prompt=False, continue_final_message=True)  # fmt: skip
    assert cont.prompt.endswith("Blue")


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "non-empty list"),
        ([{"role": "wizard", "content": "hi"}], "role 'wizard' is not one of"),
        ([{"content": "hi"}], "message 0 must be a dict with 'role'"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "only text parts"),
        ([CHAT, [{"role": "user", "content": 5}]], "conversation 1: message 0: content must be"),
    ],
)
def test_bad_conversations_name_what_is_wrong(smollm2_llm, messages, match):
    with pytest.raises(ValueError, match=match):
        smollm2_llm.chat(messages, GREEDY, use_tqdm=False)
    assert smollm2_llm.generate([1, 2, 3], GREEDY, use_tqdm=False).outputs[0].token_ids  # still serving


def test_chat_without_a_tokenizer_or_template_says_so(tiny_llm, smollm2_llm):
    with pytest.raises(ValueError, match="skip_tokenizer_init"):
        tiny_llm("llama").chat(CHAT)
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    out = smollm2_llm.chat(CHAT, GREEDY, use_tqdm=False, chat_template=template, add_generation_prompt=False)
    assert out.prompt == "[system] You are terse.\n[user] Name a colour.\n"
