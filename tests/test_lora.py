"""LoRA adapters: jaxllm with an adapter computes what the merged checkpoint and transformers+PEFT
compute (float32, tiny checkpoints), per request in mixed batches, with fewer device slots than
adapters, under tensor parallelism, through save/reload; bad adapters are refused at the boundary."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm import LLM, LoraConfig, LoRARequest, SamplingParams
from jaxllm.adapters.bank import AdapterBank
from jaxllm.engine.buckets import ForwardShape
from jaxllm.adapters.lora import LORA_PARAMS, load_lora_adapter, save_lora_adapter
from jaxllm.checkpoints import hf
from jaxllm.engine.adapter_slots import SlotTable
from jaxllm.layers.adapters import lora_delta, lora_delta_reference, lora_onehot
from jaxllm.engine.step_inputs import build_batch
from jaxllm.models.params import unflatten_paths
from jaxllm.models.transformer import forward, forward_dense, init_kv_cache
from tests import tiny

MODEL = "llama-odd"  # 6 query / 3 KV heads, MLP 100: tensor parallelism pads and regroups it
PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11], [300, 12, 13, 14, 15]]
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=0)
ENGINE = dict(dtype="float32", skip_tokenizer_init=True, max_batch_size=4, max_num_tokens=32)
TOLERANCE = 1e-4
MAX_DIFFS: dict[str, float] = {}  # the measured parity, printed at the end of the module


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """name -> (adapter dir, merged checkpoint dir, PEFT model): ranks 4 and 8 (rsLoRA), targets given
    as names, a regex and full module paths."""
    root = tmp_path_factory.mktemp("lora")
    regex = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    paths = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.2.mlp.down_proj",
             "model.layers.1.self_attn.o_proj"]  # fmt: skip
    return {
        "r4": tiny.save_lora(MODEL, root / "r4", rank=4, alpha=8, seed=1),
        "r8": tiny.save_lora(MODEL, root / "r8", rank=8, alpha=12, targets=regex, seed=2, use_rslora=True),
        "paths": tiny.save_lora(MODEL, root / "paths", rank=2, alpha=4, targets=paths, seed=3),
    }


def lora_req(adapters, name: str, lora_id: int) -> LoRARequest:
    return LoRARequest(name, lora_id, str(adapters[name][0]))


IDS = {"r4": 1, "r8": 2, "paths": 3}


@pytest.fixture(scope="module")
def lora_llm(tiny_dir):
    llm = LLM(model=str(tiny_dir(MODEL)), lora_config=LoraConfig(max_lora_rank=8, max_loras=2, max_cpu_loras=4),
              **ENGINE)  # fmt: skip
    yield llm
    llm.shutdown()
    print("\nLoRA parity, max |logprob difference|:", json.dumps(MAX_DIFFS, indent=1))


def _tokens_and_logprobs(out):
    tokens = out.outputs[0].token_ids
    return tokens, np.array([entry[t].logprob for entry, t in zip(out.outputs[0].logprobs, tokens)])


def _record(name: str, diff: float) -> None:
    MAX_DIFFS[name] = max(MAX_DIFFS.get(name, 0.0), float(diff))
    assert diff < TOLERANCE, f"{name}: {diff}"


@functools.partial(jax.jit, static_argnums=3)
def _dense_logprobs(params, tokens, valid, cfg):
    return jax.nn.log_softmax(forward_dense(params, tokens, cfg, valid), -1)


def _merged_logprobs(merged_dir, sequences: list[list[int]]) -> list[np.ndarray]:
    """jaxllm's dense forward over the PEFT-merged checkpoint: [len(seq), V] log-probabilities each."""
    cfg = hf.read_config(merged_dir)
    params = unflatten_paths({k: jnp.asarray(v) for k, v in hf.load_hf_tensors(merged_dir, cfg)}, cfg)
    width = 32
    tokens = np.zeros((len(sequences), width), np.int32)
    valid = np.zeros((len(sequences), width), bool)
    for i, seq in enumerate(sequences):
        tokens[i, : len(seq)], valid[i, : len(seq)] = seq, True
    out = np.asarray(_dense_logprobs(params, tokens, valid, cfg))
    return [out[i, : len(seq)] for i, seq in enumerate(sequences)]


