"""The float8 E4M3 KV cache (kv_cache_config.dtype='fp8', TensorRT-LLM's and vLLM's "fp8"): its names
and refusals, saturating writes, the Pallas kernels over fp8 pages (interpret mode on the CPU), the
page planner's ~2x capacity, and an engine generating from fp8 pages close to a bf16-cache engine,
with its pages offloaded to the host tier and carried over TCP to a generation_only request."""

import functools
import json
import logging
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import DisaggregatedParams, KvCacheConfig, LLM, SamplingParams
from jaxllm.config import resolve_kv_dtype
from jaxllm.engine import kv_planner, kv_transfer
from jaxllm.layers.attention import to_kv_dtype, write_kv
from jaxllm.llm_args import EngineArgs
from pallas_kernels import (paged_decode_attention, paged_decode_attention_reference, ragged_paged_attention,
                            ragged_paged_attention_reference)  # fmt: skip
from pallas_kernels.kv_write import write_kv_kernel
from tests.paged_kv import INTERPRET, assert_close, lower_for_h100, xla_reference
from tests.test_pallas_decode import decode_inputs
from tests.test_pallas_ragged import ragged_inputs

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

FP8 = jnp.float8_e4m3fn
PAGE = 8
MAX_SEQ_LEN = 64
PREFIX = list(range(10, 43))  # 33 tokens: four full pages and one token
OTHER = list(range(100, 160))  # 60 tokens: with its 4 outputs, every one of the 8 pages


# ---- names ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fp8", "FP8", "fp8_e4m3", "float8_e4m3fn"])
def test_fp8_names_resolve_to_e4m3(name):
    assert resolve_kv_dtype(name, jnp.bfloat16) == FP8
    assert KvCacheConfig(dtype=name).dtype == name
    assert EngineArgs.from_kwargs({"kv_cache_dtype": name}).kv_cache_config.dtype == name
    assert resolve_kv_dtype("auto", jnp.bfloat16) == jnp.bfloat16 and resolve_kv_dtype("bf16") == jnp.bfloat16


def test_other_names_are_refused_with_what_is_allowed(tiny_dir):
    allowed = r"allowed: 'auto', 'float32', 'bfloat16', 'float16', 'fp8'"
    for bad in ("nvfp4", "fp8_e5m2", "int8"):
        with pytest.raises(ValueError, match=rf"dtype='{bad}' is invalid; {allowed}"):
            KvCacheConfig(dtype=bad)
        with pytest.raises(ValueError, match=rf"kv_cache_dtype='{bad}' is not supported; {allowed}"):
            EngineArgs.from_kwargs({"kv_cache_dtype": bad})
    with pytest.raises(ValueError, match="conflicts with kv_cache_config.dtype='bfloat16'"):
        EngineArgs.from_kwargs({"kv_cache_dtype": "fp8", "kv_cache_config": KvCacheConfig(dtype="bfloat16")})
    with pytest.raises(ValueError, match=r"dtype='fp8' is not supported; allowed: 'auto', 'float32'"):
        LLM(model=str(tiny_dir("llama")), dtype="fp8")  # a KV cache dtype only, not the model's


def test_saved_engine_args_keep_the_fp8_cache():
    saved = EngineArgs.from_kwargs({"kv_cache_config": KvCacheConfig(dtype="fp8")}).to_dict()
    assert EngineArgs.from_kwargs(json.loads(json.dumps(saved))).kv_cache_config.dtype == "fp8"


# ---- writes --------------------------------------------------------------------------------------
def _write_case(rng, scale):
    k_pages = v_pages = jnp.zeros((2, 5, 4, 32), FP8)
    k, v = (jnp.asarray(rng.normal(size=(6, 2, 32)) * scale, jnp.bfloat16) for _ in range(2))
    slots = jnp.asarray([4, 5, 9, 13, 19, 0], jnp.int32)  # the last a padding token (null slot 0)
    return k_pages, v_pages, k, v, slots


