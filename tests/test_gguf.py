"""GGUF loading: metadata to config, every tensor type, llama.cpp's layout changes undone."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.checkpoints import gguf, loader
from jaxllm.checkpoints.names import CheckpointError
from jaxllm.models.transformer import forward_dense
from tests import tiny

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q5_K", "Q6_K"]


def _model(name):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny.gguf_config(name), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3"])
def test_f32_gguf_equals_transformers(name, tmp_path):
    """An F32 GGUF written the llama.cpp way (q/k interleave, Gemma norms + 1) loads to the HF model."""
    model = _model(name)
    path = tmp_path / "m.gguf"
    tiny.write_gguf(name, model, path, "F32")
    resolved = loader.resolve(str(path))
    cfg = loader.read_config(resolved)
    assert cfg.family == ("llama" if name == "llama" else name)
    params = loader.load_params(resolved, cfg, jnp.float32, progress=False)
    ids = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
    got = jax.nn.log_softmax(forward_dense(params, jnp.asarray([ids]), cfg)[0], -1)
    np.testing.assert_allclose(np.asarray(got), tiny.hf_logprobs(model, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("tensor_type", TYPES)
def test_tensor_types_dequantize_exactly(tensor_type, tmp_path):
    model = _model("llama")
    path = tmp_path / f"m-{tensor_type}.gguf"
    held = tiny.write_gguf("llama", model, path, tensor_type)
    resolved = loader.resolve(str(path))
    cfg = loader.read_config(resolved)
    kinds = {t.tensor_type.name for t in gguf._open(path).tensors}
    assert tensor_type in kinds
    got = dict(gguf.iter_gguf_file_tensors(path, cfg))
    assert set(got) == set(held)
    for name, array in held.items():
        np.testing.assert_array_equal(got[name], array.astype(np.float32), err_msg=name)
    # And the model runs on them.
    params = loader.load_params(resolved, cfg, jnp.float32, progress=False)
    logits = forward_dense(params, jnp.asarray([[1, 2, 3]]), cfg)
    assert np.isfinite(np.asarray(logits)).all()


def _assert_kept_engine_gives_float32_tokens(path, kept):
    """An engine on the GGUF file at `path` under `kept` (a QuantConfig whose groups keep its blocks)
    gives the float32 engine's greedy tokens at TP=1 and TP=4 (which holds each KV head twice: the
    blocks laid out as their weights)."""
    from jaxllm import LLM, SamplingParams

    prompts = [{"prompt_token_ids": [3, 14, 15, 92, 65, 35]}, {"prompt_token_ids": [7, 8, 9]}]
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    args = dict(dtype="float32", skip_tokenizer_init=True, max_batch_size=2, max_num_tokens=64)
    runs = [("float32", None, 1), ("kept", kept, 1)] + ([("kept, TP=4", kept, 4)] if len(jax.devices()) >= 4 else [])
    tokens = {}
    for mode, quant, tp in runs:
        with LLM(model=str(path), quant_config=quant, tensor_parallel_size=tp, **args) as llm:
            tokens[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    assert all(t == tokens["float32"] for t in tokens.values()), tokens


@pytest.mark.parametrize("tensor_type", ["Q4_0", "Q4_1", "Q4_K", "Q5_0"])
def test_4bit_blocks_are_read_as_int4_groups(tensor_type, tmp_path):
    """Under W4A16 in asymmetric groups of 32 (`--quantization gguf`) a projection stored in 4-bit
    blocks (Q4_0, Q4_1, Q4_K) is read as its blocks: int4 levels, each group's scale and offset from
    the block, dequantizing to the file's floats (q/k rows un-interleaved with their groups), never
    quantized again; other types (Q5_0) are quantized from their floats as they load. Symmetric
    groups take only Q4_0's blocks (no offsets). The engine's greedy tokens are the float32 one's, at
    TP=1 and TP=4."""
    from jaxllm import QuantConfig
    from jaxllm.layers.linear import dequantize_groups
    from jaxllm.quantization import QUANTIZED_PARAMS, IntGroups

    path = tmp_path / f"m-{tensor_type}.gguf"
    tiny.write_gguf("llama", _model("llama"), path, tensor_type)
    resolved = loader.resolve(str(path))
    cfg = loader.read_config(resolved)
    kept = {}
    for zero_point in (True, False):
        qcfg = dataclasses.replace(cfg, quant_algo="W4A16", quant_group_size=32, quant_zero_point=zero_point)
        kept[zero_point] = sum(isinstance(a, IntGroups) for _, a in gguf.load_gguf_tensors(path, cfg, qcfg))
    projections = cfg.num_layers * len(QUANTIZED_PARAMS)
    assert kept == {True: 0 if tensor_type == "Q5_0" else projections, False: projections if tensor_type == "Q4_0" else 0}
    floats = loader.load_params(resolved, cfg, jnp.float32, progress=False)
    qcfg = dataclasses.replace(cfg, quant_algo="W4A16", quant_group_size=32, quant_zero_point=True)
    params = loader.load_params(resolved, qcfg, jnp.float32, progress=False)
    for i, layer in enumerate(params["layers"]):
        for name, n_in in QUANTIZED_PARAMS.items():
            assert layer[name].dtype == jnp.int4
            w = dequantize_groups(layer[name], layer[name + "_scale"], n_in, jnp.float32, layer[name + "_zero"])
            want = np.asarray(floats["layers"][i][name])
            if tensor_type == "Q5_0":  # 32 levels quantized to 16
                assert np.abs(np.asarray(w) - want).max() > 1e-3
            else:
                np.testing.assert_allclose(np.asarray(w), want, rtol=0, atol=1e-6 * np.abs(want).max(), err_msg=name)
    if tensor_type == "Q4_K":
        kept = QuantConfig(quant_algo="W4A16", group_size=32, has_zero_point=True)
        _assert_kept_engine_gives_float32_tokens(path, kept)


@pytest.mark.parametrize("tensor_type", ["Q8_0", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q4_K"])
def test_blocks_are_read_as_int8_groups(tensor_type, tmp_path, monkeypatch):
    """Under W8A16_GPTQ (int8 groups) a projection in any block type is read as its blocks: the
    levels centred on zero as int8, each group's scale and offset from the block (groups of 16
    take Q6_K's sub-blocks, and each 32-value block's twice), dequantizing to the file's floats;
    symmetric groups take only the types without offsets (Q5_0, Q6_K, Q8_0), groups of 32 not
    Q6_K's 16. The engine's greedy tokens are the float32 one's, at TP=1 and TP=4."""
    from jaxllm import QuantConfig
    from jaxllm.layers.linear import dequantize_groups
    from jaxllm.quantization import QUANTIZED_PARAMS, IntGroups

    path = tmp_path / f"m-{tensor_type}.gguf"
    tiny.write_gguf("llama", _model("llama"), path, tensor_type)
    resolved = loader.resolve(str(path))
    cfg = loader.read_config(resolved)
    projections = cfg.num_layers * len(QUANTIZED_PARAMS)
    symmetric = tensor_type in gguf.SYMMETRIC_BLOCK_TYPES
    tensor = next(t for t in gguf._open(path).tensors if t.name == "blk.0.ffn_down.weight")
    whole = gguf.int_blocks(tensor, 16)
    monkeypatch.setattr(gguf, "_DEQUANTIZE_ELEMENTS", 3 * 256)  # read in slices of 3 rows: the same
    for a, b in zip(whole, gguf.int_blocks(tensor, 16)):
        np.testing.assert_array_equal(a, b)
    for group, zero_point in ((16, True), (16, False), (32, True)):
        qcfg = dataclasses.replace(cfg, quant_algo="W8A16", quant_group_size=group, quant_zero_point=zero_point)
        kept = sum(isinstance(a, IntGroups) for _, a in gguf.load_gguf_tensors(path, cfg, qcfg))
        fits = (zero_point or symmetric) and not (group == 32 and tensor_type == "Q6_K")
        assert kept == (projections if fits else 0), (group, zero_point)
    floats = loader.load_params(resolved, cfg, jnp.float32, progress=False)
    qcfg = dataclasses.replace(cfg, quant_algo="W8A16", quant_group_size=16, quant_zero_point=True)
    params = loader.load_params(resolved, qcfg, jnp.float32, progress=False)
    for i, layer in enumerate(params["layers"]):
        for name, n_in in QUANTIZED_PARAMS.items():
            assert layer[name].dtype == jnp.int8
            w = dequantize_groups(layer[name], layer[name + "_scale"], n_in, jnp.float32, layer[name + "_zero"])
            want = np.asarray(floats["layers"][i][name])
            np.testing.assert_allclose(np.asarray(w), want, rtol=0, atol=1e-6 * np.abs(want).max(), err_msg=name)
    if tensor_type in ("Q6_K", "Q5_1"):
        kept = QuantConfig(quant_algo="W8A16_GPTQ", group_size=16, has_zero_point=not symmetric)
        _assert_kept_engine_gives_float32_tokens(path, kept)


