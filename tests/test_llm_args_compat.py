"""TensorRT-LLM's LLM() arguments (TorchLlmArgs) on jaxllm: each name honoured, accepted with a log
line, or refused with what jaxllm offers; the config classes; a TensorRT-LLM call run unchanged;
stream_interval; the capacity policies; a prompt over max_num_tokens without chunked prefill."""

from __future__ import annotations

import gc
import logging

import pytest

import jaxllm
from jaxllm import (LLM, BuildConfig, CapacitySchedulerPolicy, CudaGraphConfig, KvCacheConfig, LoraConfig, MoeConfig,
                    PeftCacheConfig, SamplingParams, SchedulerConfig, TorchCompileConfig)  # fmt: skip
from jaxllm.engine.block_manager import BlockManager
from jaxllm.engine.buckets import (NO_COMMAND_BUFFER_OPTIONS, NO_TRITON_GEMM_OPTIONS, ONE_GRAPH_OPTIONS, Buckets,
                                   ForwardShape, compiler_options)  # fmt: skip
from jaxllm.engine.scheduler import Scheduler
from jaxllm.engine.scheduler import SchedulerConfig as EngineSchedulerConfig
from jaxllm.engine.sequence import Request, Sequence
from jaxllm.llm_args import EngineArgs
from jaxllm.trtllm_args import attention_backend

# Every TorchLlmArgs name that reaches LLM(**kwargs) (TensorRT-LLM's tensorrt_llm/llmapi/llm_args.py,
# BaseLlmArgs + TorchLlmArgs, 1.x and main), with TensorRT-LLM's default value. LLM()'s own
# parameters (model, tokenizer, dtype, backend, ...) are not kwargs.
TRTLLM_DEFAULTS = {
    "custom_tokenizer": None, "post_processor_hook": None, "model_kwargs": None, "pipeline_parallel_size": 1,
    "context_parallel_size": 1, "gpus_per_node": None, "moe_cluster_parallel_size": None,
    "moe_tensor_parallel_size": None, "moe_expert_parallel_size": None, "enable_attention_dp": False,
    "enable_lm_head_tp_in_adp": False, "pp_partition": None, "cp_config": None, "load_format": "auto",
    "enable_lora": False, "lora_config": None, "kv_cache_config": KvCacheConfig(), "enable_chunked_prefill": False,
    "guided_decoding_backend": None, "iter_stats_max_iterations": None, "peft_cache_config": None,
    "scheduler_config": SchedulerConfig(), "cache_transceiver_config": None, "sparse_attention_config": None,
    "kv_cache_compression_config": None, "speculative_config": None, "max_batch_size": 2048, "max_input_len": 1024,
    "max_seq_len": None, "max_beam_width": 1, "max_num_tokens": 8192, "gather_generation_logits": False,
    "num_postprocess_workers": 0, "postprocess_tokenizer_dir": None, "num_serve_frontends": 1,
    "reasoning_parser": None, "decoding_config": None, "mpi_session": None, "otlp_traces_endpoint": None,
    "return_perf_metrics": False, "perf_metrics_output_dir": None, "perf_metrics_max_requests": 0,
    "prometheus_metrics_config": None, "enable_energy_metrics": False, "orchestrator_type": None,
    "env_overrides": None, "telemetry_config": None, "generation_config": "trtllm",
    "garbage_collection_gen0_threshold": 20000, "cuda_graph_config": CudaGraphConfig(),
    "encoder_cuda_graph_config": None, "enable_encoder_decoder_mixed_cuda_graph": True, "multimodal_config": None,
    "attention_dp_config": None, "disable_overlap_scheduler": False, "moe_config": MoeConfig(),
    "nvfp4_gemm_config": None, "dwdp_config": None, "encoder_max_batch_size": None, "encoder_max_num_tokens": None,
    "attn_backend": "TRTLLM", "enable_mla_skip_correction": False, "mla_skip_correction_threshold": 8.0,
    "sampler_force_async_worker": False, "enable_in_graph_sampling": False,
    "enable_speculative_beam_history_d2h": False, "enable_early_first_token_response": False,
    "enable_low_latency_host_dispatch": False, "enable_iter_perf_stats": False, "print_iter_log": False,
    "batch_wait_timeout_ms": 0, "batch_wait_timeout_iters": 0, "batch_wait_max_tokens_ratio": 0,
    "torch_compile_config": None, "prefill_cuda_graph_backend": "disabled", "prefill_capture_num_tokens": None,
    "enable_autotuner": True, "use_fine_grained_sync": False, "enable_layerwise_nvtx_marker": False,
    "enable_min_latency": False, "stream_interval": 1, "force_dynamic_quantization": False,
    "allreduce_strategy": "AUTO", "checkpoint_loader": None, "checkpoint_format": None, "checkpoint_io_policy": "auto",
    "mx_config": None, "gms_config": None, "kv_connector_config": None, "mm_encoder_only": False,
    "disable_mm_encoder": False, "encode_only": False, "ray_worker_extension_cls": None, "ray_placement_config": None,
    "ray_worker_nsight_options": None, "sleep_config": None, "reorder_policy_config": None,
    "enable_resource_governor": False, "use_cute_dsl_blockscaling_mm": False, "use_cute_dsl_blockscaling_bmm": False,
    "use_cute_dsl_bf16_bmm": False, "use_cute_dsl_bf16_gemm": False, "max_stats_len": 1000,
    "layer_wise_benchmarks_config": None,
    # older releases' names
    "build_config": None, "kv_cache_dtype": "auto", "normalize_log_probs": False, "sampler_type": "auto",
    "enable_prompt_adapter": False, "max_prompt_adapter_token": 0, "batching_type": None,
    # vLLM's engine names
    "max_model_len": None, "disable_log_stats": False,
}  # fmt: skip