def test_writes_saturate_and_round_to_e4m3():
    rng = np.random.default_rng(0)
    case = _write_case(rng, 1000.0)  # most values beyond E4M3's 448
    for writer in (write_kv, lambda *a: write_kv_kernel(*a, interpret=INTERPRET)):
        k_pages, v_pages = writer(*case)
        for pages, new in ((k_pages, case[2]), (v_pages, case[3])):
            stored = np.asarray(pages[:, [1, 1, 2, 3, 4], [0, 1, 1, 1, 3]].astype(jnp.float32))  # [K, 5, d]
            want = np.clip(np.asarray(new[:5].astype(jnp.float32)).swapaxes(0, 1), -448, 448)
            assert pages.dtype == FP8 and np.isfinite(stored).all()
            assert (np.abs(stored) == 448).any()  # saturated, not NaN
            # Round to nearest with 3 mantissa bits: within 2^-4 of the value (2^-10 absolute below 2^-6).
            np.testing.assert_allclose(stored, want, rtol=2**-4, atol=2**-10)
    x = jnp.asarray(np.random.default_rng(1).normal(size=4096), jnp.float32)
    rel = np.abs(np.asarray(to_kv_dtype(x, FP8).astype(jnp.float32) - x)) / np.maximum(np.abs(np.asarray(x)), 2**-6)
    assert rel.max() <= 2**-4 and rel.mean() < 2**-5  # measured: 2^-5.5


# ---- the Pallas kernels over fp8 pages (interpret mode on the CPU) -------------------------------
def _fp8_pages(q, k_pages, v_pages, q_dtype):
    """Test inputs made in float32 with fp8 pages (poisoned slots saturate to +-448, not NaN)."""
    return q.astype(q_dtype), to_kv_dtype(k_pages, FP8), to_kv_dtype(v_pages, FP8)


def test_decode_kernel_reads_fp8_pages_under_bf16_queries():
    q, k_pages, v_pages, batch, num_real = decode_inputs(16, 8, 2, 64, jnp.float32)
    q, k_pages, v_pages = _fp8_pages(q, k_pages, v_pages, jnp.bfloat16)
    out = paged_decode_attention(q, k_pages, v_pages, batch.block_tables, batch.seq_lens, scale=0.125, window=48,
                                 num_splits=2, interpret=INTERPRET)  # fmt: skip
    assert out.dtype == jnp.bfloat16 and np.isfinite(np.asarray(out, np.float32)).all()
    reference = paged_decode_attention_reference(q, k_pages, v_pages, batch.block_tables, batch.seq_lens, scale=0.125,
                                                 window=48)  # fmt: skip
    assert_close(out, reference, jnp.bfloat16)
    assert_close(out, xla_reference(q, k_pages, v_pages, batch, scale=0.125, window=48), jnp.bfloat16,
                 rows=slice(0, num_real))  # fmt: skip


def test_ragged_kernel_reads_fp8_pages_under_float32_queries():
    q, k_pages, v_pages, batch, num_real = ragged_inputs(16, 8, 2, 64, jnp.float32)
    q, k_pages, v_pages = _fp8_pages(q, k_pages, v_pages, jnp.float32)
    args = (q, k_pages, v_pages, batch.query_start, batch.seq_lens, batch.block_tables)
    out = ragged_paged_attention(*args, max_query_len=40, scale=0.125, interpret=INTERPRET)
    assert out.dtype == jnp.float32
    assert_close(out, ragged_paged_attention_reference(*args, max_query_len=40, scale=0.125), jnp.float32)
    assert_close(out, xla_reference(q, k_pages, v_pages, batch, scale=0.125, window=None), jnp.float32,
                 rows=slice(0, num_real))  # fmt: skip


def test_ragged_kernel_reads_fp8_pages_under_bf16_queries_in_float16():
    """Under bf16 queries the fp8 tiles are widened to float16 (_tiles.kv_compute_dtype), the query
    clipped into float16's range: finite, and the reference's within bf16's tolerance."""
    q, k_pages, v_pages, batch, num_real = ragged_inputs(16, 8, 2, 64, jnp.float32)
    q, k_pages, v_pages = _fp8_pages(q, k_pages, v_pages, jnp.bfloat16)
    q = q.at[0, 0, 0].set(1e6)  # beyond float16's range
    args = (q, k_pages, v_pages, batch.query_start, batch.seq_lens, batch.block_tables)
    out = ragged_paged_attention(*args, max_query_len=40, scale=0.125, interpret=INTERPRET)
    assert out.dtype == jnp.bfloat16 and np.isfinite(np.asarray(out, np.float32)).all()
    reference = ragged_paged_attention_reference(*args, max_query_len=40, scale=0.125)
    assert_close(out[1:], reference[1:], jnp.bfloat16)


