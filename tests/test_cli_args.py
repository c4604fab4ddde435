"""The engine flags shared by `jaxllm serve`, `bench` and `batch` (jaxllm/cli_args.py): validated by
argparse, and turned into LLM()'s arguments with the YAML file under the flags."""

import pytest

from jaxllm import cli


def _parse(argv):
    parser = cli.build_parser()
    return parser.parse_args(argv)


@pytest.mark.parametrize("command", [["serve"], ["bench", "throughput"], ["bench", "latency"]])
def test_every_engine_command_takes_the_same_validated_flags(command, capsys):
    args = _parse(command + ["m", "--tp", "2", "--max-batch-size", "4", "--dtype", "float32",
                             "--kv-cache-free-gpu-memory-fraction", "0.5", "--disable-overlap-scheduler"])  # fmt: skip
    kwargs = cli.llm_kwargs(args)
    assert kwargs["model"] == "m" and kwargs["tensor_parallel_size"] == 2 and kwargs["max_batch_size"] == 4
    assert kwargs["dtype"] == "float32" and kwargs["disable_overlap_scheduler"] is True
    assert kwargs["kv_cache_config"] == {"free_gpu_memory_fraction": 0.5}
    for bad, allowed in ((["--max-batch-size", "0"], "a positive integer"), (["--dtype", "fp64"], "invalid choice"),
                         (["--kv-cache-free-gpu-memory-fraction", "1.5"], "a fraction in (0, 1)")):  # fmt: skip
        with pytest.raises(SystemExit):
            _parse(command + ["m"] + bad)
        assert allowed in capsys.readouterr().err


def test_extra_llm_api_options_fill_in_under_the_flags(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("max_batch_size: 8\nmax_num_tokens: 256\ndtype: bfloat16\n"
                     "kv_cache_config:\n  enable_block_reuse: false\n")  # fmt: skip
    args = _parse(["serve", "m", "--extra-llm-api-options", str(extra), "--max-batch-size", "2",
                   "--kv-cache-free-gpu-memory-fraction", "0.3"])  # fmt: skip
    kwargs = cli.llm_kwargs(args, max_batch_size=64, max_num_tokens=128)
    assert kwargs["max_batch_size"] == 2  # the flag wins over the file and the command's default
    assert kwargs["max_num_tokens"] == 256  # the file wins over the command's default
    assert kwargs["dtype"] == "bfloat16"  # --dtype auto (not given) leaves the file's
    assert kwargs["kv_cache_config"] == {"enable_block_reuse": False, "free_gpu_memory_fraction": 0.3}
    extra.write_text("- not a mapping\n")
    with pytest.raises(ValueError, match="expected a mapping of LLM"):
        cli.llm_kwargs(args)


def test_speculative_config_from_the_flag_or_the_yaml_file(tmp_path, capsys):
    from jaxllm import NGramDecodingConfig
    from jaxllm.speculative import as_speculative_config

    args = _parse(["serve", "m", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3, '
                                                         '"prompt_lookup_max": 4}'])  # fmt: skip
    config = as_speculative_config(cli.llm_kwargs(args)["speculative_config"])
    assert config == NGramDecodingConfig(max_draft_len=3, max_matching_ngram_size=4, is_public_pool=False)
    extra = tmp_path / "extra.yaml"  # TensorRT-LLM's way
    extra.write_text("speculative_config:\n  decoding_type: NGram\n  max_draft_len: 2\n")
    args = _parse(["bench", "throughput", "m", "--extra-llm-api-options", str(extra)])
    assert as_speculative_config(cli.llm_kwargs(args)["speculative_config"]) == NGramDecodingConfig(max_draft_len=2)
    with pytest.raises(SystemExit):
        _parse(["serve", "m", "--speculative-config", "ngram"])
    assert "expected a JSON object, got 'ngram'" in capsys.readouterr().err
    for bad, match in (({"method": "eagle"}, "method='eagle' is invalid; allowed: 'ngram'"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 2},
                        r"prompt_lookup_min=2 is invalid; allowed: None, 1"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "model not supported")):
        with pytest.raises(ValueError, match=match):
            as_speculative_config(bad)