def _args(**kwargs) -> EngineArgs:
    kwargs.pop("attn_backend", None)  # LLM() folds it into backend (attention_backend below)
    return EngineArgs.from_kwargs(kwargs)


def test_every_torch_llm_args_name_is_accepted_at_its_default():
    _args(**TRTLLM_DEFAULTS)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(context_parallel_size=2), ValueError, r"context_parallel_size=2 .*allowed: 1 .*tensor_parallel_size"),
    (dict(enable_attention_dp=True), ValueError, r"enable_attention_dp=True .*allowed: False .*tensor_parallel_size"),
    (dict(moe_tensor_parallel_size=4), ValueError, "moe_tensor_parallel_size=4"),
    (dict(speculative_config={"decoding_type": "Eagle"}), ValueError,
     r"speculative_config decoding_type='Eagle' is invalid; allowed: 'NGram'"),
    (dict(guided_decoding_backend="outlines"), ValueError, r"guided_decoding_backend='outlines' is not supported; allowed: 'xgrammar', 'llguidance'"),
    (dict(checkpoint_format="mistral"), ValueError, r"checkpoint_format='mistral' .*allowed: None, 'HF'"),
    (dict(checkpoint_loader=object()), ValueError, "checkpoint_loader="),
    (dict(kv_cache_dtype="nvfp4"), ValueError, r"kv_cache_dtype='nvfp4' is not supported; allowed: 'auto', 'float32'"),
    (dict(kv_cache_dtype="float16", kv_cache_config=KvCacheConfig(dtype="bfloat16")), ValueError,
     "conflicts with kv_cache_config.dtype='bfloat16'"),
    (dict(max_model_len=100, max_seq_len=200), ValueError, "max_model_len=100 conflicts with max_seq_len=200"),
    (dict(max_loras=3, lora_config=LoraConfig(max_loras=2)), ValueError, "conflicts with lora_config.max_loras=2"),
    (dict(build_config=BuildConfig(max_batch_size=8), max_batch_size=16), ValueError,
     "build_config.max_batch_size=8 conflicts with max_batch_size=16"),
    (dict(normalize_log_probs=True), ValueError, "normalize_log_probs=True is not supported.*allowed: False"),
    (dict(stream_interval=0), ValueError, "stream_interval=0 is invalid; allowed: a positive int"),
    (dict(garbage_collection_gen0_threshold=-1), ValueError, "garbage_collection_gen0_threshold=-1"),
    (dict(scheduler_config={"context_chunking_policy": "FORCE_CHUNK"}), ValueError,
     r"context_chunking_policy='FORCE_CHUNK' is not supported.*'FIRST_COME_FIRST_SERVED', 'EQUAL_PROGRESS'"),
    (dict(scheduler_config={"capacity_scheduler_policy": "FASTEST"}), ValueError,
     "capacity_scheduler_policy='FASTEST' is invalid; allowed: 'MAX_UTILIZATION', 'GUARANTEED_NO_EVICT', 'STATIC_BATCH'"),
    (dict(enable_autotuner="yes"), TypeError, "enable_autotuner must be a bool"),
    (dict(cuda_graph_config=[1, 2]), TypeError, "cuda_graph_config must be a CudaGraphConfig"),
    (dict(max_logprobs=21), ValueError, r"max_logprobs=21 is invalid; allowed: an int in \[0, 20\]"),
    (dict(no_such_argument=1), TypeError, r"unknown argument\(s\) \['no_such_argument'\]"),
])  # fmt: skip
def test_refused_values_name_what_is_allowed(kwargs, error, message):
    with pytest.raises(error, match=message):
        _args(**kwargs)