def test_kernels_read_and_write_fp8_bytes_as_fp8_pages():
    """How jaxllm holds a float8 cache (uint8 bytes, layers/attention.py:kv_storage_dtype): the three
    kernels give over the bytes exactly what they give over float8 pages."""
    as_bytes = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.uint8)
    q, k_pages, v_pages, batch, _ = decode_inputs(16, 8, 2, 64, jnp.float32)
    q, k_pages, v_pages = _fp8_pages(q, k_pages, v_pages, jnp.bfloat16)
    decode = functools.partial(paged_decode_attention, block_tables=batch.block_tables, seq_lens=batch.seq_lens,
                               scale=0.125, num_splits=2, interpret=INTERPRET)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(decode(q, as_bytes(k_pages), as_bytes(v_pages)), np.float32),
                                  np.asarray(decode(q, k_pages, v_pages), np.float32))  # fmt: skip
    q, k_pages, v_pages, batch, _ = ragged_inputs(16, 8, 2, 64, jnp.float32)
    q, k_pages, v_pages = _fp8_pages(q, k_pages, v_pages, jnp.float32)
    ragged = functools.partial(ragged_paged_attention, query_start=batch.query_start, seq_lens=batch.seq_lens,
                               block_tables=batch.block_tables, max_query_len=40, scale=0.125, interpret=INTERPRET)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(ragged(q, as_bytes(k_pages), as_bytes(v_pages))),
                                  np.asarray(ragged(q, k_pages, v_pages)))  # fmt: skip
    case = _write_case(np.random.default_rng(2), 1000.0)
    want = write_kv_kernel(*case, interpret=INTERPRET)
    got = write_kv_kernel(as_bytes(case[0]), as_bytes(case[1]), *case[2:], interpret=INTERPRET)
    for g, w in zip(got, want):
        assert g.dtype == jnp.uint8
        np.testing.assert_array_equal(np.asarray(g), np.asarray(as_bytes(w)))


@pytest.mark.parametrize("page_dtype", [FP8, jnp.uint8])
def test_kernels_over_fp8_pages_lower_to_triton_for_h100(page_dtype):
    """The compiled path (not the interpreter) of all three kernels, bf16 queries over fp8 pages
    (float8, or its bytes)."""
    q = jax.ShapeDtypeStruct((4, 32, 128), jnp.bfloat16)
    pages = jax.ShapeDtypeStruct((8, 64, 16, 128), page_dtype)
    tables, lens = jax.ShapeDtypeStruct((4, 16), jnp.int32), jax.ShapeDtypeStruct((4,), jnp.int32)
    decode = functools.partial(paged_decode_attention, scale=0.1, num_splits=2)
    assert lower_for_h100(decode, q, pages, pages, tables, lens).count("__gpu$xla.gpu.triton") == 2
    starts = jax.ShapeDtypeStruct((5,), jnp.int32)
    ragged = functools.partial(ragged_paged_attention, max_query_len=4, scale=0.1)
    assert lower_for_h100(ragged, q, pages, pages, starts, lens, tables).count("__gpu$xla.gpu.triton") == 1
    new, slots = jax.ShapeDtypeStruct((4, 8, 128), jnp.bfloat16), jax.ShapeDtypeStruct((4,), jnp.int32)
    assert lower_for_h100(write_kv_kernel, pages, pages, new, new, slots).count("__gpu$xla.gpu.triton") == 1