def test_unsupported_tensor_type_is_refused(tmp_path):
    import gguf as gg

    path = tmp_path / "bad.gguf"
    writer = gg.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.ones((4, 40), np.uint8), raw_dtype=gg.GGMLQuantizationType.Q8_1)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    tensor = gguf._open(path).tensors[0]
    with pytest.raises(CheckpointError, match="Q8_1.*supported"):
        gguf._dequantize(tensor)


def test_unknown_gguf_architecture(tmp_path):
    import gguf as gg

    path = tmp_path / "phi.gguf"
    writer = gg.GGUFWriter(str(path), "phi3")
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ValueError, match="'phi3' is not supported; supported: llama, qwen2, qwen3, gemma3"):
        loader.read_config(loader.resolve(str(path)))


def test_real_gguf_metadata_maps_to_config(smollm2_path, gemma3_path):
    smol = loader.read_config(loader.resolve(str(smollm2_path)))
    assert (smol.family, smol.num_layers, smol.num_heads, smol.num_kv_heads, smol.head_dim) == ("llama", 30, 9, 3, 64)
    assert smol.tie_word_embeddings and smol.vocab_size == 49152 and smol.rope.theta == 100000.0
    gem = loader.read_config(loader.resolve(str(gemma3_path)))
    assert gem.family == "gemma3" and gem.sliding_window == 512 and gem.head_dim == 256
    assert gem.layer_types[:6] == ("sliding",) * 5 + ("full",) and gem.rope_local.theta == 10000.0
    assert gem.rope.theta == 1e6 and gem.embed_scale == pytest.approx(640**0.5)


