"""jaxllm: TensorRT-LLM's LLM API on JAX/XLA, with Pallas paged attention on NVIDIA GPUs.

    from jaxllm import LLM, SamplingParams
    llm = LLM(model="smollm2")
    print(llm.generate("What is machine learning?", SamplingParams(max_tokens=64)).outputs[0].text)
"""

import os as _os

# transformers serves jaxllm's tokenizers and configs only; without torch (jaxllm never needs it) it
# would print that "models won't be available" at its import.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# JAX's GPU allocator takes 75% of the device unless told otherwise, and the paged KV cache is sized
# from what it holds (engine/kv_planner.py): on an 80 GB card that would leave a quarter of the memory
# to nobody. Like TensorRT-LLM's free_gpu_memory_fraction (applied to the whole card), jaxllm lets the
# allocator take 92% unless the user set it (the rest: the CUDA context, cuBLAS and cuDNN workspaces).
# It acts only if no JAX backend has started yet in this process.
_os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

from jaxllm import distributed as _distributed  # noqa: E402

# Under `python -m jaxllm.launch` (or SLURM with JAXLLM_SLURM=1) join the distributed runtime now,
# before anything starts a JAX backend.
_distributed.initialize_from_env()

from jaxllm.llm import LLM  # noqa: E402
from jaxllm.llm_args import CacheTransceiverConfig, KvCacheConfig, KvCacheRetentionConfig  # noqa: E402
from jaxllm.trtllm_args import (BuildConfig, CapacitySchedulerPolicy, ContextChunkingPolicy, CudaGraphConfig,  # noqa: E402
                                MoeConfig, PeftCacheConfig, SchedulerConfig, TorchCompileConfig,
                                WaitingQueuePolicy)  # fmt: skip
from jaxllm.adapters import LoraConfig, LoRARequest, PromptAdapterRequest  # noqa: E402
from jaxllm.disaggregated_params import DisaggregatedParams  # noqa: E402
from jaxllm.scheduling_params import SchedulingParams  # noqa: E402
from jaxllm.inputs import PreprocessedInputs  # noqa: E402
from jaxllm.outputs import CompletionOutput, Logprob, RequestError, RequestOutput  # noqa: E402
from jaxllm.sampling_params import GuidedDecodingParams, SamplingParams  # noqa: E402
from jaxllm.speculative import DraftTargetDecodingConfig, NGramDecodingConfig  # noqa: E402
from jaxllm.quantization import QuantAlgo, QuantConfig  # noqa: E402
from jaxllm.calibration import CalibConfig  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "SamplingParams",
    "GuidedDecodingParams",
    "KvCacheConfig",
    "KvCacheRetentionConfig",
    "LoRARequest",
    "LoraConfig",
    "PromptAdapterRequest",
    "DisaggregatedParams",
    "CacheTransceiverConfig",
    "SchedulingParams",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "PreprocessedInputs",
    "RequestError",
    "CudaGraphConfig",
    "SchedulerConfig",
    "CapacitySchedulerPolicy",
    "ContextChunkingPolicy",
    "WaitingQueuePolicy",
    "MoeConfig",
    "TorchCompileConfig",
    "PeftCacheConfig",
    "BuildConfig",
    "QuantConfig",
    "QuantAlgo",
    "CalibConfig",
    "NGramDecodingConfig",
    "DraftTargetDecodingConfig",
]