def test_config_classes_validate_their_fields():
    assert jaxllm.CudaGraphConfig is CudaGraphConfig and jaxllm.SchedulerConfig is SchedulerConfig
    with pytest.raises(TypeError, match=r"unknown field\(s\) \['batch_size'\]; allowed: batch_sizes, max_batch_size"):
        CudaGraphConfig(batch_size=[1])
    with pytest.raises(TypeError, match="allowed: capacity_scheduler_policy, context_chunking_policy"):
        SchedulerConfig(policy="MAX_UTILIZATION")
    with pytest.raises(ValueError, match=r"max_batch_size=8 is invalid with batch_sizes=\[1, 2\]; allowed: 0 or"):
        CudaGraphConfig(batch_sizes=[2, 1], max_batch_size=8)
    with pytest.raises(ValueError, match="batch_sizes=.* allowed: a list of positive ints"):
        CudaGraphConfig(batch_sizes=[0, 4])
    with pytest.raises(ValueError, match="MoeConfig.backend='FAST' is invalid; allowed: 'AUTO', 'CUTLASS'"):
        MoeConfig(backend="FAST")
    with pytest.raises(ValueError, match="max_num_streams=0 is invalid"):
        TorchCompileConfig(max_num_streams=0)
    with pytest.raises(ValueError, match="device_cache_percent=2 is invalid"):
        PeftCacheConfig(device_cache_percent=2)
    with pytest.raises(TypeError, match="SchedulerConfig.decode_cap must be a bool, got 'yes'"):
        SchedulerConfig(decode_cap="yes")
    with pytest.raises(ValueError, match="dynamic_batch_config applies to TensorRT-LLM's TensorRT backend only"):
        SchedulerConfig(dynamic_batch_config={"enable_batch_size_tuning": True})
    assert CudaGraphConfig(batch_sizes=[4, 1, 2]).max_batch_size == 4 and CudaGraphConfig().max_batch_size == 128
    policy = SchedulerConfig(capacity_scheduler_policy="STATIC_BATCH").capacity_scheduler_policy
    assert policy is CapacitySchedulerPolicy.STATIC_BATCH