# ---- the reader ------------------------------------------------------------------------------------


def _write_every_value_type(path, alignment=None):
    """A GGUF file holding one key of every value type, arrays of each (strings included), two tensors."""
    import gguf as gg

    V = gg.GGUFValueType
    writer = gg.GGUFWriter(str(path), "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    scalars = {V.UINT8: 250, V.INT8: -5, V.UINT16: 65000, V.INT16: -300, V.UINT32: 4_000_000_000, V.INT32: -7,
               V.FLOAT32: 0.1, V.BOOL: True, V.UINT64: 2**63 + 5, V.INT64: -(2**40), V.FLOAT64: 1e-300}  # fmt: skip
    for kind, value in scalars.items():
        writer.add_key_value(f"test.{kind.name.lower()}", value, kind)
        writer.add_key_value(f"test.array_{kind.name.lower()}", [value, value], V.ARRAY, sub_type=kind)
    writer.add_string("test.string", "héllo 🤖")
    writer.add_array("test.strings", ["", "a", "ü" * 300, "<|im_start|>", " \n\t"])
    writer.add_key_value("test.nested", [[1, 2, 3], [4]], V.ARRAY)
    writer.add_tensor("a.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("b.weight", np.arange(6, dtype=np.float16).reshape(2, 3))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()


@pytest.mark.parametrize("alignment", [None, 64])
def test_reader_reads_every_value_type_as_gguf_does(tmp_path, alignment):
    import gguf as gg

    path = tmp_path / "values.gguf"
    _write_every_value_type(path, alignment)
    header, reference = gguf._open(path), gg.GGUFReader(str(path))
    assert header.alignment == (alignment or 32) and header.data_offset == reference.data_offset
    for key, field in reference.fields.items():
        if key.startswith("GGUF.") or key == "test.nested":  # the reader's own fields; nested arrays below
            continue
        value = header.metadata[key]
        value = value.tolist() if isinstance(value, np.ndarray) else value
        assert value == field.contents() and type(value) is type(field.contents()), key
    assert [a.tolist() for a in header.metadata["test.nested"]] == [[1, 2, 3], [4]]
    assert set(header.metadata) == {k for k in reference.fields if not k.startswith("GGUF.")}
    for ours, theirs in zip(header.tensors, reference.tensors, strict=True):
        assert (ours.name, ours.tensor_type, ours.shape) == (theirs.name, theirs.tensor_type, tuple(theirs.shape))
        np.testing.assert_array_equal(ours.data, theirs.data)
        assert ours.data.dtype == theirs.data.dtype


def test_header_is_parsed_once_per_file_version(tmp_path):
    path = tmp_path / "values.gguf"
    _write_every_value_type(path)
    first = gguf._open(path)
    assert gguf._open(path) is first and gguf.read_metadata(path) is first.metadata
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # the file changed: parse it again
    assert gguf._open(path) is not first


def _damage(data: bytes, how: str) -> bytes:
    if how == "empty":
        return b""
    if how == "magic":
        return b"GGML" + data[4:]
    if how == "version":
        return data[:4] + (7).to_bytes(4, "little") + data[8:]
    if how == "big_endian":
        return data[:4] + (3).to_bytes(4, "big") + data[8:]
    if how == "counts":
        return data[:8] + (2**60).to_bytes(8, "little") + data[16:]
    if how == "string_length":  # the first key's length points far past the end
        return data[:24] + (2**40).to_bytes(8, "little") + data[32:]
    if how == "header_cut":
        return data[:600]  # past the counts check, inside the key/values
    if how == "data_cut":
        return data[:-33]  # into the last tensor: the padding after it is under 32 bytes
    raise ValueError(how)


@pytest.mark.parametrize("how", ["empty", "magic", "version", "big_endian", "counts", "string_length", "header_cut",
                                 "data_cut"])  # fmt: skip
def test_damaged_gguf_files_raise_checkpoint_error_naming_the_file(tmp_path, how):
    good = tmp_path / "good.gguf"
    _write_every_value_type(good)
    bad = tmp_path / f"bad-{how}.gguf"
    bad.write_bytes(_damage(good.read_bytes(), how))
    with pytest.raises(CheckpointError, match=f"{bad}: not a readable GGUF file"):
        gguf._open(bad)
    with pytest.raises(CheckpointError, match=str(bad)):
        loader.read_config(loader.resolve(str(bad)))


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["smollm2_path", "gemma3_path"])
def test_real_gguf_tensors_equal_gguf_readers(fixture, request, monkeypatch):
    """Every tensor's memmap view holds gguf.GGUFReader's bytes in its layout, and the smallest
    tensor of each type, dequantized by our reader (in slices of rows), equals gguf's dequantization
    of the whole tensor, exactly."""
    import time

    import gguf as gg
    from gguf.quants import dequantize

    path = request.getfixturevalue(fixture)
    gguf._cached_header.cache_clear()
    started = time.perf_counter()
    header = gguf._open(path)
    print(f"\n{path.name}: header parsed in {time.perf_counter() - started:.3f} s")
    reference = gg.GGUFReader(str(path))
    assert [t.name for t in header.tensors] == [t.name for t in reference.tensors]
    smallest = {}  # type -> (its smallest tensor, a 2-D one where the type has one: rows to slice)
    for ours, theirs in zip(header.tensors, reference.tensors):
        assert ours.tensor_type == theirs.tensor_type and ours.shape == tuple(theirs.shape.tolist())
        view = ours.data
        assert view.dtype == theirs.data.dtype and view.shape == theirs.data.shape, ours.name
        np.testing.assert_array_equal(view, theirs.data)
        size = (len(ours.shape) < 2, ours.nbytes)
        if ours.tensor_type not in smallest or size < smallest[ours.tensor_type][0]:
            smallest[ours.tensor_type] = (size, ours, theirs)
    monkeypatch.setattr(gguf, "_DEQUANTIZE_ELEMENTS", 1 << 14)  # several slices a tensor
    for _, ours, theirs in smallest.values():
        expected = np.asarray(dequantize(theirs.data, theirs.tensor_type), np.float32)
        np.testing.assert_array_equal(gguf._dequantize(ours), expected.reshape(tuple(reversed(ours.shape))))
    assert len(smallest) >= 3  # F32 and the file's block types
    for key, field in reference.fields.items():
        if not key.startswith("GGUF."):
            value = header.metadata[key]
            assert (value.tolist() if isinstance(value, np.ndarray) else value) == field.contents(), key