def test_kernels_refuse_other_mixed_dtypes():
    q, k_pages, v_pages, batch, _ = decode_inputs(16, 8, 2, 64, jnp.float32)
    with pytest.raises(ValueError, match="must share a dtype, or the pages be float8_e4m3fn"):
        paged_decode_attention(q.astype(jnp.bfloat16), k_pages, v_pages, batch.block_tables, batch.seq_lens,
                               scale=0.125, interpret=INTERPRET)  # fmt: skip
    with pytest.raises(ValueError, match="q dtype float8_e4m3fn is not supported"):
        paged_decode_attention(q.astype(FP8), k_pages.astype(FP8), v_pages.astype(FP8), batch.block_tables,
                               batch.seq_lens, scale=0.125, interpret=INTERPRET)  # fmt: skip


# ---- the page planner -----------------------------------------------------------------------------
class _FakeGPU:
    """A device reporting 2 GiB free, for the planner's GPU path."""

    platform, device_kind = "gpu", "fake"
    process_index = jax.process_index()

    def memory_stats(self):
        return {"bytes_limit": 2 << 30, "bytes_in_use": 0}


def test_fp8_pages_are_about_twice_the_bf16_ones_in_the_same_memory(tiny_dir):
    from jaxllm.checkpoints import loader

    cfg = loader.read_config(loader.resolve(str(tiny_dir("llama"))))
    assert kv_planner.bytes_per_token(cfg, FP8) * 2 == kv_planner.bytes_per_token(cfg, jnp.bfloat16)
    # A GPU's free memory; the CPU's budget (with a batch bound that does not bind).
    for devices, max_batch_size in (([_FakeGPU()], 4), (None, 1 << 20)):
        pages = {dtype: kv_planner.plan_num_pages(cfg, dtype, 32, KvCacheConfig(), max_num_tokens=64,
                                                  max_batch_size=max_batch_size, devices=devices)  # fmt: skip
                 for dtype in (jnp.bfloat16, FP8)}
        assert pages[FP8] >= 1.9 * pages[jnp.bfloat16] > 1000


# ---- an engine over fp8 pages --------------------------------------------------------------------
def _make(tiny_dir, dtype, **kv):
    config = KvCacheConfig(tokens_per_block=PAGE, max_tokens=MAX_SEQ_LEN, dtype=dtype, **kv)
    return LLM(model=str(tiny_dir("llama")), dtype="float32", skip_tokenizer_init=True, max_batch_size=4,
               max_num_tokens=64, max_seq_len=MAX_SEQ_LEN, kv_cache_config=config)  # fmt: skip


@pytest.fixture(scope="module")
def engines(tiny_dir):
    """(fp8-cache LLM with a host tier, bf16-cache LLM): float32 weights, eight pages of 8 tokens."""
    with _make(tiny_dir, "fp8", host_cache_size=1 << 20) as fp8, _make(tiny_dir, "bfloat16") as bf16:
        yield fp8, bf16


def test_greedy_tokens_and_logits_follow_the_bf16_cache(engines):
    """fp8 rounds each K/V element to 3 mantissa bits (relative error <= 2^-4), so logits move by a
    few percent of their range and a greedy path may fork where two tokens were nearly tied; after a
    fork the paths are unrelated. Bounds: first-step logits within 15% of the largest |logit|
    (measured: <= 5%), the first token equal for at least 3 of 4 prompts, and at least half of all
    generated positions equal (measured: 87%)."""
    fp8, bf16 = engines
    assert fp8._engine.runner.kv_dtype == FP8 and bf16._engine.runner.kv_cache[0][0].dtype == jnp.bfloat16
    # the float8 cache holds its bytes (layers/attention.py:kv_storage_dtype): written in place
    assert fp8._engine.runner.kv_cache[0][0].dtype == jnp.uint8
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(3, 320, size=n)] for n in (5, 11, 17, 23)]
    params = SamplingParams(max_tokens=8, ignore_eos=True, return_generation_logits=True)
    got, want = fp8.generate(prompts, params, use_tqdm=False), bf16.generate(prompts, params, use_tqdm=False)
    same = first_same = 0
    for a, b in zip(got, want):
        a, b = a.outputs[0], b.outputs[0]
        la, lb = np.asarray(a.generation_logits[0]), np.asarray(b.generation_logits[0])
        assert np.isfinite(la).all() and np.abs(la - lb).max() <= 0.15 * np.abs(lb).max()
        same += sum(x == y for x, y in zip(a.token_ids, b.token_ids))
        first_same += a.token_ids[0] == b.token_ids[0]
    assert first_same >= 3 and same >= 0.5 * 4 * 8