def test_names_are_mapped_onto_jaxllm_arguments():
    assert not _args(max_loras=2).enable_lora  # as in vLLM, the sizes apply with enable_lora=True
    args = _args(kv_cache_dtype="bfloat16", max_model_len=300, enable_lora=True, max_loras=2, max_lora_rank=8,
                 build_config=BuildConfig(max_num_tokens=128, strongly_typed=True), gather_generation_logits=True)  # fmt: skip
    assert args.kv_cache_config.dtype == "bfloat16" and args.max_seq_len == 300 and args.max_num_tokens == 128
    assert args.enable_lora and (args.lora_config.max_loras, args.lora_config.max_lora_rank) == (2, 8)
    kv = _args(kv_cache_dtype="float16", kv_cache_config=KvCacheConfig(max_tokens=512)).kv_cache_config
    assert (kv.dtype, kv.max_tokens) == ("float16", 512)
    assert _args(kv_cache_dtype="bf16", kv_cache_config={"dtype": "bfloat16"}).kv_cache_config.dtype == "bf16"
    # What the engine honours survives a saved engine's JSON round trip.
    saved = _args(scheduler_config=SchedulerConfig(capacity_scheduler_policy="GUARANTEED_NO_EVICT", decode_cap=False),
                  cuda_graph_config=CudaGraphConfig(batch_sizes=[1, 3]), stream_interval=4).to_dict()  # fmt: skip
    import json

    again = EngineArgs.from_kwargs(json.loads(json.dumps(saved)))
    assert again.scheduler_config.capacity_scheduler_policy is CapacitySchedulerPolicy.GUARANTEED_NO_EVICT
    assert again.scheduler_config.decode_cap is False
    assert again.cuda_graph_config.batch_sizes == [1, 3] and again.stream_interval == 4
    # attn_backend: TensorRT-LLM's names select jaxllm's attention backends.
    assert attention_backend(None, "TRTLLM") is None and attention_backend(None, "VANILLA") == "xla"
    assert attention_backend("pytorch", "FLASHINFER") == "pytorch" and attention_backend("xla", "VANILLA") == "xla"
    with pytest.raises(ValueError, match="attn_backend='FLASHMLA' is invalid; allowed: 'TRTLLM', 'FLASHINFER'"):
        attention_backend(None, "FLASHMLA")
    with pytest.raises(ValueError, match="conflicts with backend='pallas_interpret'"):
        attention_backend("pallas_interpret", "VANILLA")


def test_tuning_only_arguments_are_logged_once(caplog):
    caplog.set_level(logging.WARNING, logger="jaxllm")
    for _ in range(2):
        _args(allreduce_strategy="NCCL", torch_compile_config=TorchCompileConfig(enable_inductor=True))
    lines = [r.getMessage() for r in caplog.records]
    assert sum("allreduce_strategy='NCCL' is accepted and has no effect" in m for m in lines) == 1
    assert sum(m.startswith("torch_compile_config=") for m in lines) == 1
    _args(moe_config=MoeConfig(), enable_autotuner=True)  # TensorRT-LLM's defaults: nothing to say
    assert not any(m.startswith(("moe_config=", "enable_autotuner=")) for m in [r.getMessage() for r in caplog.records])


def test_cuda_graph_config_none_turns_command_buffers_off():
    assert _args().cuda_graph_config == CudaGraphConfig() and _args(cuda_graph_config=None).cuda_graph_config is None
    decode = ForwardShape(2, 2, 1024, 1, decode_steps=8, sampling="plain")
    assert compiler_options(decode, on_gpu=True, one_graph=True) == ONE_GRAPH_OPTIONS
    assert compiler_options(decode, on_gpu=True, one_graph=True, command_buffers=False) == NO_COMMAND_BUFFER_OPTIONS
    wide = ForwardShape(64, 64, 1024, 64)
    assert compiler_options(wide, on_gpu=True, one_graph=False, command_buffers=False) == {
        **NO_TRITON_GEMM_OPTIONS, **NO_COMMAND_BUFFER_OPTIONS}
    assert compiler_options(decode, on_gpu=False, one_graph=False, command_buffers=False) is None