def _check_against_references(label, outs, merged_dir, peft_model):
    """Each greedy token is the argmax of the merged checkpoint's and PEFT's distributions, and its
    logprob agrees with both within TOLERANCE."""
    sequences = [prompt + out.outputs[0].token_ids for prompt, out in zip(PROMPTS, outs)]
    merged = _merged_logprobs(merged_dir, sequences)
    for prompt, out, seq, dense in zip(PROMPTS, outs, sequences, merged):
        tokens, logprobs = _tokens_and_logprobs(out)
        positions = np.arange(len(prompt) - 1, len(seq) - 1)
        peft = tiny.hf_logprobs(peft_model, seq)
        for ref_name, ref in (("merged", dense), ("peft", peft)):
            assert list(ref[positions].argmax(-1)) == tokens, f"{label} vs {ref_name}: prompt {prompt}"
            _record(f"{label} vs {ref_name}", np.abs(ref[positions, tokens] - logprobs).max())


def test_adapter_equals_the_merged_checkpoint_engine(lora_llm, adapters, tiny_dir):
    """The same engine path, once with the adapter and once over the PEFT-merged weights."""
    _, merged_dir, _ = adapters["r4"]
    with LLM(model=str(merged_dir), **ENGINE) as merged:
        expected = merged.generate(PROMPTS, GREEDY, use_tqdm=False)
        with pytest.raises(ValueError, match="needs an LLM with LoRA enabled: LLM\\(..., enable_lora=True\\)"):
            merged.generate(PROMPTS[0], GREEDY, lora_request=lora_req(adapters, "r4", 1))
        runner = merged._engine.runner
        assert runner.adapters is None and not any(getattr(s, "adapters", False) for s in runner.executables)
    got = lora_llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=lora_req(adapters, "r4", 1))
    base_model = tiny.build_tiny(MODEL)
    for prompt, g, e in zip(PROMPTS, got, expected):
        tokens, logprobs = _tokens_and_logprobs(g)
        ref_tokens, ref_logprobs = _tokens_and_logprobs(e)
        assert tokens == ref_tokens
        _record("r4 vs merged engine", np.abs(logprobs - ref_logprobs).max())
        assert tiny.hf_greedy(base_model, prompt, 8) != tokens  # the adapter changes the output


@pytest.mark.parametrize("name", ["r4", "r8", "paths"])
def test_adapter_matches_merged_forward_and_peft(name, lora_llm, adapters):
    _, merged_dir, peft_model = adapters[name]
    outs = lora_llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=lora_req(adapters, name, IDS[name]))
    _check_against_references(name, outs, merged_dir, peft_model)


def test_mixed_batch_equals_each_request_alone(lora_llm, adapters):
    loras = [lora_req(adapters, "r4", 1), None, lora_req(adapters, "r8", 2)]
    mixed = lora_llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=loras)
    for prompt, lora, out in zip(PROMPTS, loras, mixed):
        alone = lora_llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=lora)
        tokens, logprobs = _tokens_and_logprobs(out)
        alone_tokens, alone_logprobs = _tokens_and_logprobs(alone)
        assert tokens == alone_tokens and out.prompt_token_ids == prompt
        _record("mixed batch vs alone", np.abs(logprobs - alone_logprobs).max())


def test_more_adapters_than_device_slots_wait_their_turn(lora_llm, adapters):
    """max_loras=2 and three adapters (plus none) in one call: every request completes correctly.
    The third adapter waits for a slot (and the requests queued behind it with it: first come,
    first served) until the first two finish."""
    names = ["r4", None, "r8", "paths"]
    prompts = PROMPTS + [PROMPTS[0]]
    loras = [lora_req(adapters, n, IDS[n]) if n else None for n in names]
    outs = lora_llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=loras)
    for name, prompt, out in zip(names, prompts, outs):
        expected = lora_llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=loras[names.index(name)])
        assert out.outputs[0].token_ids == expected.outputs[0].token_ids, name
    slots = lora_llm._engine.scheduler.admission.lora
    assert sum(slots.refs) == 0 and slots.num_uploads >= 3
    assert lora_llm._lora_cache.num_loads == len({n for n in names if n})  # each read from disk once


