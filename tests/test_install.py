"""What a plain `pip install jaxllm` (no torch) needs: no module imports torch, nor does a GGUF tokenizer.

torch is installed here (the parity tests' reference), so each check runs in a fresh interpreter and
looks at sys.modules. transformers imports torch wherever it is installed once some of its modules
load (its config classes do), so "torch was not imported" is the stronger check: the code path needs
neither torch nor the parts of transformers that reach for it.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, env: dict | None = None) -> dict:
    """Run `code` in a fresh interpreter from the repository root (so this checkout's jaxllm is imported);
    it prints one JSON line last."""
    import os

    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_module_imports_without_torch():
    out = _run("""
        import importlib, json, pkgutil, sys
        import jaxllm
        names = sorted(m.name for m in pkgutil.walk_packages(jaxllm.__path__, "jaxllm."))
        for name in names:
            importlib.import_module(name)
        print(json.dumps({"file": jaxllm.__file__, "names": names, "torch": "torch" in sys.modules}))
    """)
    assert out["file"] == str(ROOT / "jaxllm" / "__init__.py")
    assert "jaxllm.tokenizer" in out["names"] and "jaxllm.checkpoints.gguf" in out["names"]
    assert not out["torch"]


def test_gguf_tokenizer_builds_and_loads_from_cache_without_torch(smollm2_path, tmp_path):
    """Cold (an empty cache) and then from the cache in a second process; neither imports torch."""
    code = """
        import json, sys, time
        started = time.perf_counter()
        from jaxllm import tokenizer
        if {from_cache}:
            tokenizer._gguf_tokenizer_parts = None  # calling it would fail: the cache must serve
        tok = tokenizer.gguf_tokenizer({path!r})
        seconds = time.perf_counter() - started
        chat = tok.apply_chat_template([{{"role": "user", "content": "Hi"}}], add_generation_prompt=True,
                                       tokenize=False)
        print(json.dumps({{"ids": tok.encode("Hello world <|im_start|>"), "chat": chat, "eos": tok.eos_token_id,
                          "seconds": seconds, "torch": "torch" in sys.modules,
                          "gguf_reader": "transformers.integrations.gguf.reader" in sys.modules}}))
    """
    env = {"JAXLLM_CACHE": str(tmp_path)}
    cold = _run(code.format(path=str(smollm2_path), from_cache=False), env)
    assert list((tmp_path / "tokenizers").iterdir())
    warm = _run(code.format(path=str(smollm2_path), from_cache=True), env)
    print(f"\nSmolLM2 tokenizer, import + build: cold {cold['seconds']:.2f} s, from the cache {warm['seconds']:.2f} s")
    for out in (cold, warm):
        assert not out["torch"] and not out["gguf_reader"]
        assert out["ids"] == [19556, 905, 216, 1] and out["eos"] == 2
        assert out["chat"].endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