def test_cuda_graph_batch_sizes_are_the_decode_buckets():
    pallas = Buckets(max_num_tokens=256, max_batch_size=64, max_seq_len=512, page_size=16, backend="pallas",
                     min_decode_rows=2, decode_batch_sizes=(1, 3, 12))  # fmt: skip
    assert pallas.seq_buckets == [2, 3, 12, 24, 48, 64]  # (1 runs the GPUs' two-row bucket)
    xla = Buckets(max_num_tokens=256, max_batch_size=64, max_seq_len=512, page_size=16, decode_batch_sizes=(3, 12))
    assert {3, 12}.issubset(xla.token_buckets) and xla.forward_shape([1, 1, 1], 1).num_tokens == 3
    assert Buckets(max_num_tokens=256, max_batch_size=64, max_seq_len=512, page_size=16).seq_buckets == [
        1, 2, 4, 8, 16, 32, 64]


# ---- the capacity policies, as plain Python ----------------------------------------------------
PAGE = 4


def _scheduler(policy: str, num_pages: int, max_batch_size: int = 8, priorities: bool = True,
               max_num_tokens: int = 64, chunked: bool = True, equal_progress: bool = False) -> Scheduler:  # fmt: skip
    config = EngineSchedulerConfig(max_num_tokens=max_num_tokens, max_batch_size=max_batch_size,
                                   enable_chunked_prefill=chunked, capacity_policy=policy, max_seq_len=64,
                                   priorities=priorities, equal_progress=equal_progress)  # fmt: skip
    return Scheduler(config, BlockManager(num_pages, PAGE, enable_reuse=False))


def _submit(scheduler: Scheduler, seq_id: int, prompt_len: int, max_tokens: int, priority: float = 0.5,
            known_length: bool = False) -> Sequence:  # fmt: skip
    """A request that may end at an end token (its length unknown to the scheduler), or with
    `known_length` one that surely runs to max_tokens (ignore_eos without stops)."""
    request = Request(request_id=seq_id, prompt=None, prompt_token_ids=list(range(3, 3 + prompt_len)),
                      params=SamplingParams(max_tokens=max_tokens), output=None, priority=priority,
                      stop_token_ids=frozenset() if known_length else frozenset({2}))  # fmt: skip
    seq = Sequence(seq_id=seq_id, request=request, index=0, token_ids=list(request.prompt_token_ids),
                   num_prompt_tokens=prompt_len, seed=0)  # fmt: skip
    request.sequences.append(seq)
    scheduler.add(seq)
    return seq


def _run(scheduler: Scheduler) -> tuple[list[list[int]], int]:
    """Step to the end (each scheduled sequence computes its tokens, then samples one); the ids
    scheduled at each step, and the preemptions."""
    steps, preemptions = [], 0
    while scheduler.has_work():
        out = scheduler.schedule()
        preemptions += len(out.preempted)
        steps.append(sorted(s.seq_id for s, _ in out.items))
        for seq, n in out.items:
            scheduler.mark_computed(seq, n)
            if seq.num_computed == seq.num_tokens:
                seq.token_ids.append(7)
                if seq.num_output_tokens >= seq.request.params.max_tokens:
                    scheduler.remove(seq)
    return steps, preemptions


def test_guaranteed_no_evict_admits_only_what_runs_to_its_end():
    # 9 usable pages of 4 tokens; each request needs 4 pages over its life (8 prompt + 8 new tokens).
    # MAX_UTILIZATION admits all three, runs out of pages and preempts; GUARANTEED_NO_EVICT runs two,
    # then the third, and never preempts.
    results = {}
    for policy in ("MAX_UTILIZATION", "GUARANTEED_NO_EVICT"):
        scheduler = _scheduler(policy, num_pages=10)
        for i in range(3):
            _submit(scheduler, i, prompt_len=8, max_tokens=8)
        results[policy] = _run(scheduler)
    assert results["MAX_UTILIZATION"][0][0] == [0, 1, 2] and results["MAX_UTILIZATION"][1] > 0
    steps, preemptions = results["GUARANTEED_NO_EVICT"]
    assert steps[0] == [0, 1] and preemptions == 0 and 2 in steps[-1]