def test_quantization_and_kv_cache_dtype_flags_win_over_the_yaml_file(tmp_path, capsys):
    from jaxllm.llm_args import EngineArgs

    extra = tmp_path / "extra.yaml"  # TensorRT-LLM's way: quant_config and kv_cache_config in the file
    extra.write_text("quant_config:\n  kv_cache_quant_algo: FP8\nkv_cache_config:\n  dtype: bfloat16\n")
    args = _parse(["serve", "m", "--extra-llm-api-options", str(extra), "--quantization", "fp8",
                   "--kv-cache-dtype", "fp8"])  # fmt: skip
    kwargs = cli.llm_kwargs(args)
    assert kwargs["quant_config"] == {"kv_cache_quant_algo": "FP8", "quant_algo": "FP8"}
    assert kwargs["kv_cache_config"] == {"dtype": "fp8"}
    engine = EngineArgs(**{k: v for k, v in kwargs.items() if k not in ("model", "dtype")})
    assert engine.quant_config.weight_format == "FP8_PER_CHANNEL_PER_TOKEN" and engine.kv_cache_config.dtype == "fp8"
    assert cli.llm_kwargs(_parse(["serve", "m", "--quantization", "w8a16"]))["quant_config"] == {"quant_algo": "W8A16"}
    # calibration (CalibConfig): the flags over the file's calib_config
    extra.write_text("calib_config:\n  calib_batches: 8\n  calib_batch_size: 2\n")
    kwargs = cli.llm_kwargs(_parse(["serve", "m", "--extra-llm-api-options", str(extra), "--quantization", "fp8",
                                    "--calib-dataset", "texts.jsonl", "--calib-batches", "4"]))  # fmt: skip
    assert kwargs["calib_config"] == {"calib_batches": 4, "calib_batch_size": 2, "calib_dataset": "texts.jsonl"}
    engine = EngineArgs(**{k: v for k, v in kwargs.items() if k not in ("model", "dtype")})
    assert engine.calib_config.calib_dataset == "texts.jsonl" and engine.calib_config.num_samples == 8
    for bad in (["--quantization", "awq"], ["--kv-cache-dtype", "nvfp4"]):
        with pytest.raises(SystemExit):
            _parse(["serve", "m"] + bad)
        assert "invalid choice" in capsys.readouterr().err


def test_quantization_gguf_serves_the_files_numbers(tmp_path, tiny_dir):
    """--quantization gguf, read from the file: a file of 4-bit blocks is W4A16 in asymmetric groups
    of 32 (projections stored otherwise excluded, left float); one of 5- to 8-bit blocks is int8
    groups (W8A16_GPTQ) of its blocks' size, with offsets only where they need them, nothing
    excluded; refused for other checkpoints."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests import tiny

    model = AutoModelForCausalLM.from_config(tiny.gguf_config("llama"), dtype=torch.float32).eval()
    expected = {"Q4_K": ("W4A16", 32, True), "Q8_0": ("W8A16_GPTQ", 32, False), "Q6_K": ("W8A16_GPTQ", 16, False),
                "Q5_K": ("W8A16_GPTQ", 32, True), "F16": ("W4A16", 32, True)}  # fmt: skip
    for kind, (algo, group, zero_point) in expected.items():
        path = tmp_path / f"m-{kind}.gguf"
        tiny.write_gguf("llama", model, path, kind)
        quant = cli.llm_kwargs(_parse(["serve", str(path), "--quantization", "gguf"]))["quant_config"]
        assert (quant["quant_algo"], quant["group_size"], quant["has_zero_point"]) == (algo, group, zero_point), kind
        excluded = quant["exclude_modules"]
        assert excluded is None if kind != "F16" else len(excluded) == 14, kind  # 2 layers x 7 projections
    assert "model.layers.1.mlp.down_proj" in excluded
    with pytest.raises(ValueError, match="--quantization gguf serves a .gguf file's quantized blocks; .* is a hf checkpoint"):
        cli.llm_kwargs(_parse(["serve", str(tiny_dir("llama")), "--quantization", "gguf"]))