def test_tensor_parallel_gives_the_single_device_tokens(lora_llm, adapters, tiny_dir):
    loras = [lora_req(adapters, "r8", 2), lora_req(adapters, "r4", 1), None]
    single = lora_llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=loras)
    with LLM(model=str(tiny_dir(MODEL)), tensor_parallel_size=2, lora_config=LoraConfig(max_lora_rank=8, max_loras=2),
             **ENGINE) as tp:  # fmt: skip
        outs = tp.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=loras)
        bank = tp._engine.runner.adapters.lora[0]
        # Column-parallel B and row-parallel A are split like their base weights, the rest replicated.
        expect = {("wq", "a"): P(None, None, None), ("wq", "b"): P(None, None, "tp", None),
                  ("wk", "b"): P(None, None, "tp", None), ("wo", "a"): P(None, "tp", None, None),
                  ("wo", "b"): P(None, None, None), ("w_up", "b"): P(None, None, "tp"),
                  ("w_down", "a"): P(None, "tp", None)}  # fmt: skip
        for (name, which), spec in expect.items():
            assert bank[name][which].sharding.spec == spec, (name, which)
        cfg = tp.engine_config
        assert bank["wq"]["b"].shape == (2, 8, cfg.num_heads, cfg.head_dim) and cfg.num_kv_heads == 4  # padded 3 -> 4
    for s, t in zip(single, outs):
        tokens, logprobs = _tokens_and_logprobs(t)
        assert tokens == s.outputs[0].token_ids
        _record("TP=2 vs TP=1", np.abs(logprobs - _tokens_and_logprobs(s)[1]).max())


def test_two_adapters_in_one_paged_forward_family_with_biases(tiny_dir, tmp_path):
    """Qwen2 (q/k/v biases, tied embeddings) at the model level: one paged forward over three
    sequences (two adapters and none, shuffled pages) gives each PEFT's logits at every position."""
    a_dir, _, a_model = tiny.save_lora("qwen2", tmp_path / "a", rank=4, alpha=4, seed=5, merge=False)
    b_dir, _, b_model = tiny.save_lora("qwen2", tmp_path / "b", rank=2, alpha=8, seed=6, merge=False, use_rslora=True)
    cfg = hf.read_config(tiny_dir("qwen2"))
    params = unflatten_paths({k: jnp.asarray(v) for k, v in hf.load_hf_tensors(tiny_dir("qwen2"), cfg)}, cfg)
    bank = AdapterBank(cfg, cfg, jnp.float32, lora_slots=2, lora_rank=4, lora_targets=LORA_PARAMS)
    for slot, adapter_dir in ((1, a_dir), (2, b_dir)):
        bank.write_lora(slot, bank.lora_values(load_lora_adapter(adapter_dir, cfg, 4)))
    sequences, slots = [PROMPTS[0], PROMPTS[2], PROMPTS[0]], [2, 1, 0]
    references = [b_model, a_model, tiny.build_tiny("qwen2")]
    tables = [[3, 9], [1, 12], [5, 14]]
    batch = build_batch(sequences, [0, 0, 0], tables, 4, num_tokens=32, num_seqs=4, pages_per_seq=4)
    token_slots = np.zeros(32, np.int32)
    token_slots[: sum(map(len, sequences))] = np.repeat(slots, [len(s) for s in sequences])
    logits, _ = forward(params, batch, init_kv_cache(cfg, 16, 4, jnp.float32), cfg, all_logits=True,
                        adapters=bank.step_inputs(jnp.asarray(token_slots)))  # fmt: skip
    logprobs, offset = np.asarray(jax.nn.log_softmax(logits, -1)), 0
    for seq, model in zip(sequences, references):
        diff = np.abs(logprobs[offset : offset + len(seq)] - tiny.hf_logprobs(model, seq)).max()
        _record("qwen2 model-level vs peft", diff)
        offset += len(seq)