def test_max_utilization_admits_requests_of_known_length_only_as_their_growth_fits():
    # The requests above, each surely running to max_tokens: MAX_UTILIZATION sees that the third
    # would run the cache out of pages, so it waits instead of being preempted and recomputed.
    scheduler = _scheduler("MAX_UTILIZATION", num_pages=10)
    for i in range(3):
        _submit(scheduler, i, prompt_len=8, max_tokens=8, known_length=True)
    steps, preemptions = _run(scheduler)
    assert steps[0] == [0, 1] and preemptions == 0 and 2 in steps[-1]


def test_max_utilization_projects_the_peak_where_guaranteed_no_evict_sums_whole_lengths():
    # 10 usable pages of 4 tokens. A (8 + 4 tokens, 3 pages) ends after 4 steps; B and C (4 + 16
    # tokens, 5 pages each) grow past it. Their whole lengths sum to 13 pages, but at no step do they
    # hold more than 10: MAX_UTILIZATION admits all three at once and never preempts;
    # GUARANTEED_NO_EVICT holds C back until A has ended.
    results = {}
    for policy in ("MAX_UTILIZATION", "GUARANTEED_NO_EVICT"):
        scheduler = _scheduler(policy, num_pages=11)
        _submit(scheduler, 0, prompt_len=8, max_tokens=4, known_length=True)
        _submit(scheduler, 1, prompt_len=4, max_tokens=16, known_length=True)
        _submit(scheduler, 2, prompt_len=4, max_tokens=16, known_length=True)
        results[policy] = _run(scheduler)
    steps, preemptions = results["MAX_UTILIZATION"]
    assert steps[0] == [0, 1, 2] and preemptions == 0
    steps, preemptions = results["GUARANTEED_NO_EVICT"]
    assert steps[0] == [0, 1] and preemptions == 0 and len(steps) > len(results["MAX_UTILIZATION"][0])
    # A page more each for B and C (4 + 20 tokens) passes the cache at the peak (12 pages): C waits.
    scheduler = _scheduler("MAX_UTILIZATION", num_pages=11)
    _submit(scheduler, 0, prompt_len=8, max_tokens=4, known_length=True)
    _submit(scheduler, 1, prompt_len=4, max_tokens=20, known_length=True)
    _submit(scheduler, 2, prompt_len=4, max_tokens=20, known_length=True)
    steps, preemptions = _run(scheduler)
    assert steps[0] == [0, 1] and preemptions == 0


def test_static_batch_admits_only_when_nothing_runs():
    scheduler = _scheduler("STATIC_BATCH", num_pages=64)
    _submit(scheduler, 0, prompt_len=4, max_tokens=3)
    scheduler.schedule()  # 0 runs
    _submit(scheduler, 1, prompt_len=4, max_tokens=3)
    scheduler.mark_computed(scheduler.running[0], 4)
    scheduler.running[0].token_ids.append(7)
    steps, _ = _run(scheduler)
    assert steps == [[0], [0], [1], [1], [1]]


def test_the_fcfs_waiting_queue_ignores_priorities():
    orders = {}
    for priorities in (True, False):  # 'priority' (jaxllm's default) and 'fcfs' (TensorRT-LLM's)
        scheduler = _scheduler("MAX_UTILIZATION", num_pages=64, max_batch_size=1, priorities=priorities)
        for seq_id, priority in enumerate((0.1, 0.5, 0.9)):
            _submit(scheduler, seq_id, prompt_len=4, max_tokens=1, priority=priority)
        orders[priorities] = [ids[0] for ids in _run(scheduler)[0]]
    assert orders == {True: [2, 1, 0], False: [0, 1, 2]}
    args = _args(scheduler_config=SchedulerConfig(waiting_queue_policy="priority"))
    assert args.scheduler_config.waiting_queue_policy == "priority"