def test_fp8_pages_go_to_the_host_tier_and_back(engines):
    fp8, _ = engines
    bm = fp8._engine.block_manager
    greedy = SamplingParams(max_tokens=4, ignore_eos=True)
    first = fp8.generate(PREFIX, greedy, use_tqdm=False).outputs[0].token_ids
    fp8.generate(OTHER, greedy, use_tqdm=False)  # needs all eight pages: the prefix's leave the device
    assert bm.host.num_pages >= 4
    assert all(v.dtype == FP8 for page in bm.host._pages.values() for v in page.values)
    onboarded = bm.host.num_onboarded
    again = fp8.generate(PREFIX, greedy, use_tqdm=False).outputs[0]
    assert again.token_ids == first and bm.host.num_onboarded == onboarded + 4


def test_fp8_pages_travel_over_tcp_to_a_generation_only_request(engines, monkeypatch):
    """context_only and generation_only on the same fp8 LLM, the pages forced over its TCP server
    (raw bytes of float8 arrays, dtype named 'float8_e4m3fn'): the aggregated request's tokens."""
    fp8, _ = engines
    monkeypatch.setattr(kv_transfer, "_LOCAL_ENGINES", weakref.WeakValueDictionary())
    prompt, greedy = [5, 17, 42, 99, 3, 250, 7, 31, 8, 64], SamplingParams(max_tokens=6, ignore_eos=True)
    whole = fp8.generate(prompt, greedy, use_tqdm=False).outputs[0].token_ids
    ctx = fp8.generate(prompt, greedy, use_tqdm=False,
                       disaggregated_params=DisaggregatedParams(request_type="context_only")).outputs[0]  # fmt: skip
    dp = ctx.disaggregated_params
    assert fp8._engine.transfer.layout.dtype == "float8_e4m3fn"
    follow = DisaggregatedParams(request_type="generation_only", first_gen_tokens=dp.first_gen_tokens,
                                 ctx_request_id=dp.ctx_request_id, opaque_state=dp.opaque_state)  # fmt: skip
    assert fp8.generate(prompt, greedy, use_tqdm=False, disaggregated_params=follow).outputs[0].token_ids == whole


def test_the_log_line_names_the_fp8_cache(tiny_dir, caplog):
    with caplog.at_level(logging.INFO, logger="jaxllm"):
        _make(tiny_dir, "fp8_e4m3").shutdown()
    assert "KV cache: 9 pages of 8 tokens" in caplog.text and "float8_e4m3fn" in caplog.text


def test_xla_writes_a_float8_cache_as_bytes_in_place():
    """A float8 cache is held as uint8 (kv_storage_dtype): write_kv stores the same bytes a float8
    scatter would (saturated), in place of the donated pages, and gather_pages reads the values back;
    a bf16 cache is held as it is."""
    from jaxllm.layers.attention import gather_pages, kv_storage_dtype, write_kv

    assert kv_storage_dtype(FP8) == jnp.uint8 and kv_storage_dtype(jnp.bfloat16) == jnp.bfloat16
    k = jax.random.normal(jax.random.key(0), (5, 2, 16)) * 100.0  # some beyond 448
    slots = jnp.asarray([3, 9, 17, 30, 31], jnp.int32)
    want, _ = write_kv(jnp.zeros((2, 4, 8, 16), FP8), jnp.zeros((2, 4, 8, 16), FP8), k, k, slots)
    got, _ = jax.jit(write_kv, donate_argnums=(0, 1))(jnp.zeros((2, 4, 8, 16), jnp.uint8),
                                                       jnp.zeros((2, 4, 8, 16), jnp.uint8), k, k, slots)  # fmt: skip
    assert got.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(jax.lax.bitcast_convert_type(got, FP8), np.float32),
                                  np.asarray(want, np.float32))  # fmt: skip
    pages = jnp.asarray([[0, 1], [2, 3]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(gather_pages(got, pages)), np.asarray(want[:, pages], np.float32))
