"""jaxllm: TensorRT-LLM's LLM API on JAX/XLA, with Pallas paged attention on NVIDIA GPUs.

    from jaxllm import LLM, SamplingParams
    llm = LLM(model="smollm2")
    print(llm.generate("What is machine learning?", SamplingParams(max_tokens=64)).outputs[0].text)
"""

from jaxllm.llm import LLM
from jaxllm.llm_args import KvCacheConfig
from jaxllm.inputs import PreprocessedInputs
from jaxllm.outputs import CompletionOutput, Logprob, RequestError, RequestOutput
from jaxllm.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "SamplingParams",
    "KvCacheConfig",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "PreprocessedInputs",
    "RequestError",
]