def test_equal_progress_shares_the_budget_between_prompts():
    # Two 40-token prompts, 16 tokens a step, pages of 4: first come, first served computes the first
    # prompt alone; EQUAL_PROGRESS gives each 8 tokens a step (a page each, in rounds), decodes first.
    plans = {}
    for equal_progress in (False, True):
        scheduler = _scheduler("MAX_UTILIZATION", num_pages=64, max_num_tokens=16, equal_progress=equal_progress)
        _submit(scheduler, 0, prompt_len=40, max_tokens=2)
        _submit(scheduler, 1, prompt_len=40, max_tokens=2)
        steps = []
        for _ in range(3):
            out = scheduler.schedule()
            steps.append([(s.seq_id, n) for s, n in out.items])
            for seq, n in out.items:
                scheduler.mark_computed(seq, n)
        plans[equal_progress] = steps
    assert plans[False] == [[(0, 16)], [(0, 16)], [(0, 8), (1, 8)]]
    assert plans[True] == [[(0, 8), (1, 8)]] * 3
    policy = _args(scheduler_config={"context_chunking_policy": "EQUAL_PROGRESS"}).scheduler_config
    assert policy.context_chunking_policy == "EQUAL_PROGRESS"


def test_without_chunked_prefill_only_what_no_step_holds_is_chunked():
    # max_num_tokens=8: a 6-token prompt waits for a step with room for all of it; a 12-token
    # sequence (a preempted one recomputing its prompt and output) is computed in chunks rather than
    # waiting for ever, with the requests behind it.
    scheduler = _scheduler("MAX_UTILIZATION", num_pages=64, max_num_tokens=8, chunked=False)
    _submit(scheduler, 0, prompt_len=12, max_tokens=1)
    _submit(scheduler, 1, prompt_len=6, max_tokens=1)
    first = scheduler.schedule()
    assert [(s.seq_id, n) for s, n in first.items] == [(0, 8)]  # 1's 6 tokens do not fit beside it
    for seq, n in first.items:
        scheduler.mark_computed(seq, n)
    assert [(s.seq_id, n) for s, n in scheduler.schedule().items] == [(0, 4)]


# ---- engines -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trtllm_call(tiny_dir):
    """An LLM built by a TensorRT-LLM test's call (tests/unittest/_torch/speculative/test_eagle3.py,
    its llm_common_config; the draft model left out, max_seq_len the tiny model's 1024 instead of
    8192), with arguments of TensorRT-LLM's other examples added (max_num_tokens,
    enable_iter_perf_stats, print_iter_log, moe_config, enable_autotuner,
    garbage_collection_gen0_threshold). The tiny checkpoint has no tokenizer (skip_tokenizer_init)
    and is float32; chunked prefill is off, TensorRT-LLM's default."""
    model_dir = str(tiny_dir("qwen2"))
    attn_backend, disable_overlap_scheduler, enable_block_reuse, enable_chunked_prefill = "TRTLLM", False, True, False
    max_batch_size = 4
    kv_cache_config = KvCacheConfig(enable_block_reuse=enable_block_reuse, max_tokens=8192)
    cuda_graph_config = CudaGraphConfig(batch_sizes=[i for i in range(1, max_batch_size + 1)])
    llm_common_config = dict(
        model=model_dir,
        attn_backend=attn_backend,
        disable_overlap_scheduler=disable_overlap_scheduler,
        cuda_graph_config=cuda_graph_config,
        max_batch_size=max_batch_size,
        kv_cache_config=kv_cache_config,
        max_seq_len=1024,
        enable_chunked_prefill=enable_chunked_prefill,
        max_num_tokens=64,
        enable_iter_perf_stats=True,
        print_iter_log=True,
        moe_config=MoeConfig(backend="CUTLASS"),
        enable_autotuner=True,
        garbage_collection_gen0_threshold=20000,
    )
    before = gc.get_threshold()
    llm = LLM(**llm_common_config, dtype="float32", skip_tokenizer_init=True)
    yield llm
    llm.shutdown()
    assert gc.get_threshold() == before  # the engine thread's threshold is undone when it stops