def test_saved_lora_engine_reloads_its_executables(lora_llm, adapters, tmp_path):
    lora = lora_req(adapters, "r4", 1)
    expected = lora_llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=lora)
    lora_llm.save(tmp_path / "engine")
    with LLM(model=str(tmp_path / "engine"), skip_tokenizer_init=True) as reloaded:
        runner = reloaded._engine.runner
        assert reloaded.args.enable_lora and reloaded.args.lora_config.max_loras == 2
        assert any(getattr(s, "adapters", False) for s in runner.executables)  # adapter programs came back
        compiled = runner.num_compilations
        outs = reloaded.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=lora)
        assert runner.num_compilations == compiled  # served by the loaded executables
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expected]
        forwards = [s for s in runner.bucket_shapes() if isinstance(s, ForwardShape)]  # every program it can run
        assert len(forwards) == 2 * sum(1 for s in forwards if not s.adapters)  # each with its adapters twin


@pytest.mark.parametrize("name", ["r8", "paths"])
def test_saved_adapter_reads_back_and_the_dense_forward_matches_peft(name, lora_llm, adapters, tmp_path):
    """save_lora_adapter writes what load_lora_adapter and PEFT read back; forward_dense(lora=) with
    an adapter's layers computes PEFT's log-probabilities (rsLoRA, and per-layer module sets)."""
    from peft import PeftModel

    adapter_dir, _, peft_model = adapters[name]
    cfg = lora_llm.config
    adapter = load_lora_adapter(adapter_dir, cfg, max_rank=8)
    saved = save_lora_adapter(tmp_path / "saved", cfg, adapter.layers, lora_alpha=3.0)
    again = load_lora_adapter(saved, cfg, max_rank=8)
    assert [sorted(layer) for layer in again.layers] == [sorted(layer) for layer in adapter.layers]
    for layer, other in zip(adapter.layers, again.layers):
        for param, (a, b) in layer.items():
            np.testing.assert_array_equal(other[param][0], a)
            np.testing.assert_allclose(other[param][1], b, rtol=1e-6, atol=1e-7)
    seq = PROMPTS[0] + PROMPTS[2]
    dense = np.asarray(jax.nn.log_softmax(forward_dense(lora_llm.params, jnp.asarray([seq]), cfg,
                                                        lora=adapter.layers)[0], -1))  # fmt: skip
    _record(f"{name} dense forward vs peft", np.abs(dense - tiny.hf_logprobs(peft_model, seq)).max())
    reread = PeftModel.from_pretrained(tiny.build_tiny(MODEL), str(saved)).eval()
    _record(f"{name} saved, read by peft", np.abs(tiny.hf_logprobs(reread, seq) - tiny.hf_logprobs(peft_model, seq)).max())
    with pytest.raises(ValueError, match="layer 0 has 'embed', which jaxllm cannot adapt"):
        save_lora_adapter(tmp_path / "bad", cfg, [{"embed": (np.zeros((4, 2)), np.zeros((2, 4))), **adapter.layers[0]}]
                          + list(adapter.layers[1:]))  # fmt: skip
    with pytest.raises(ValueError, match=f"2 layers given; the model has {cfg.num_layers}"):
        save_lora_adapter(tmp_path / "bad", cfg, adapter.layers[:2])
    with pytest.raises(ValueError, match=f"lora has 2 layers; the model has {cfg.num_layers}"):
        forward_dense(lora_llm.params, jnp.asarray([seq]), cfg, lora=adapter.layers[:2])


