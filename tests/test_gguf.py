"""GGUF loading: metadata to config, every tensor type, llama.cpp's layout changes undone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.checkpoints import gguf, loader
from jaxllm.checkpoints.names import CheckpointError
from jaxllm.models.params import flatten_paths, unflatten_paths
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
