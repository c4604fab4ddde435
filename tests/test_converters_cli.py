"""Converters (GGUF -> HF -> jaxllm round trip) and the `jaxllm` command."""

import io
import os
import subprocess
import sys

from converters import gguf_to_hf, hf_to_jaxllm
from jaxllm import LLM, SamplingParams
from jaxllm.cli import main

PROMPTS = ["The capital of France is", "Water boils at"]


def test_gguf_to_hf_to_jaxllm_gives_the_gguf_tokens(smollm2_path, smollm2_llm, tmp_path):
    params = SamplingParams(max_tokens=16)
    expected = [o.outputs[0].token_ids for o in smollm2_llm.generate(PROMPTS, params, use_tqdm=False)]
    hf_dir, jax_dir = tmp_path / "hf", tmp_path / "jaxllm"
    assert gguf_to_hf.main([str(smollm2_path), str(hf_dir)]) == 0
    assert (hf_dir / "config.json").is_file() and (hf_dir / "model.safetensors").is_file()
    assert hf_to_jaxllm.main([str(hf_dir), str(jax_dir), "--dtype", "float32"]) == 0
    for source in (hf_dir, jax_dir):  # smollm2_llm's engine settings: its programs, from the program cache
        with LLM(model=str(source), dtype="float32", max_batch_size=16, max_num_tokens=512, max_beam_width=4) as llm:
            got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
            assert got == expected, source
            assert llm.tokenizer.chat_template  # the chat template travelled with the tokenizer


def test_converter_fails_loudly(tmp_path, capsys):
    assert gguf_to_hf.main([str(tmp_path / "missing.gguf"), str(tmp_path / "out")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_cli_generate_streams_and_batches(smollm2_path, tmp_path, capsys):
    assert main(["generate", "What is the capital of France?", "--model", str(smollm2_path),
                 "--max-tokens", "12"]) == 0  # fmt: skip
    assert "Paris" in capsys.readouterr().out
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name a color.\nName a fruit.\n")
    assert main(["generate", "--input-file", str(prompts), "--model", str(smollm2_path), "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "### Name a color." in out and "### Name a fruit." in out


class ClosedPipe(io.TextIOBase):
    """A stdout whose reader went away (`jaxllm generate ... | head`): every write raises EPIPE."""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self):
        return self.fd


def test_cli_stops_quietly_when_stdouts_reader_goes_away(smollm2_path, tmp_path, capsys, monkeypatch):
    # a process writing into a pipe whose read end is closed: the status of a tool stopped by SIGPIPE,
    # no traceback, nothing "ignored" at the interpreter's exit
    read_end, write_end = os.pipe()
    os.close(read_end)
    result = subprocess.run([sys.executable, "-m", "jaxllm.cli", "models"], stdout=write_end, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    os.close(write_end)
    assert result.returncode == 141 and result.stderr == "", result.stderr
    # a streamed generation (test_cli_generate_streams_and_batches's engine: its programs from the program cache)
    with open(tmp_path / "stdout", "w") as f:
        monkeypatch.setattr(sys, "stdout", ClosedPipe(f.fileno()))
        code = main(["generate", "What is the capital of France?", "--model", str(smollm2_path), "--max-tokens", "12"])
    assert code == 141 and "Traceback" not in capsys.readouterr().err


def test_cli_errors_are_clear(capsys, tmp_path):
    assert main(["generate", "hi", "--model", "./no-such-model"]) == 2
    assert "not a local path" in capsys.readouterr().err
    assert main(["generate"]) == 2
    assert "jaxllm: error: generate needs a PROMPT or --input-file" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n")
    assert main(["generate", "--input-file", str(tmp_path / "empty.txt")]) == 2
    assert "holds no prompts" in capsys.readouterr().err
    result = subprocess.run([sys.executable, "-m", "jaxllm.cli", "models"], capture_output=True, text=True)
    assert result.returncode == 0 and "smollm2-135m-instruct (default)" in result.stdout