def test_bad_adapters_are_refused_and_the_engine_keeps_serving(lora_llm, adapters, tiny_dir, tmp_path):
    embed = tiny.save_lora(MODEL, tmp_path / "embed", rank=2, alpha=2, targets=["embed_tokens", "q_proj"])[0]
    head = tiny.save_lora(MODEL, tmp_path / "head", rank=2, alpha=2, targets=["lm_head", "q_proj"])[0]
    dora = tiny.save_lora(MODEL, tmp_path / "dora", rank=2, alpha=2, use_dora=True)[0]
    saved = tiny.save_lora(MODEL, tmp_path / "saved", rank=2, alpha=2, modules_to_save=["lm_head"])[0]
    big = tiny.save_lora(MODEL, tmp_path / "big", rank=16, alpha=16)[0]
    other = tiny.save_lora("llama", tmp_path / "other", rank=2, alpha=2)[0]  # hidden 64, this model has 48
    (tmp_path / "empty").mkdir()
    lora_llm.generate(PROMPTS[0], GREEDY, use_tqdm=False, lora_request=lora_req(adapters, "r4", 1))  # id 1 is r4
    cases = [
        (LoRARequest("e", 11, str(embed)), "target_modules names 'embed_tokens'"),
        (LoRARequest("h", 12, str(head)), "target_modules names 'lm_head'"),
        (LoRARequest("d", 13, str(dora)), "use_dora=True: DoRA"),
        (LoRARequest("s", 14, str(saved)), "modules_to_save=\\['lm_head'\\]"),
        (LoRARequest("b", 15, str(big)), "rank 16 of model.layers.0.self_attn.q_proj exceeds max_lora_rank=8"),
        (LoRARequest("o", 16, str(other)), r"q_proj.lora_A has shape \(2, 64\); this model \(rank 2\) needs \(2, 48\)"),
        (LoRARequest("m", 17, str(tmp_path / "empty")), "no adapter_config.json"),
        (LoRARequest("x", 1, str(adapters["r8"][0])), "LoRA id 1 \\('x'\\) names .*r8/adapter, but this LLM already"),
    ]
    for lora, message in cases:
        with pytest.raises(ValueError, match=message):
            lora_llm.generate(PROMPTS[0], GREEDY, use_tqdm=False, lora_request=lora)
    (tmp_path / "no_weights").mkdir()
    config = (adapters["r4"][0] / "adapter_config.json").read_text()
    (tmp_path / "no_weights" / "adapter_config.json").write_text(config)
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        lora_llm.generate(PROMPTS[0], GREEDY, lora_request=LoRARequest("w", 18, str(tmp_path / "no_weights")))
    with pytest.raises(ValueError, match="lora_path='/nonexistent' is not a directory"):
        LoRARequest("n", 19, "/nonexistent")
    with pytest.raises(TypeError, match="lora_request"):
        lora_llm.generate(PROMPTS[0], GREEDY, lora_request="r4")
    with pytest.raises(ValueError, match="adapter targets q_proj, k_proj, o_proj, gate_proj, up_proj, down_proj, but "
                                         "the engine serves LoRA on v_proj only"):  # fmt: skip
        load_lora_adapter(adapters["r4"][0], lora_llm.config, 8, allowed=("wv",))
    for kwargs, message in [
        (dict(max_loras=0), "max_loras=0"),
        (dict(max_loras=4, max_cpu_loras=2), "max_cpu_loras=2 is invalid; allowed: >= max_loras=4"),
        (dict(max_lora_rank=-1), "max_lora_rank=-1"),
        (dict(lora_target_modules=["embed_tokens"]), "'embed_tokens' is not a module jaxllm adapts"),
        (dict(lora_dir=["/nonexistent"]), "are not directories"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            LoraConfig(**kwargs)
    with pytest.raises(TypeError, match="lora_config must be a LoraConfig"):
        LLM(model=str(tiny_dir(MODEL)), lora_config=3)
    out = lora_llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=lora_req(adapters, "r4", 1))
    assert all(len(o.outputs[0].token_ids) == 8 for o in out)  # still serving


def test_lora_targets_follow_the_config(tiny_dir, adapters):
    """TensorRT-LLM module names; lora_dir adapters are read at startup and set the bank's modules."""
    config = LoraConfig(lora_target_modules=["attn_q", "attn_v", "mlp_4h_to_h"])
    assert config.target_params() == ("wq", "wv", "w_down")
    llm = LLM(model=str(tiny_dir(MODEL)), lora_config=LoraConfig(lora_dir=[str(adapters["paths"][0])], max_lora_rank=2),
              **ENGINE)  # fmt: skip
    try:
        assert llm._engine.runner.adapters.lora_targets == ("wq", "wv", "wo", "w_down")
        with pytest.raises(ValueError, match="the adapter targets k_proj, gate_proj, up_proj, but the engine serves "
                                             "LoRA on q_proj, v_proj, o_proj, down_proj only"):  # fmt: skip
            llm.generate(PROMPTS[0], GREEDY, lora_request=LoRARequest("r", 21, str(adapters["r4"][0])))
    finally:
        llm.shutdown()


def test_lora_delta_matches_per_token_reference():
    """The one-hot formulation equals gathering each token's own adapter (slot 0: no delta)."""
    rng = np.random.default_rng(0)
    T, S, R = 9, 3, 4
    slots = jnp.asarray(rng.integers(0, S + 1, T), jnp.int32)
    for in_shape, out_shape in [((6,), (2, 5)), ((2, 5), (6,))]:  # wq-like and wo-like
        x = jnp.asarray(rng.normal(size=(T, *in_shape)), jnp.float32)
        a = jnp.asarray(rng.normal(size=(S, *in_shape, R)), jnp.float32)
        b = jnp.asarray(rng.normal(size=(S, R, *out_shape)), jnp.float32)
        got = lora_delta(x, a, b, lora_onehot(slots, S, jnp.float32))
        np.testing.assert_allclose(got, lora_delta_reference(x, a, b, slots), atol=1e-5, rtol=1e-5)
        assert np.all(np.asarray(got)[np.asarray(slots) == 0] == 0)


def test_slot_table_never_evicts_a_held_slot():
    uploads = []
    table = SlotTable(2, lambda slot, adapter: uploads.append((slot, adapter.adapter_id)))

    class Adapter:
        def __init__(self, adapter_id):
            self.adapter_id = adapter_id

    one, two, three = Adapter(1), Adapter(2), Adapter(3)
    s1, s2 = table.acquire(one), table.acquire(two)
    assert not table.can_acquire(3) and table.can_acquire(1)  # both held: adapter 3 must wait
    assert table.acquire(one) == s1  # a second sequence shares the resident slot
    table.release(s2)
    assert table.acquire(three) == s2 and uploads[-1] == (s2, 3)  # reuses the released slot
    table.release(s1)
    table.release(s1)
    table.release(s2)
    assert table.acquire(two) == s1  # least recently released goes first; 3 stays resident
    assert table.acquire(three) == s2 and len(uploads) == 4


def test_lora_id_zero_is_an_id_like_any_other(lora_llm, adapters):
    """TensorRT-LLM takes any lora_int_id, 0 included (vLLM wants ids >= 1)."""
    zero = lora_llm.generate(PROMPTS[0], GREEDY, lora_request=LoRARequest("zero", 0, str(adapters["r4"][0])),
                             use_tqdm=False)  # fmt: skip
    one = lora_llm.generate(PROMPTS[0], GREEDY, lora_request=lora_req(adapters, "r4", IDS["r4"]), use_tqdm=False)
    base = lora_llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)
    assert _tokens_and_logprobs(zero)[0] == _tokens_and_logprobs(one)[0] != _tokens_and_logprobs(base)[0]
    np.testing.assert_allclose(_tokens_and_logprobs(zero)[1], _tokens_and_logprobs(one)[1], atol=1e-6)
    with pytest.raises(ValueError, match=r"lora_int_id=-1 is invalid; allowed: an int >= 0"):
        LoRARequest("a", -1, str(adapters["r4"][0]))
