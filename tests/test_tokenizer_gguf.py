"""GGUF tokenizers built without torch: the same as transformers' own GGUF tokenizer, cached per file."""

import json
import os

import pytest

from jaxllm import tokenizer
from jaxllm.checkpoints import gguf
from tests import tiny

TEXTS = [
    "",
    " ",
    "Hello world",
    "Hello, world! How are you today?",
    "  two leading spaces",
    "trailing spaces   ",
    "tabs\tand\ttabs",
    "line one\nline two\n\nline four",
    "\n\n\n",
    "    \t  \n   ",
    "1234567890",
    "3.14159 2.71828 -42 1e-10 0x1F",
    "The year 2024 had 366 days.",
    "naïve café résumé",
    "Größe Straße Ärger",
    "日本語のテキストです。",
    "中文文本，标点符号！",
    "emoji 🤖🚀 and ZWJ 👩‍👩‍👧",
    "Ελληνικά и русский",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "<bos><eos><pad><unk>",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "text<|im_end|>more",
    "a" * 200,
    "!!!???...,,,;;;",
    "https://example.com/path?query=1&b=2#frag",
    "mixed CASE and snake_case and camelCase",
    "don't won't it's we're they've I'd",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}],  # fmt: skip
]


def assert_same_tokenizer(ours, reference):
    """Same class, special tokens, ids, decodes and chat template output."""
    assert type(ours) is type(reference)
    assert ours.backend_tokenizer.to_str() == reference.backend_tokenizer.to_str()
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "add_bos_token", "add_eos_token",
                 "padding_side", "chat_template", "all_special_tokens"):  # fmt: skip
        assert getattr(ours, attr) == getattr(reference, attr), attr
    for text in TEXTS:
        ids = reference.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == reference.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True), text
    if reference.chat_template is not None:
        for chat in CHATS:
            expected = reference.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            assert ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == expected


def test_tokenizer_classes_are_autotokenizers_choice():
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    for model_type, class_name in tokenizer._TOKENIZER_CLASSES.items():
        assert (TOKENIZER_MAPPING_NAMES.get(model_type) or "TokenizersBackend") == class_name, model_type
    assert {model_type for model_type, _ in gguf.GGUF_ARCHITECTURES.values()} | {"mistral"} == set(
        tokenizer._TOKENIZER_CLASSES
    )


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["smollm2_path", "gemma3_path"])
def test_gguf_tokenizer_equals_transformers(fixture, request, tmp_path, monkeypatch):
    """Built cold and loaded from the cache, the tokenizer is transformers' from_pretrained(gguf_file=...)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import get_gguf_tokenizer

    path = request.getfixturevalue(fixture)
    assert tokenizer.gguf_tokenizer_inputs(gguf.read_metadata(path)) == get_gguf_tokenizer(str(path))
    # AutoTokenizer.from_pretrained(gguf_file=...) alone (its conversion kept in the user cache after the first).
    reference = tiny.hf_tokenizer_from_gguf(path)
    monkeypatch.setenv("JAXLLM_CACHE", str(tmp_path))
    cold = tokenizer.gguf_tokenizer(path)
    assert (tokenizer.tokenizer_cache_dir(path) / "tokenizer.json").is_file()
    cached = tokenizer.gguf_tokenizer(path)
    for ours in (cold, cached):
        assert_same_tokenizer(ours, reference)


def test_second_load_comes_from_the_cache_and_a_damaged_entry_is_rebuilt(smollm2_path, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_CACHE", str(tmp_path))
    builds = []
    build = tokenizer._gguf_tokenizer_parts
    monkeypatch.setattr(tokenizer, "_gguf_tokenizer_parts", lambda path: builds.append(path) or build(path))
    cold = tokenizer.gguf_tokenizer(smollm2_path)
    entry = tokenizer.tokenizer_cache_dir(smollm2_path)
    assert builds == [smollm2_path] and entry.parent == tmp_path / "tokenizers"
    assert {p.name for p in entry.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", tokenizer._BUILD_FILE}
    cached = tokenizer.gguf_tokenizer(smollm2_path)
    assert builds == [smollm2_path]  # not built again
    assert_same_tokenizer(cached, cold)
    assert cached.eos_token_id == 2 and cached.encode("Hello world") == [19556, 905]

    (entry / "tokenizer.json").write_text('{"truncated": ')
    rebuilt = tokenizer.gguf_tokenizer(smollm2_path)
    assert len(builds) == 2
    assert_same_tokenizer(rebuilt, cold)
    assert_same_tokenizer(tokenizer.gguf_tokenizer(smollm2_path), cold) and len(builds) == 2  # the new entry works
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no staging directories left


def test_a_concurrent_writers_entry_is_kept(smollm2_path, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_CACHE", str(tmp_path))
    first = tokenizer.gguf_tokenizer(smollm2_path)
    entry = tokenizer.tokenizer_cache_dir(smollm2_path)
    before = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
    class_name, _, kwargs = tokenizer._gguf_tokenizer_parts(smollm2_path)
    tokenizer._save_cached(first, class_name, kwargs, entry, smollm2_path)  # the second writer loses the rename
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == before
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]


def test_cache_key_follows_the_file_and_transformers(tmp_path, monkeypatch):
    import transformers

    monkeypatch.setenv("JAXLLM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    key = tokenizer.tokenizer_cache_dir(path)
    assert key.parent == tmp_path / "cache" / "tokenizers" and tokenizer.tokenizer_cache_dir(path) == key
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert tokenizer.tokenizer_cache_dir(path) != key
    moved = tokenizer.tokenizer_cache_dir(path)
    monkeypatch.setattr(transformers, "__version__", "0.0.1")
    assert tokenizer.tokenizer_cache_dir(path) != moved


def test_missing_converter_names_the_transformers_version_needed(monkeypatch):
    """Older transformers releases have no transformers.integrations.gguf.gguf_tokenizer_mapping."""
    monkeypatch.setattr(tokenizer, "_CONVERTER_MODULE", "transformers.integrations.gguf.not_in_this_release")
    with pytest.raises(ImportError, match=r"needs transformers>=5\.23 .*installed: transformers \d"):
        tokenizer._converter()


def test_build_file_records_the_constructor_arguments(smollm2_path, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_CACHE", str(tmp_path))
    tokenizer.gguf_tokenizer(smollm2_path)
    build = json.loads((tokenizer.tokenizer_cache_dir(smollm2_path) / tokenizer._BUILD_FILE).read_text())
    assert build["tokenizer_class"] == "TokenizersBackend" and build["format"] == tokenizer.TOKENIZER_CACHE_FORMAT
    assert build["kwargs"]["add_bos_token"] is False and build["kwargs"]["eos_token"] == "<|im_end|>"
    assert build["kwargs"]["chat_template"].startswith("{% for message in messages %}")
