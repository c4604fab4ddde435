"""Guided decoding (jaxllm/guided.py) on the real built-in SmolLM2: outputs that follow their JSON
schemas, regexes, choices and grammars, unguided requests of the same batch unchanged token for
token, bad constraints refused at submission with the engine serving on, and the server's
response_format / guided_* fields (converted, and through a real server with the openai client)."""

import json
import re

import pytest

pytest.importorskip("llguidance")

from jaxllm import LLM, GuidedDecodingParams, SamplingParams  # noqa: E402

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}  # fmt: skip
ITEMS = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string", "enum": ["apple", "pear"]},
                                                    "minItems": 1, "maxItems": 3}},
         "required": ["items"], "additionalProperties": False}  # fmt: skip
FLAG = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm():
    with LLM("smollm2", guided_decoding_backend="llguidance", max_batch_size=16, max_num_tokens=512,
             max_seq_len=512) as llm:  # fmt: skip
        yield llm


def person_ok(value) -> bool:
    return (set(value) == {"name", "age"} and isinstance(value["name"], str) and len(value["name"]) <= 16
            and isinstance(value["age"], int) and not isinstance(value["age"], bool))  # fmt: skip


def test_guided_outputs_follow_their_constraints_and_unguided_rows_are_unchanged(llm):
    free = "The capital of France is"
    cases = [
        ("Describe a person as JSON.", GuidedDecodingParams(json=PERSON), lambda t: person_ok(json.loads(t))),
        ("List some fruit as JSON.", GuidedDecodingParams(json=json.dumps(ITEMS)),
         lambda t: 1 <= len(json.loads(t)["items"]) <= 3 and set(json.loads(t)["items"]) <= {"apple", "pear"}),
        ("Is water wet? Answer in JSON.", GuidedDecodingParams(json=FLAG), lambda t: isinstance(json.loads(t)["ok"], bool)),
        ("Give a phone number.", GuidedDecodingParams(regex=r"[0-9]{3}-[0-9]{4}"),
         lambda t: re.fullmatch(r"[0-9]{3}-[0-9]{4}", t) is not None),
        ("A date:", GuidedDecodingParams(regex=r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"),
         lambda t: re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]", t) is not None),
        ("Is the sky blue?", GuidedDecodingParams(choice=["yes", "no", "maybe"]), lambda t: t in ("yes", "no", "maybe")),
        ("Pick a colour:", GuidedDecodingParams(grammar='root ::= "red" | "green" | "blue"'),
         lambda t: t in ("red", "green", "blue")),
        ("Any JSON object:", GuidedDecodingParams(json_object=True), None),  # may run to max_tokens: checked below
        (free, None, None),
    ]  # fmt: skip
    params = [SamplingParams(max_tokens=40, guided_decoding=g) for _, g, _ in cases]
    outs = llm.generate([p for p, _, _ in cases], params)
    for (prompt, guided, check), out in zip(cases, outs):
        text = out.outputs[0].text
        if guided is None:
            continue
        if guided.json_object:
            assert text.lstrip().startswith("{"), text
            if out.outputs[0].finish_reason == "stop":
                assert isinstance(json.loads(text), dict)
            continue
        assert out.outputs[0].finish_reason == "stop", (guided.kind, text)
        assert check(text), (guided.kind, text)
    alone = llm.generate(free, SamplingParams(max_tokens=40))
    assert alone.outputs[0].token_ids == outs[-1].outputs[0].token_ids


def test_guided_steps_run_ahead_with_the_outputs_of_steps_that_wait(llm):
    """With the overlap scheduler, a step with guided rows is dispatched before the last step is
    read, its sampler once that step's tokens have reached the grammars (the bitmasks filled while
    the device computes the forward): the same tokens, log-probabilities and finish reasons as the
    engine that waits for every read, greedy and seeded, beside unguided rows."""
    prompts = ["Describe a person as JSON.", "Give a phone number.", "List some fruit as JSON.", "Tell me a story."]
    params = [SamplingParams(max_tokens=30, guided_decoding=GuidedDecodingParams(json=PERSON)),
              SamplingParams(max_tokens=12, temperature=0.9, seed=4, logprobs=2,
                             guided_decoding=GuidedDecodingParams(regex=r"[0-9]{3}-[0-9]{4}")),
              SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=11, guided_decoding=GuidedDecodingParams(json=ITEMS)),
              SamplingParams(max_tokens=24, temperature=0.7, seed=2)]  # fmt: skip

    def outputs(overlap: bool):
        llm._engine.overlap = overlap
        try:
            follow_ons = llm._engine.num_follow_ons  # steps dispatched ahead of the last one's read
            outs = llm.generate(prompts, params, use_tqdm=False)
            return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].logprobs) for o in outs], \
                llm._engine.num_follow_ons - follow_ons  # fmt: skip
        finally:
            llm._engine.overlap = True

    waited, follow_ons = outputs(False)
    assert follow_ons == 0
    ahead, follow_ons = outputs(True)
    assert follow_ons >= 10
    assert [(t, f) for t, f, _ in ahead] == [(t, f) for t, f, _ in waited]
    for (_, _, a), (_, _, w) in zip(ahead, waited):  # (logprobs: requests[1]'s)
        assert [sorted(e) for e in a or []] == [sorted(e) for e in w or []]
        assert all(abs(x[t].logprob - y[t].logprob) < 1e-4 for x, y in zip(a or [], w or []) for t in x)
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", llm.tokenizer.decode(ahead[1][0]))
    bm = llm._engine.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks


def test_a_steps_bitmasks_filled_at_once_equal_each_rows(llm):
    """GuidedDecoder.bitmasks (a step's rows on llguidance's threads) gives each row's bitmask,
    every token allowed for a matcher that failed."""
    from jaxllm.guided import GuidedDecoder, consume

    decoder = GuidedDecoder("llguidance", llm.tokenizer, llm.config.vocab_size)
    grammars = [GuidedDecodingParams(json=PERSON), GuidedDecodingParams(regex=r"[0-9]{3}-[0-9]{4}"),
                GuidedDecodingParams(choice=["yes", "no"]), GuidedDecodingParams(json=ITEMS)]  # fmt: skip
    matchers = [decoder.matcher(decoder.compile(g)) for g in grammars]
    for text, m in zip(['{"name": "A', "555-", "", '{"items": ["apple"'], matchers):
        for token in llm.tokenizer.encode(text):
            assert consume(m, token) is None
    bad = decoder.matcher(decoder.compile(GuidedDecodingParams(regex="[0-9]+")))
    assert consume(bad, llm.tokenizer.encode("x")[0]) is not None  # failed
    matchers.append(bad)
    rows = decoder.bitmasks(matchers)
    assert rows.shape == (5, decoder.words) and (rows[-1] == -1).all()
    for m, row in zip(matchers, rows):
        assert (row == decoder.bitmask(m)).all()
    assert len({row.tobytes() for row in rows}) == 5


def test_sampled_guided_samples_each_follow_the_schema(llm):
    out = llm.generate("Describe a person as JSON.",
                       SamplingParams(max_tokens=48, temperature=0.9, n=2, seed=3, guided_decoding=GuidedDecodingParams(json=PERSON)))  # fmt: skip
    assert len(out.outputs) == 2
    for seq in out.outputs:
        assert seq.finish_reason == "stop" and person_ok(json.loads(seq.text)), seq.text


@pytest.mark.parametrize("guided, message", [
    (GuidedDecodingParams(regex="[0-9"), "regex cannot be compiled"),
    (GuidedDecodingParams(json="{bad"), "not valid JSON"),
])  # fmt: skip
def test_bad_constraints_are_refused_at_submission_and_the_engine_serves_on(llm, guided, message):
    with pytest.raises(ValueError, match=message):
        llm.generate("x", SamplingParams(max_tokens=4, guided_decoding=guided))
    assert llm.generate("Hello", SamplingParams(max_tokens=3)).outputs[0].token_ids


def test_guided_params_and_backend_are_checked():
    with pytest.raises(ValueError, match="exactly one of"):
        GuidedDecodingParams(json=PERSON, regex="a")
    with pytest.raises(ValueError, match="exactly one of"):
        GuidedDecodingParams()
    with pytest.raises(ValueError, match="choice"):
        GuidedDecodingParams(choice=[])
    with pytest.raises(TypeError, match="GuidedDecodingParams"):
        SamplingParams(guided_decoding={"json": PERSON})
    with pytest.raises(ValueError, match="guided_decoding_backend='nope'.*'xgrammar', 'llguidance'"):
        LLM("smollm2", guided_decoding_backend="nope")


def test_a_guided_request_needs_an_llm_with_a_backend(tiny_llm):
    with pytest.raises(ValueError, match="guided_decoding_backend"):
        tiny_llm("llama").generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2, guided_decoding=GuidedDecodingParams(regex="a")))


def test_server_fields_become_guided_decoding():
    pytest.importorskip("pydantic")
    from jaxllm.serve import protocol
    from jaxllm.serve.protocol import ChatCompletionRequest, CompletionRequest, ServeError

    def guided(**body):
        return protocol.guided_decoding(ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **body))

    assert guided() is None and guided(response_format={"type": "text"}) is None
    assert guided(response_format={"type": "json_object"}).json_object
    assert guided(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}).json == PERSON
    assert guided(guided_regex="[a-z]+").regex == "[a-z]+"
    assert protocol.guided_decoding(CompletionRequest(prompt="x", guided_choice=["a", "b"])).choice == ["a", "b"]
    for body, param in (({"response_format": {"type": "xml"}}, "response_format"),
                        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
                        ({"guided_regex": "a", "guided_json": PERSON}, "guided_json")):  # fmt: skip
        with pytest.raises(ServeError) as e:
            guided(**body)
        assert e.value.status == 400 and e.value.param in (param, "guided_regex"), body


def test_the_server_takes_response_format_and_guided_fields(llm):
    """A real server on a loopback port over the guided LLM, driven by the official openai client."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    import socket
    import threading
    import time

    from jaxllm.serve.app import ServerState
    from jaxllm.serve.server import build_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = build_server(ServerState(model_name="guided", llm=llm), "127.0.0.1", port, drain_timeout=5,
                          log_level="warning")  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "Describe a person as JSON."}]
        reply = client.chat.completions.create(
            model="guided", messages=messages, max_tokens=48, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})  # fmt: skip
        assert person_ok(json.loads(reply.choices[0].message.content)), reply.choices[0].message.content
        done = client.completions.create(model="guided", prompt="Is the sky blue?", max_tokens=8, temperature=0,
                                         extra_body={"guided_choice": ["yes", "no"]})  # fmt: skip
        assert done.choices[0].text in ("yes", "no")
        with pytest.raises(openai.BadRequestError, match="regex cannot be compiled"):
            client.completions.create(model="guided", prompt="x", max_tokens=4, extra_body={"guided_regex": "[0-9"})
    finally:
        server.should_exit = True
        thread.join(10)