def test_a_trtllm_call_runs_unchanged(trtllm_call, caplog):
    llm = trtllm_call
    assert llm._engine.runner.buckets.token_buckets[:4] == [1, 2, 3, 4]  # CudaGraphConfig.batch_sizes
    assert gc.get_threshold()[0] == 20000
    caplog.set_level(logging.INFO, logger="jaxllm")
    outs = llm.generate([[5, 6, 7], [8, 9], [10, 11, 12, 13]], SamplingParams(max_tokens=5, ignore_eos=True),
                        use_tqdm=False)  # fmt: skip
    assert [len(o.outputs[0].token_ids) for o in outs] == [5, 5, 5]
    assert any(r.getMessage().startswith("iter ") and "scheduled" in r.getMessage() for r in caplog.records)
    assert llm.get_stats()


def test_without_chunked_prefill_a_prompt_over_max_num_tokens_is_refused(trtllm_call):
    llm = trtllm_call
    long_prompt = list(range(3, 103))  # 100 tokens > max_num_tokens=64
    message = r"the prompt has 100 tokens, which should not exceed max_num_tokens=64.*enable_chunked_prefill=True"
    with pytest.raises(ValueError, match=message):
        llm.generate_async(long_prompt, SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="prompt 1: " + message):
        llm.generate([[4, 5], long_prompt], SamplingParams(max_tokens=2), use_tqdm=False)
    out = llm.generate_async(list(range(3, 67)), SamplingParams(max_tokens=3, ignore_eos=True)).result(timeout=120)
    assert len(out.outputs[0].token_ids) == 3  # 64 tokens fit; the engine kept serving


@pytest.fixture(scope="module")
def every_three(tiny_dir):
    """Streams every 3 tokens; TensorRT-LLM's default capacity policy, prompts computed side by side."""
    scheduler_config = SchedulerConfig(capacity_scheduler_policy=CapacitySchedulerPolicy.GUARANTEED_NO_EVICT,
                                       context_chunking_policy="EQUAL_PROGRESS")  # fmt: skip
    with LLM(model=str(tiny_dir("qwen2")), dtype="float32", skip_tokenizer_init=True, max_batch_size=4,
             max_num_tokens=64, num_scheduler_steps=1, stream_interval=3, scheduler_config=scheduler_config,
             max_logprobs=5) as llm:  # fmt: skip
        yield llm


def test_max_logprobs_bounds_what_a_request_may_ask(every_three):
    """vLLM's max_logprobs: a request asking more log-probabilities per token is refused at submission."""
    for name in ("logprobs", "prompt_logprobs"):
        with pytest.raises(ValueError, match=f"{name}=6 exceeds the LLM's max_logprobs=5; allowed: at most 5"):
            every_three.generate_async([5, 6, 7], SamplingParams(max_tokens=2, **{name: 6}))
    out = every_three.generate([5, 6, 7], SamplingParams(max_tokens=2, logprobs=5), use_tqdm=False)
    assert all(len(entry) >= 5 for entry in out.outputs[0].logprobs)


def test_stream_interval_sets_the_streaming_granularity(every_three):
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    chunks = [len(p.outputs[0].token_ids_diff) for p in every_three.generate_async([5, 6, 7], params, streaming=True)]
    # The first token at once, then every 3 tokens, the rest with the finish.
    assert chunks == [1, 3, 3, 3] and sum(chunks) == 10
    final = every_three.generate([5, 6, 7], params, use_tqdm=False)
    assert len(final.outputs[0].token_ids) == 10


def test_scheduling_policies_leave_the_outputs_unchanged(every_three, trtllm_call):
    prompts = [list(range(10, 50)), list(range(60, 100)), [7, 8, 9], list(range(120, 150))]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    policies = every_three.generate(prompts, params, use_tqdm=False)
    reference = trtllm_call.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in policies] == [o.outputs[0].token_ids for o in reference]
