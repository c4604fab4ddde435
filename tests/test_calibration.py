"""Calibration (CalibConfig, jaxllm/calibration.py): TensorRT-LLM's fields and the refusals, the local
dataset formats, the measured scales against transformers' own activations, and a calibrated FP8
engine (static input scales, an fp8 KV cache with per-layer scales) against transformers
fake-quantized the same way, at TP=1 and TP=2 and after a save."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import LLM, CalibConfig, QuantConfig, SamplingParams
from jaxllm.calibration import (_batches, activation_amax, as_calib_config, calibrate, calibrated_config,
                                read_samples, scales_from_amax, tokenize_samples)
from jaxllm.models.params import flatten_paths

CALIBRATION = [[1, 7, 42, 99, 5, 250, 31, 8], list(range(60, 100)), [3, 3, 3, 200, 201, 17]]
PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 12], list(range(30, 70))]
FP8_AND_KV = QuantConfig(quant_algo="FP8", kv_cache_quant_algo="FP8")
ARGS = dict(dtype="float32", skip_tokenizer_init=True, max_batch_size=4, max_num_tokens=64)


def _dataset(tmp_path, samples=CALIBRATION) -> str:
    path = tmp_path / "calibration.jsonl"
    path.write_text("\n".join(json.dumps({"input_ids": ids}) for ids in samples))
    return str(path)


def test_calib_config_takes_tensorrt_llms_fields_and_reads_local_datasets(tmp_path):
    calib = CalibConfig()
    assert (calib.device, calib.calib_dataset, calib.calib_batches, calib.calib_batch_size) == ("cuda", "cnn_dailymail",
                                                                                                512, 1)  # fmt: skip
    assert (calib.calib_max_seq_length, calib.random_seed, calib.tokenizer_max_seq_length) == (512, 1234, 2048)
    assert as_calib_config({"calib_batches": 4}).calib_batches == 4
    with pytest.raises(ValueError, match=r"CalibConfig.device='tpu' is invalid; allowed: 'cuda'"):
        CalibConfig(device="tpu")
    with pytest.raises(ValueError, match=r"CalibConfig.calib_batches=0 is invalid; allowed: an int >= 1"):
        CalibConfig(calib_batches=0)
    with pytest.raises(TypeError, match=r"unknown field\(s\) \['calib_size'\]"):
        as_calib_config({"calib_size": 4})
    # a hub dataset's name: nothing is downloaded
    with pytest.raises(ValueError, match=r"calib_dataset='cnn_dailymail' is not a local file or directory"):
        read_samples(calib)
    (tmp_path / "a.txt").write_text("First paragraph,\nstill the first.\n\n\nSecond.\n")
    (tmp_path / "b.jsonl").write_text('"a string"\n{"text": "a text"}\n\n{"article": "an article"}\n'
                                      '{"input_ids": [4, 5]}\n')
    (tmp_path / "c.json").write_text(json.dumps(["one", {"text": "two"}]))
    (tmp_path / "notes.md").write_text("not read")
    want = ["First paragraph,\nstill the first.", "Second.", "a string", "a text", "an article", [4, 5], "one", "two"]
    assert read_samples(CalibConfig(calib_dataset=str(tmp_path))) == want
    drawn = read_samples(CalibConfig(calib_dataset=str(tmp_path), calib_batches=2, calib_batch_size=2, random_seed=7))
    assert len(drawn) == 4 and drawn == [s for s in want if s in drawn]  # a subset, in file order
    assert drawn == read_samples(CalibConfig(calib_dataset=str(tmp_path), calib_batches=4, random_seed=7))
    (tmp_path / "licence" / "Apache-2.0").parent.mkdir()
    (tmp_path / "licence" / "Apache-2.0").write_text("Terms.\n\nConditions.")  # text, whatever its suffix
    licence = CalibConfig(calib_dataset=str(tmp_path / "licence" / "Apache-2.0"))
    assert read_samples(licence) == ["Terms.", "Conditions."]
    for name, text, match in [("bad.jsonl", '{"text": 1}\n', r"bad.jsonl:1: a sample is .*allowed: a string"),
                              ("bad.json", "{}", r"holds a list of samples, got dict"),
                              ("broken.jsonl", "{oops\n", r"is not JSON"),
                              ("ids.jsonl", '{"input_ids": [1, "x"]}', r"'input_ids' must be a list of token ids"),
                              ("data.csv", "a,b", r"is a .csv table, which jaxllm does not read; allowed: the "
                                                  r"path of a local text file"),
                              ("binary.bin", b"\xff\xfe\x00", r"is not UTF-8 text")]:  # fmt: skip
        (tmp_path / "bad").mkdir(exist_ok=True)
        (tmp_path / "bad" / name).write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ValueError, match=match):
            read_samples(CalibConfig(calib_dataset=str(tmp_path / "bad" / name)))
    with pytest.raises(ValueError, match=r"holds text, and this LLM has no tokenizer"):
        tokenize_samples(["text"], None, 16, 100)
    with pytest.raises(ValueError, match=r"token id 100 is out of the vocabulary; allowed: 0 to 99"):
        tokenize_samples([[1, 100]], None, 16, 100)
    assert tokenize_samples([[1, 2, 3], []], None, 2, 100) == [[1, 2]]
    # padded to a power of two (at least 16, at most the length), padding masked
    (tokens, valid), = list(_batches([[1, 2, 3], list(range(20))], 2, 24))
    assert tokens.shape == (2, 24) and valid.sum(axis=1).tolist() == [3, 20]


def test_calibration_measures_what_transformers_computes(tiny_dir, tiny_hf, tmp_path):
    """Each projection's input amax and each layer's rotated-key and value amax, over batches with
    padding, are transformers' (float32; llama, and gemma3: local and global layers, q/k norms).
    Calibration reads a layer at a time: a hf or GGUF checkpoint's tensors of one layer alone, or
    the dummy weights' own values, are what the whole model's load gives."""
    import jax

    from jaxllm.checkpoints import loader
    from jaxllm.models.params import flatten_paths as flat_of
    from jaxllm.models.params import init_params
    from tests import tiny

    def of_layer(i):
        return lambda p: p.startswith(f"layers.{i}.")

    tiny.write_gguf("llama", tiny_hf("llama"), tmp_path / "llama.gguf")
    for source in (str(tiny_dir("llama")), str(tmp_path / "llama.gguf")):
        resolved = loader.resolve(source)
        cfg = loader.read_config(resolved)
        whole = flat_of(loader.load_params(resolved, cfg, jnp.float32, progress=False))
        part = loader.read_float_params(resolved, cfg, jnp.float32, of_layer(1))
        assert sorted(part) == sorted(p for p in whole if p.startswith("layers.1."))
        for p, a in part.items():
            np.testing.assert_array_equal(np.asarray(a), np.asarray(whole[p]), err_msg=f"{source} {p}")
    dummy = loader.read_float_params(None, cfg, jnp.float32, of_layer(0), load_format="dummy", seed=3)
    expected = flat_of(init_params(cfg, jnp.float32, jax.random.key(3)))
    for p, a in dummy.items():
        np.testing.assert_array_equal(np.asarray(a), np.asarray(expected[p]), err_msg=p)

    for name in ("llama", "gemma3"):
        resolved = loader.resolve(str(tiny_dir(name)))
        cfg = loader.read_config(resolved)
        params = loader.load_params(resolved, cfg, jnp.float32, progress=False)
        amax = activation_amax(params["embed"], params["layers"], cfg, _batches(CALIBRATION, 2, 64))
        inputs, k_amax, v_amax = tiny.input_amax(tiny_hf(name), CALIBRATION)
        names = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "gate_proj": "w_gate",
                 "up_proj": "w_up", "down_proj": "w_down"}  # fmt: skip
        for module, value in inputs.items():
            layer, proj = int(module.split(".")[2]), names[module.rsplit(".", 1)[-1]]
            np.testing.assert_allclose(amax[layer][proj], float(value), rtol=1e-5, err_msg=f"{name} {module}")
        np.testing.assert_allclose([a["k"] for a in amax], k_amax, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose([a["v"] for a in amax], v_amax, rtol=1e-5, err_msg=name)


def test_calibrated_fp8_engine_gives_transformers_fake_quantized_tokens_at_tp_1_and_2_and_after_save(
        tiny_dir, tmp_path):  # fmt: skip
    """FP8 weights (a scale per output channel) with calibrated static input scales and an fp8 KV
    cache with calibrated per-layer scales: the engine's scales are transformers' amax / 448, its
    greedy tokens transformers' with the same fake quantization (but at near ties), TP=2's and a
    saved engine's the same tokens; a calib_config with nothing to calibrate, or for a quantized
    checkpoint, is refused."""
    import torch

    from jaxllm.quantization import FP8_DTYPE
    from tests import tiny
    from tests.test_quantization import _assert_same_greedy_tokens, _greedy

    path = str(tiny_dir("llama"))
    calib = CalibConfig(calib_dataset=_dataset(tmp_path), calib_batch_size=2)
    model = tiny.build_tiny("llama")
    inputs, k_amax, v_amax = tiny.input_amax(model, CALIBRATION)
    quantized = {}
    for name, module in tiny._fp8_linears(model).items():
        w = module.weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True) / 448.0
        quantized[name] = ((w / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale, inputs[name] / 448.0)
    tiny.fake_quantize(model, quantized)
    tiny.fake_quantize_kv(model, [a / 448.0 for a in k_amax], [a / 448.0 for a in v_amax])
    want = [tiny.hf_greedy(model, prompt, 8) for prompt in PROMPTS]

    with LLM(model=path, quant_config=FP8_AND_KV, calib_config=calib, **ARGS) as llm:
        assert llm.config.quant_algo == "FP8" and llm.config.kv_cache_scales
        assert llm._engine.runner.kv_dtype == FP8_DTYPE
        layer = llm._engine.runner.params["layers"][1]
        for fused, module in (("wqkv", "self_attn.q_proj"), ("w_down", "mlp.down_proj")):
            np.testing.assert_allclose(float(layer[f"{fused}_input_scale"]),
                                       float(inputs[f"model.layers.1.{module}"]) / 448, rtol=1e-5)  # fmt: skip
        np.testing.assert_allclose([float(layer["k_scale"]), float(layer["v_scale"])],
                                   [k_amax[1] / 448, v_amax[1] / 448], rtol=1e-5)  # fmt: skip
        k_scale = float(layer["k_scale"])
        greedy = _greedy(llm)
    _assert_same_greedy_tokens([(w, None) for w in want], greedy)
    with LLM(model=path, tensor_parallel_size=2, quant_config=FP8_AND_KV, calib_config=calib, **ARGS) as llm:
        _assert_same_greedy_tokens(_greedy(llm), greedy)
        flat = flatten_paths(llm._engine.runner.params)
        assert float(flat["layers.1.k_scale"]) == k_scale
        llm.save(tmp_path / "saved")
    tokens = [t for t, _ in greedy]
    with LLM(model=str(tmp_path / "saved"), **ARGS) as llm:  # the saved arguments' calib_config is spent
        assert llm.config.kv_cache_scales and float(llm._engine.runner.params["layers"][1]["k_scale"]) == k_scale
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=8, ignore_eos=True),
                                                             use_tqdm=False)] == tokens  # fmt: skip
    with pytest.raises(ValueError, match=r"quantized or saved already \(its scales stand\)"):
        LLM(model=str(tmp_path / "saved"), calib_config=calib, **ARGS)
    with pytest.raises(ValueError, match=r"calib_dataset='cnn_dailymail' is not a local file"):  # before building
        LLM(model=path, quant_config=FP8_AND_KV, calib_config=CalibConfig(), **ARGS)
    with pytest.raises(ValueError, match=r"nothing is calibrated \(quant_algo='W8A16', the KV cache not fp8\)"):
        LLM(model=path, quant_config=QuantConfig(quant_algo="W8A16"), calib_config=calib, **ARGS)
    # FP8_PER_CHANNEL_PER_TOKEN keeps scaling activations per token; only the KV cache is calibrated
    from jaxllm.checkpoints import loader

    cfg = loader.read_config(loader.resolve(path))
    # device='cpu' calibrates on the host's CPU (here the engine's device too): the same scales
    on_cpu = calibrate(loader.resolve(path), calibrated_config(cfg, FP8_AND_KV, kv_fp8=True), jnp.float32,
                       dataclasses.replace(calib, device="cpu"), None)  # fmt: skip
    assert on_cpu["layers.1.k_scale"] == pytest.approx(k_scale, rel=1e-6)
    per_token = calibrated_config(cfg, QuantConfig(quant_algo="FP8_PER_CHANNEL_PER_TOKEN"), kv_fp8=True)
    assert per_token.quant_algo == "FP8_PER_CHANNEL_PER_TOKEN" and per_token.kv_cache_scales
    assert sorted(scales_from_amax([{"k": 448.0, "v": 0.0}] * cfg.num_layers, per_token).items())[:2] == [
        ("layers.0.k_scale", 1.0), ("layers.0.v_scale", 1.0)]
    # float weights and an fp8 cache (kv_cache_config.dtype='fp8' alone): the K/V scales only
    kv_only = calibrated_config(cfg, None, kv_fp8=True)
    assert kv_only.quant_algo is None and kv_only.kv_cache_scales
    scales = {f"layers.{i}.{n}_scale": 0.5 for i in range(cfg.num_layers) for n in "kv"}
    params = loader.load_engine_params(loader.resolve(path), kv_only, jnp.float32, progress=False, scales=scales)
    assert params["layers"][0]["wqkv"].dtype == jnp.float32 and float(params["layers"][2]["v_scale"]) == 0.5
