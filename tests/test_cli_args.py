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
