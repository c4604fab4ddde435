"""FP8 weights (QuantConfig(quant_algo='FP8')): the arithmetic against a float32 reference, TensorRT-LLM's
names and refusals, and an FP8 engine's tokens the same at every tensor-parallel size, after a save and
reload, and with dummy weights. Agreement with bf16 on real models: tests/test_real_models.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm import LLM, QuantAlgo, QuantConfig, SamplingParams
from jaxllm.layers.linear import PROJECTIONS, fp8_linear, fp8_linear_reference, quantize_rows
from jaxllm.models.params import flatten_paths, init_params, param_bytes, unfuse_params
from jaxllm.quantization import FP8_DTYPE, FP8_MAX, QUANTIZED_PARAMS, base_config, quantize_fp8

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 12], list(range(30, 70))]
PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)
FP8 = QuantConfig(quant_algo=QuantAlgo.FP8)


# The engine sizes of the tests' tiny engines: a checkpoint saved by one reloads as the same engine, its
# programs loaded from the program cache.
SIZES = dict(max_batch_size=4, max_num_tokens=64)


def _tokens(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]


# Log-probability gap (nats) under which two candidates are a near tie. FP8's per-token activation
# scales round each row to 8 bits, so another reduction order (another TP size) moves log-
# probabilities by ~0.01 on the tiny models and may flip a choice that close.
NEAR_TIE = 0.05


def _greedy(llm):
    """[(tokens, the top-2 log-probabilities of each step)] of PROMPTS' greedy outputs."""
    params = SamplingParams(max_tokens=PARAMS.max_tokens, ignore_eos=True, logprobs=2)
    return [(o.outputs[0].token_ids, [sorted((v.logprob for v in lp.values()), reverse=True)[:2]
                                      for lp in o.outputs[0].logprobs])
            for o in llm.generate(PROMPTS, params, use_tqdm=False)]  # fmt: skip


def _assert_same_greedy_tokens(got, want):
    """got's tokens are want's, except that a sequence may leave want's at a step where want's top
    two candidates were a near tie (NEAR_TIE); the rest of that sequence is then not compared."""
    for (tokens, _), (want_tokens, top2) in zip(got, want):
        assert len(tokens) == len(want_tokens)
        for i, (a, b) in enumerate(zip(tokens, want_tokens)):
            if a != b:
                assert top2[i][0] - top2[i][1] < NEAR_TIE, f"step {i}: {tokens} against {want_tokens}, top2 {top2[i]}"
                break


def test_quant_config_takes_tensorrt_llms_names_and_refuses_what_jaxllm_does_not_run():
    assert QuantConfig(quant_algo="FP8").quant_algo is QuantAlgo.FP8
    assert QuantConfig(quant_algo="fp8_per_channel_per_token").weight_format == "FP8_PER_CHANNEL_PER_TOKEN"
    assert QuantConfig(quant_algo="FP8").weight_format == "FP8_PER_CHANNEL_PER_TOKEN"  # no calibration data
    assert QuantConfig(quant_algo="NO_QUANT").quant_algo is None
    assert QuantConfig(kv_cache_quant_algo=QuantAlgo.FP8).kv_cache_dtype == "fp8"
    with pytest.raises(ValueError, match=r"quant_algo='W4A16_AWQ' is not supported.*allowed: None, 'NO_QUANT', 'FP8'"):
        QuantConfig(quant_algo="W4A16_AWQ")
    with pytest.raises(ValueError, match="kv_cache_quant_algo='INT8'"):
        QuantConfig(kv_cache_quant_algo="INT8")
    with pytest.raises(ValueError, match="group_size=64 is not supported"):
        QuantConfig(quant_algo="FP8", group_size=64)
    from jaxllm.llm_args import EngineArgs

    args = EngineArgs(quant_config={"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"})
    assert isinstance(args.quant_config, QuantConfig)
    assert args.kv_cache_config.dtype == "fp8"  # kv_cache_quant_algo FP8 is an fp8 KV cache
    with pytest.raises(ValueError, match="conflicts with kv_cache_config.dtype='bfloat16'"):
        EngineArgs(quant_config=QuantConfig(kv_cache_quant_algo="FP8"), kv_cache_config={"dtype": "bfloat16"})
    with pytest.raises(TypeError, match="unknown field"):
        EngineArgs(quant_config={"quant_algorithm": "FP8"})
    with pytest.raises(TypeError, match="quant_config must be a QuantConfig"):
        EngineArgs(quant_config="FP8")


def test_fp8_weights_round_to_e4m3_with_a_scale_per_output_channel():
    w = jax.random.normal(jax.random.key(0), (64, 4, 8)) * jnp.logspace(-3, 1, 32).reshape(4, 8)
    w = w.at[:, 1, 3].set(0.0)  # an all-zero channel (tensor parallelism's padding) gets scale 1
    q, scale = quantize_fp8(w, num_input_axes=1)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape and scale.shape == (4, 8)
    np.testing.assert_allclose(np.abs(np.asarray(q, np.float32)).max(axis=0)[scale != 1], FP8_MAX)
    assert float(scale[1, 3]) == 1.0 and not np.asarray(q, np.float32)[:, 1, 3].any()
    back = np.asarray(q, np.float32) * np.asarray(scale)
    # E4M3 keeps 3 mantissa bits: within half a step (2^-4 relative) of each value, or of the
    # smallest subnormal step (2^-9 of the scale) near zero.
    bound = np.maximum(np.abs(np.asarray(w)) * 2.0**-4, np.asarray(scale) * 2.0**-10) * 1.0001
    assert (np.abs(back - np.asarray(w)) <= bound).all()


@pytest.mark.parametrize("name", list(QUANTIZED_PARAMS))
def test_fp8_projection_is_its_float32_reference(name):
    """Every projection's einsum with per-token activation scales: the fp8 product accumulated in
    float32 equals plain float32 arithmetic on the dequantized operands."""
    n_in = QUANTIZED_PARAMS[name]
    shapes = {1: ((6, 48), (48, 4, 8) if name in ("wq", "wk", "wv") else (48, 40)), 2: ((6, 4, 12), (4, 12, 48))}
    x_shape, w_shape = shapes[n_in]
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, x_shape) * jnp.linspace(0.01, 30, x_shape[0]).reshape((-1,) + (1,) * (len(x_shape) - 1))
    w8, scale = quantize_fp8(jax.random.normal(kw, w_shape) * 0.05, n_in)
    got = fp8_linear(x, w8, scale, PROJECTIONS[name], n_in)
    want = fp8_linear_reference(x, w8, scale, PROJECTIONS[name], n_in)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    # and within FP8's rounding of the unquantized float product
    exact = jnp.einsum(PROJECTIONS[name], x, w8.astype(jnp.float32) * scale, precision="highest")
    assert float(jnp.linalg.norm(got - exact) / jnp.linalg.norm(exact)) < 0.06
    x8, sx = quantize_rows(x, n_in)
    assert sx.shape == x_shape[:1] and x8.dtype == FP8_DTYPE  # one scale per token: batch-invariant


def test_fp8_projections_of_a_few_rows_are_weight_only_on_request():
    """project(..., weight_only_rows=n) (the engine's steps on GPUs): an FP8 product of at most n rows
    keeps its rows unquantized and widens the fp8 weight (the dequantized weight's product); more
    rows are fp8_linear's."""
    from jaxllm.layers.linear import project

    kx, kw = jax.random.split(jax.random.key(2))
    shapes = {"wq": (32, 4, 16), "wo": (4, 16, 32), "w_up": (32, 48)}
    for name, w_shape in shapes.items():
        n_in = QUANTIZED_PARAMS[name]
        w8, scale = quantize_fp8(jax.random.normal(kw, w_shape) * 0.05, n_in)
        lp = {name: w8, name + "_scale": scale, name + "_input_scale": jnp.float32(0.01)}
        for rows in (1, 16, 17):
            x = jax.random.normal(kx, (rows,) + w_shape[:n_in]) * jnp.linspace(0.1, 3, rows).reshape((-1,) + (1,) * n_in)
            got = project(lp, name, x, weight_only_rows=16)
            if rows <= 16:
                want = jnp.einsum(PROJECTIONS[name], x, w8.astype(jnp.float32) * scale, precision="highest")
                np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
            else:
                want = fp8_linear(x, w8, scale, PROJECTIONS[name], n_in, lp[name + "_input_scale"])
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# Each projection form's weight shape: wo's two input axes, the fused QKV and gate/up.
W4A16_SHAPES = {"wq": (32, 4, 8), "wo": (4, 32, 24), "w_down": (48, 32), "wqkv": (32, 2, 3, 8), "w_gate_up": (32, 2, 40)}


def _w4a16_layers(kw):
    """(name, its input axes, weight shape, layer params, dequantized weight) of each projection form's
    random weight as int4 in groups of 16, without and with offsets."""
    from jaxllm.layers import linear
    from jaxllm.quantization import quantize_int, quantize_int_asymmetric

    for name, w_shape in W4A16_SHAPES.items():
        n_in = linear.INPUT_AXES[name]
        w = jax.random.normal(kw, w_shape)
        for zero_point in (False, True):
            if zero_point:
                q, scale, zero = quantize_int_asymmetric(w, n_in, 16)
                lp = {name: q, name + "_scale": scale, name + "_zero": zero}
            else:
                q, scale = quantize_int(w, n_in, "W4A16", group_size=16)
                lp = {name: q, name + "_scale": scale}
            yield name, n_in, w_shape, lp, linear.dequantize_groups(q, scale, n_in, jnp.float32, lp.get(name + "_zero"))


def test_w4a16_decode_products_as_a_batch_of_group_dots(monkeypatch):
    """A W4A16 product of at most weight_only_rows rows (a GPU decode) with groups of at least
    linear.GROUPED_MIN_GROUP channels is grouped_linear's batch of dots, one a group (offsets too):
    the dequantized weight's product; more rows dequantize the weight first, exactly as before; so do
    smaller groups, int8 groups and the switch (GROUPED_DOTS) off."""
    from jaxllm.layers import linear
    from jaxllm.quantization import quantize_int, quantize_int_asymmetric

    kx, kw = jax.random.split(jax.random.key(9))
    for name, n_in, w_shape, lp, deq in _w4a16_layers(kw):
        for rows in (2, 17):
            x = jax.random.normal(kx, (rows,) + w_shape[:n_in])
            want = jnp.einsum(PROJECTIONS[name], x, deq, precision="highest")
            with monkeypatch.context() as patch:
                patch.setattr(linear, "GROUPED_MIN_GROUP", 16)
                got = linear.project(lp, name, x, weight_only_rows=16)
                np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
                dequantized = linear.project(lp, name, x)  # weight_only_rows 0: the CPU's steps
                if rows > 16:  # past weight_only_rows: the dequantized form, exactly
                    np.testing.assert_array_equal(np.asarray(got), np.asarray(dequantized))
                patch.setattr(linear, "GROUPED_DOTS", [False])
                off = linear.project(lp, name, x, weight_only_rows=16)
                np.testing.assert_array_equal(np.asarray(off), np.asarray(dequantized))
            np.testing.assert_array_equal(np.asarray(linear.project(lp, name, x, weight_only_rows=16)),
                                          np.asarray(dequantized))  # groups of 16 < GROUPED_MIN_GROUP  # fmt: skip
    # int8 groups (W8A16_GPTQ's) keep the dequantized form (not measured as group dots).
    q8, scale8 = quantize_int(jax.random.normal(kw, (64, 24)), 1, "W8A16", group_size=16)
    lp8, x = {"w_down": q8, "w_down_scale": scale8}, jax.random.normal(kx, (2, 64))
    with monkeypatch.context() as patch:
        patch.setattr(linear, "GROUPED_MIN_GROUP", 16)
        np.testing.assert_array_equal(np.asarray(linear.project(lp8, "w_down", x, weight_only_rows=16)),
                                      np.asarray(linear.project(lp8, "w_down", x)))  # fmt: skip
    # Under tensor parallelism: a row-parallel weight's groups split over the devices, the products
    # summed across them (2 of the suite's virtual CPU devices).
    from jax.sharding import Mesh, NamedSharding

    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    q, scale, zero = quantize_int_asymmetric(jax.random.normal(kw, (64, 24)), 1, 16)
    x = jax.random.normal(kx, (2, 64))
    want = linear.grouped_linear(x, q, scale, PROJECTIONS["w_down"], 1, zero)
    put = [jax.device_put(a, NamedSharding(mesh, spec)) for a, spec in
           ((x, P(None, "tp")), (q, P("tp", None)), (scale, P("tp", None)), (zero, P("tp", None)))]  # fmt: skip
    got = jax.jit(lambda *a: linear.grouped_linear(*a[:3], PROJECTIONS["w_down"], 1, a[3]))(*put)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_w4a16_int4_weights_stored_input_axes_last(monkeypatch):
    """On GPUs the engine stores W4A16's int4 weights with groups of at least linear.GROUPED_MIN_GROUP
    channels input axes last (`<name>_t`; linear.stores_input_last, WEIGHT_ONLY_INPUT_LAST), their scales
    and offsets as they are: a decode-sized product (the batch of group dots) and a larger one (the
    weight dequantized first, in that layout) are the dequantized weight's product in either layout;
    int8 groups and the switch off keep the checkpoint's layout; smaller groups are stored so while
    linear.SMALL_GROUP_DOT_ROWS lets a step's few rows take the group dots. Sharded under tensor
    parallelism (the transposed weight's input axis split) the group dots are the same."""
    from jaxllm.layers import linear
    from jaxllm.models.params import transpose_layer, transposed
    from jaxllm.quantization import quantize_int, quantize_int_asymmetric

    monkeypatch.setattr(linear, "GROUPED_MIN_GROUP", 16)
    monkeypatch.setattr(linear, "WEIGHT_ONLY_INPUT_LAST", {"int8": True, "int4": True})  # the GPU's layout (None)
    kx, kw = jax.random.split(jax.random.key(11))
    for name, n_in, w_shape, lp, deq in _w4a16_layers(kw):
        assert transposed(lp) == {name: n_in}
        lp_t = transpose_layer(lp)
        assert name not in lp_t and lp_t[name + "_t"].shape == w_shape[n_in:] + w_shape[:n_in]
        scale, zero = lp[name + "_scale"], lp.get(name + "_zero")
        assert lp_t[name + "_scale"] is scale  # scales and offsets keep the checkpoint's layout
        np.testing.assert_array_equal(
            np.asarray(linear.dequantize_groups(lp_t[name + "_t"], scale, n_in, jnp.float32, zero, input_last=True)),
            np.asarray(linear.transpose_input_last(deq, n_in)))  # fmt: skip
        for rows in (2, 17):  # the group dots, then the dequantized form
            x = jax.random.normal(kx, (rows,) + w_shape[:n_in])
            want = jnp.einsum(PROJECTIONS[name], x, deq, precision="highest")
            got = linear.project(lp_t, name, x, weight_only_rows=16)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
        monkeypatch.setitem(linear.WEIGHT_ONLY_INPUT_LAST, "int4", False)
        assert transposed(lp) == {}
        monkeypatch.setitem(linear.WEIGHT_ONLY_INPUT_LAST, "int4", True)
    # Groups of 8 < GROUPED_MIN_GROUP (as GGUF's 32 are under 128): stored so too, group dots in
    # steps of at most SMALL_GROUP_DOT_ROWS rows, dequantized first in larger ones.
    grouped = linear.grouped_linear
    for name, w_shape in W4A16_SHAPES.items():
        n_in = linear.INPUT_AXES[name]
        q, scale, zero = quantize_int_asymmetric(jax.random.normal(kw, w_shape), n_in, 8)
        lp = {name: q, name + "_scale": scale, name + "_zero": zero}
        assert transposed(lp) == {name: n_in}
        deq = linear.dequantize_groups(q, scale, n_in, jnp.float32, zero)
        for rows in (2, linear.SMALL_GROUP_DOT_ROWS + 1):
            x = jax.random.normal(kx, (rows,) + w_shape[:n_in])
            want = jnp.einsum(PROJECTIONS[name], x, deq, precision="highest")
            calls = []
            with monkeypatch.context() as patch:  # which form computed it
                patch.setattr(linear, "grouped_linear", lambda *a, **k: calls.append(rows) or grouped(*a, **k))
                got = linear.project(transpose_layer(lp), name, x, weight_only_rows=16)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
            assert calls == ([rows] if rows <= linear.SMALL_GROUP_DOT_ROWS else []), (name, rows)
        with monkeypatch.context() as patch:
            patch.setattr(linear, "SMALL_GROUP_DOT_ROWS", 0)  # never: the checkpoint's layout
            assert transposed(lp) == {}
    q8, scale8 = quantize_int(jax.random.normal(kw, (64, 24)), 1, "W8A16", group_size=16)
    assert transposed({"w_down": q8, "w_down_scale": scale8}) == {}  # int8 groups: as they are
    monkeypatch.setattr(linear, "WEIGHT_ONLY_INPUT_LAST", {"int8": None, "int4": None})  # the default: GPUs only
    assert transposed(lp) == ({name: n_in} if jax.default_backend() == "gpu" else {})
    # Under tensor parallelism: w_down_t [out, in] split along its input axis, the groups' products
    # summed across 2 of the suite's virtual CPU devices.
    from jax.sharding import Mesh, NamedSharding

    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    q, scale, zero = quantize_int_asymmetric(jax.random.normal(kw, (64, 24)), 1, 16)
    x, qt, equation = jax.random.normal(kx, (2, 64)), linear.transpose_input_last(q, 1), linear._input_last(
        PROJECTIONS["w_down"], 1)  # fmt: skip
    want = linear.grouped_linear(x, q, scale, PROJECTIONS["w_down"], 1, zero)
    put = [jax.device_put(a, NamedSharding(mesh, spec)) for a, spec in
           ((x, P(None, "tp")), (qt, P(None, "tp")), (scale, P("tp", None)), (zero, P("tp", None)))]  # fmt: skip
    got = jax.jit(lambda *a: linear.grouped_linear(*a[:3], equation, 1, a[3], input_last=True))(*put)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_forward_dense_computes_fp8_products_weight_only_on_request(tiny_dir):
    """forward_dense(..., weight_only_rows=n) (benchmarks/fp8_agreement.py: an engine's decode steps'
    arithmetic on GPUs): a model of FP8 weights gives the logits of its dequantized weights with the
    activations left unquantized; without it, the per-token fp8 activations move them."""
    from jaxllm.checkpoints import loader
    from jaxllm.models.params import unflatten_paths
    from jaxllm.models.transformer import forward_dense

    cfg = loader.read_config(loader.resolve(str(tiny_dir("llama"))))
    qcfg = cfg.__class__(**{**cfg.__dict__, "quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"})
    params = init_params(qcfg, jnp.float32, jax.random.key(0))
    flat = flatten_paths(params)
    dequantized = {p: (w.astype(jnp.float32) * flat[p + "_scale"] if w.dtype == FP8_DTYPE else w)
                   for p, w in flat.items() if not p.endswith(("_scale", "_input_scale"))}  # fmt: skip
    tokens = jnp.asarray([[5, 17, 42, 99, 3, 250, 7, 11]])
    want = forward_dense(unflatten_paths(dequantized, cfg), tokens, cfg)
    got = forward_dense(params, tokens, qcfg, weight_only_rows=tokens.size)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    fp8 = forward_dense(params, tokens, qcfg)
    assert float(jnp.abs(fp8 - want).max()) > 1e-3


def test_fp8_params_are_described_once(tiny_dir):
    """The quantized model's description: projections in fp8 with float32 scales over their output
    axes, the rest in the model's dtype; init_params quantizes the float model's random weights."""
    from jaxllm.checkpoints import loader

    cfg = loader.read_config(loader.resolve(str(tiny_dir("llama"))))
    qcfg = cfg.__class__(**{**cfg.__dict__, "quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"})
    params = jax.jit(lambda: init_params(qcfg, jnp.bfloat16, jax.random.key(0)))()
    layer = params["layers"][0]
    assert layer["wq"].dtype == FP8_DTYPE and layer["wq_scale"].shape == (cfg.num_heads, cfg.head_dim)
    assert layer["wo_scale"].shape == (cfg.hidden_size,) and layer["attn_norm"].dtype == jnp.bfloat16
    float_params = jax.jit(lambda: init_params(base_config(qcfg), jnp.bfloat16, jax.random.key(0)))()
    np.testing.assert_array_equal(np.asarray(quantize_fp8(float_params["layers"][0]["wq"], 1)[0], np.float32),
                                  np.asarray(layer["wq"], np.float32))  # fmt: skip
    projections = sum(int(np.prod(float_params["layers"][0][n].shape)) for n in QUANTIZED_PARAMS) * cfg.num_layers
    assert param_bytes(cfg, jnp.bfloat16) - param_bytes(qcfg, jnp.bfloat16) == projections - 4 * sum(
        int(np.prod(layer[n + "_scale"].shape)) for n in QUANTIZED_PARAMS) * cfg.num_layers  # fmt: skip
    with pytest.raises(ValueError, match="quant_algo='INT4' is not supported"):
        cfg.__class__(**{**cfg.__dict__, "quant_algo": "INT4"})


@pytest.mark.parametrize("algo,group_size,zero_point,min_group", [
    ("FP8", 0, False, None), ("W8A16", 0, False, None), ("W4A16", 32, True, None), ("W4A16", 32, True, 16),
    ("W8A16", 16, True, None)])  # fmt: skip
def test_fused_quantized_projections_are_the_separate_ones(algo, group_size, zero_point, min_group, tiny_dir,
                                                           monkeypatch):  # fmt: skip
    """The engine's fused layout of a quantized model (models/params.py: fuse_params): the weights,
    scales, offsets and static input scales of q/k/v and of gate/up side by side, the same forward;
    the fused input scale is the largest of its projections'. fp8 and (on GPUs) int8 weights with a scale
    per output channel are stored input axes last (`<name>_t`), and so are int4 ones (min_group: this
    tiny model's groups of 16 and 32 taken as 128's are, for the group dots of any step's rows); int8
    groups as they are."""
    from jaxllm.checkpoints import loader
    from jaxllm.layers import linear
    from jaxllm.models.params import fuse_params
    from jaxllm.models.transformer import forward_dense

    if min_group is not None:
        monkeypatch.setattr(linear, "GROUPED_MIN_GROUP", min_group)
    monkeypatch.setattr(linear, "WEIGHT_ONLY_INPUT_LAST", {"int8": True, "int4": True})  # the GPU's layout (None)
    cfg = loader.read_config(loader.resolve(str(tiny_dir("llama"))))
    qcfg = cfg.__class__(**{**cfg.__dict__, "quant_algo": algo, "quant_group_size": group_size,
                            "quant_zero_point": zero_point})  # fmt: skip
    params = init_params(qcfg, jnp.float32, jax.random.key(0), std=0.2)
    fused = fuse_params(params, qcfg)
    layer = fused["layers"][0]
    if not (algo == "W8A16" and group_size):  # [kv_heads, q_per_kv + 2, head_dim, embed], wo_t [embed, ...]
        assert "wqkv" not in layer and "wo" not in layer and "w_down" not in layer
        layer = {name.removesuffix("_t"): w for name, w in layer.items()}
        assert layer["wqkv"].shape == (cfg.num_kv_heads, cfg.q_per_kv + 2, cfg.head_dim, cfg.hidden_size)
        assert layer["wo"].shape == (cfg.hidden_size, cfg.num_heads, cfg.head_dim)
    assert layer["wqkv"].dtype == params["layers"][0]["wq"].dtype and ("wqkv_zero" in layer) == zero_point
    assert layer["wqkv_scale"].shape[-3:] == (cfg.num_kv_heads, cfg.q_per_kv + 2, cfg.head_dim)
    jax.tree.map(np.testing.assert_array_equal, unfuse_params(fused, qcfg), params)
    ids = jnp.asarray([PROMPTS[2]])
    np.testing.assert_allclose(np.asarray(forward_dense(fused, ids, qcfg)), np.asarray(forward_dense(params, ids, qcfg)),
                               atol=1e-5, rtol=0)  # fmt: skip
    if min_group:  # a GPU decode's products (the batch of group dots, summed in another order) input axes last
        np.testing.assert_allclose(np.asarray(forward_dense(fused, ids, qcfg, weight_only_rows=ids.size)),
                                   np.asarray(forward_dense(params, ids, qcfg)), atol=1e-4, rtol=0)  # fmt: skip
    if algo == "FP8":
        lp = dict(params["layers"][0], wq_input_scale=jnp.float32(0.5), wk_input_scale=jnp.float32(2.0))
        fused = fuse_params({**params, "layers": [lp]}, qcfg)["layers"][0]
        assert float(fused["wqkv_input_scale"]) == 2.0 and float(fused["w_gate_up_input_scale"]) == 1.0


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (virtual) devices")
def test_fp8_engine_gives_the_same_tokens_at_every_tp_size_and_after_save(tiny_dir, tmp_path):
    """llama-odd (padded heads and MLP under TP): the FP8 engine at TP=1 and TP=8 (KV heads
    replicated, groups and MLP padded), reloaded on one device from TP=8's LLM.save (the scales
    restored to the checkpoint's layout), and with dummy weights at TP=1 and TP=2 (the same tokens).
    At TP=8 the tokens are TP=1's but at near ties (`_assert_same_greedy_tokens`)."""
    args = dict(dtype="float32", skip_tokenizer_init=True, max_batch_size=4, max_num_tokens=64, quant_config=FP8)
    path = str(tiny_dir("llama-odd"))
    with LLM(model=path, **args) as llm:
        greedy = _greedy(llm)
        tokens = [t for t, _ in greedy]
        assert llm._engine.runner.params["layers"][0]["w_gate_up_t"].dtype == FP8_DTYPE  # input axes last
    with LLM(model=path, tensor_parallel_size=8, **args) as llm:
        assert not llm.tp_plan.is_identity
        _assert_same_greedy_tokens(_greedy(llm), greedy)
        flat = flatten_paths(llm._engine.runner.params)
        # the fp8 weights stored input axes last, their specs permuted alike: wq [D, H, d] -> wq_t [H, d, D]
        for p, spec in {"layers.0.wq_scale": P("tp", None), "layers.0.w_up_scale": P("tp"),
                        "layers.0.wo_scale": P(None), "layers.0.wq_t": P("tp", None, None),
                        "layers.0.w_down_t": P(None, "tp")}.items():  # fmt: skip
            assert flat[p].sharding.spec == spec, p
        llm.save(tmp_path / "fp8")
    with LLM(model=str(tmp_path / "fp8"), dtype="float32", skip_tokenizer_init=True, **SIZES) as llm:
        assert llm.config.quant_algo == "FP8_PER_CHANNEL_PER_TOKEN"
        assert llm._engine.runner.params["layers"][1]["wqkv_t"].dtype == FP8_DTYPE
        assert _tokens(llm) == tokens
    dummy = dict(args, load_format="dummy")
    with LLM(model=path, **dummy) as llm:
        expected = flatten_paths(jax.jit(lambda: init_params(llm.config, jnp.float32, jax.random.key(0)))())
        got = flatten_paths(unfuse_params(llm._engine.runner.params, llm.config))
        assert got.keys() == expected.keys()
        for p, value in expected.items():
            np.testing.assert_array_equal(np.asarray(got[p], np.float32), np.asarray(value, np.float32), err_msg=p)
        dummy_tokens = _tokens(llm)
    with LLM(model=path, tensor_parallel_size=2, **dummy) as llm:
        assert _tokens(llm) == dummy_tokens


CALIBRATION = [[1, 7, 42, 99, 5, 250, 31, 8], list(range(60, 100)), [3, 3, 3, 200, 201, 17]]


@pytest.mark.parametrize("quant_algo", ["FP8", "FP8_PER_CHANNEL_PER_TOKEN"])
def test_modelopt_fp8_checkpoint_gives_transformers_fake_quantized_tokens(quant_algo, tmp_path):
    """A ModelOpt FP8 checkpoint (float8 weights, per-tensor or per-channel weight scales, FP8's
    calibrated static input scales, k/v scales, hf_quant_config.json) read as it is: the engine's
    greedy tokens and logits are transformers' with every projection fake-quantized the same way in
    float32; its KV cache is fp8 as the checkpoint asks (kv_cache_quant_algo FP8), and TP=2 gives
    the same tokens."""
    import torch

    from jaxllm.checkpoints import loader
    from jaxllm.models.transformer import forward_dense
    from tests import tiny

    model = tiny.build_tiny("llama")
    quantized = tiny.save_modelopt_fp8(model, tmp_path / "fp8", quant_algo, CALIBRATION, kv_fp8=False)
    tiny.fake_quantize(model, quantized)
    resolved = loader.resolve(str(tmp_path / "fp8"))
    cfg = loader.read_config(resolved)
    assert cfg.quant_algo == quant_algo
    params = loader.load_params(resolved, cfg, jnp.float32, progress=False)
    assert params["layers"][0]["wq"].dtype == FP8_DTYPE
    assert ("wq_input_scale" in params["layers"][0]) == (quant_algo == "FP8")
    ids = CALIBRATION[1]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = np.asarray(forward_dense(params, jnp.asarray([ids]), cfg))[0]
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    args = dict(dtype="float32", skip_tokenizer_init=True, max_batch_size=4, max_num_tokens=64)
    with LLM(model=str(tmp_path / "fp8"), **args) as llm:
        tokens = _tokens(llm)
        assert llm._engine.runner.kv_dtype == jnp.float32  # the checkpoint's KV is not FP8
    for prompt, out in zip(PROMPTS, tokens):
        assert out == tiny.hf_greedy(model, prompt, 8)
    with LLM(model=str(tmp_path / "fp8"), tensor_parallel_size=2, **args) as llm:
        assert _tokens(llm) == tokens


def test_modelopt_checkpoint_with_excluded_projections(tmp_path):
    """A ModelOpt export whose exclude_modules leave layer projections in bf16 / float beside the
    FP8 ones: they are read float (ModelConfig.quant_exclude), the rest as before; the engine's
    tokens are transformers' fake-quantized the same way. A pattern that names no module of the
    model is refused naming the file."""
    import json

    import torch

    from jaxllm.checkpoints import loader
    from jaxllm.checkpoints.names import CheckpointError
    from jaxllm.models.transformer import forward_dense
    from tests import tiny

    model = tiny.build_tiny("llama")
    exclude = ("model.layers.0.self_attn.v_proj", "model.layers.2.mlp.down_proj")
    quantized = tiny.save_modelopt_fp8(model, tmp_path / "fp8", "FP8", CALIBRATION, kv_fp8=False, exclude=exclude)
    tiny.fake_quantize(model, quantized)
    resolved = loader.resolve(str(tmp_path / "fp8"))
    cfg = loader.read_config(resolved)
    assert cfg.quant_exclude == ("layers.0.wv", "layers.2.w_down")
    params = loader.load_params(resolved, cfg, jnp.float32, progress=False)
    first = params["layers"][0]
    assert first["wv"].dtype == jnp.float32 and "wv_scale" not in first and first["wk"].dtype == FP8_DTYPE
    ids = CALIBRATION[1]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = np.asarray(forward_dense(params, jnp.asarray([ids]), cfg))[0]
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    with LLM(model=str(tmp_path / "fp8"), dtype="float32", skip_tokenizer_init=True, max_batch_size=4,
             max_num_tokens=64) as llm:  # fmt: skip
        for prompt, out in zip(PROMPTS, _tokens(llm)):
            assert out == tiny.hf_greedy(model, prompt, 8)
    quant_file = tmp_path / "fp8" / "hf_quant_config.json"
    data = json.loads(quant_file.read_text())
    data["quantization"]["exclude_modules"].append("model.layers.*.mlp.router")
    quant_file.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"hf_quant_config.json: QuantConfig.exclude_modules pattern "
                                              r"'model.layers.\*.mlp.router' matches no layer projection"):  # fmt: skip
        loader.read_config(loader.resolve(str(tmp_path / "fp8")))


def test_modelopt_kv_cache_scales_divide_what_the_fp8_cache_stores(tmp_path):
    """A ModelOpt checkpoint calibrated for an fp8 KV cache: each layer's k_scale / v_scale are
    read, K / k_scale and V / v_scale stored. A model whose keys are ~1000 (k_proj x 1024, q_proj /
    1024: the same function), with scales (1024, 0.5), computes what the same checkpoint with the
    scales folded into its weights (k_proj / 1024 and q_proj x 1024, v_proj x 2 and o_proj / 2: the
    same cached bytes and products) computes with scales 1; read past, its keys saturate at 448."""
    import torch

    from tests import tiny

    model = tiny.build_tiny("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(1024.0)
            layer.self_attn.q_proj.weight.div_(1024.0)
    algo = "FP8_PER_CHANNEL_PER_TOKEN"  # activations scaled per token: folding a factor changes no rounding
    tiny.save_modelopt_fp8(model, tmp_path / "scaled", algo, CALIBRATION, kv_scales=(1024.0, 0.5))
    tiny.save_modelopt_fp8(model, tmp_path / "folded", algo, CALIBRATION,
                           fold={"k_proj": 1 / 1024, "q_proj": 1024.0, "v_proj": 2.0, "o_proj": 0.5})  # fmt: skip
    tiny.save_modelopt_fp8(model, tmp_path / "unscaled", algo, CALIBRATION)  # scales 1: keys saturate
    args = dict(dtype="float32", skip_tokenizer_init=True, max_batch_size=4, max_num_tokens=64)
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=1)
    outs = {}
    for name in ("scaled", "folded", "unscaled"):
        with LLM(model=str(tmp_path / name), **args) as llm:
            assert llm._engine.runner.kv_dtype == jnp.float8_e4m3fn and llm.config.kv_cache_scales
            assert float(llm._engine.runner.params["layers"][1]["k_scale"]) == (1024.0 if name == "scaled" else 1.0)
            outs[name] = llm.generate(PROMPTS, params, use_tqdm=False)

    def logprob_gap(a, b):
        return max(abs(x[next(iter(x))].logprob - y[next(iter(x))].logprob) if next(iter(x)) in y else 99.0
                   for p, q in zip(a, b) for x, y in zip(p.outputs[0].logprobs, q.outputs[0].logprobs))  # fmt: skip

    assert [o.outputs[0].token_ids for o in outs["scaled"]] == [o.outputs[0].token_ids for o in outs["folded"]]
    assert logprob_gap(outs["scaled"], outs["folded"]) < 1e-3
    assert logprob_gap(outs["unscaled"], outs["folded"]) > 1e-2  # saturated keys: another model
    with LLM(model=str(tmp_path / "scaled"), kv_cache_config={"dtype": "bfloat16"}, **args) as llm:
        assert "k_scale" in llm._engine.runner.params["layers"][0]  # kept, unused by a bf16 cache


def test_modelopt_kv_cache_and_other_quantizations(tmp_path):
    """kv_cache_quant_algo FP8 in hf_quant_config.json gives an fp8 cache unless kv_cache_config
    says otherwise; other tools' quantized checkpoints and other ModelOpt algorithms are refused."""
    import json

    from jaxllm.checkpoints import loader
    from jaxllm.checkpoints.names import CheckpointError
    from tests import tiny

    model = tiny.build_tiny("llama")
    tiny.save_modelopt_fp8(model, tmp_path / "fp8", "FP8", CALIBRATION, kv_fp8=True)
    args = dict(dtype="float32", skip_tokenizer_init=True, max_batch_size=4, max_num_tokens=64)
    with LLM(model=str(tmp_path / "fp8"), **args) as llm:
        assert llm._engine.runner.kv_dtype == jnp.float8_e4m3fn
        assert all(len(t) == 8 for t in _tokens(llm))
    # Random weights in the checkpoint's format (load_format='dummy', as benchmarks load the 8B
    # shape): its static input scales and K/V cache scales too, none of them read from the files.
    resolved = loader.resolve(str(tmp_path / "fp8"))
    cfg = loader.read_config(resolved)
    for params in (loader.load_engine_params(resolved, cfg, jnp.float32, load_format="dummy", progress=False),
                   init_params(cfg, jnp.float32, jax.random.key(0))):  # fmt: skip
        layer = params["layers"][0]
        assert {"k_scale", "v_scale"} <= set(layer) and float(layer["k_scale"]) == 1.0
        assert any(name.endswith("_input_scale") for name in layer)
    quant = json.loads((tmp_path / "fp8" / "hf_quant_config.json").read_text())
    quant["quantization"]["quant_algo"] = "NVFP4"
    (tmp_path / "fp8" / "hf_quant_config.json").write_text(json.dumps(quant))
    with pytest.raises(CheckpointError, match=r"quant_algo='NVFP4' is not supported; allowed: 'FP8', "
                                              r"'FP8_PER_CHANNEL_PER_TOKEN'"):  # fmt: skip
        loader.read_config(loader.resolve(str(tmp_path / "fp8")))
    tiny.save_tiny("llama", tmp_path / "gptq")
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "gptq" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quant_method='gptq' is not supported"):
        LLM(model=str(tmp_path / "gptq"), **args)


def test_w4a16_is_int4_weights_per_group_of_input_channels(tiny_dir, tmp_path):
    """QuantConfig(quant_algo='W4A16', group_size=g[, has_zero_point=True]): int4 (with an offset
    per group) projections with a scale per output channel and group of the last input axis
    (gcd(g, its size) channels; wo's groups inside each head); the product is the float32 einsum
    with the dequantized weight; an engine's tokens survive LLM.save and are the same under tensor
    parallelism (whole groups on each device); widths whose groups cannot be kept and other group
    sizes are refused by name."""
    from jaxllm.layers.linear import dequantize_groups, weight_only_linear
    from jaxllm.quantization import quantize_int, scale_shape

    w = jax.random.normal(jax.random.key(5), (4, 48, 40)) * jnp.logspace(-2, 1, 48).reshape(1, 48, 1)
    q, scale = quantize_int(w, 2, "W4A16", group_size=32)  # wo-like [H, hd, D]: groups of gcd(32, 48) = 16
    assert q.dtype == jnp.int4 and scale.shape == (4, 3, 40) == scale_shape(w.shape, 2, 32)
    back = dequantize_groups(q, scale, 2, jnp.float32)
    steps = jnp.repeat(scale, 16, axis=1)  # each weight's own group scale
    assert float(jnp.max(jnp.abs(back - w) / steps)) <= 0.5 + 1e-5  # within half a step of its group's scale
    x = jax.random.normal(jax.random.key(6), (5, 4, 48))
    np.testing.assert_allclose(np.asarray(weight_only_linear(x, q, scale, "...hk,hkd->...d", 2)),
                               np.asarray(jnp.einsum("thk,hkd->td", x, back, precision="highest")), rtol=1e-5, atol=1e-5)  # fmt: skip
    args = dict(dtype="float32", skip_tokenizer_init=True, max_batch_size=4, max_num_tokens=64,
                quant_config=QuantConfig(quant_algo="W4A16", group_size=32))  # fmt: skip
    path = str(tiny_dir("llama"))  # hidden 64, head_dim 16, MLP 128
    with LLM(model=path, **args) as llm:
        layer = llm._engine.runner.params["layers"][0]
        assert layer["w_down"].dtype == jnp.int4 and layer["w_down_scale"].shape == (4, 64)
        assert layer["wo_scale"].shape == (4, 1, 64) and layer["wqkv_scale"].shape == (2, 2, 4, 16)
        assert llm.config.quant_group_size == 32 and len(_tokens(llm)) == len(PROMPTS)
    # asymmetric groups (has_zero_point): int4 with an offset per group, weights on a 4-bit grid
    # per group (as a GGUF Q4_1 file's are) come back exactly
    from jaxllm.quantization import quantize_int_asymmetric

    levels = jax.random.randint(jax.random.key(7), (64, 24), 0, 16).at[0].set(0).at[1].set(15)  # min and max used
    grid = levels * jnp.linspace(0.01, 0.2, 24) - jnp.linspace(0.5, 1.5, 24)  # [64 in, 24 out]: one group each
    q, scale, zero = quantize_int_asymmetric(grid, 1, 64)
    assert q.dtype == jnp.int4 and scale.shape == zero.shape == (1, 24)
    np.testing.assert_allclose(np.asarray(dequantize_groups(q, scale, 1, jnp.float32, zero)), np.asarray(grid),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    zp = dict(args, quant_config=QuantConfig(quant_algo="W4A16", group_size=32, has_zero_point=True))
    with LLM(model=path, **zp) as llm:
        layer = llm._engine.runner.params["layers"][1]
        assert layer["w_gate_up"].dtype == jnp.int4
        assert layer["w_gate_up_zero"].shape == layer["w_gate_up_scale"].shape == (2, 2, 128)
        assert llm.config.quant_zero_point and len(_tokens(llm)) == len(PROMPTS)
        llm.save(tmp_path / "w4z")
        zp_tokens = _tokens(llm)
    with LLM(model=str(tmp_path / "w4z"), dtype="float32", skip_tokenizer_init=True, **SIZES) as llm:  # int4 as is
        assert (llm.config.quant_algo, llm.config.quant_group_size, llm.config.quant_zero_point) == ("W4A16", 32, True)
        assert _tokens(llm) == zp_tokens
    if len(jax.devices()) >= 8:
        # under tensor parallelism: TP=8 replicates each KV head 4 times, pads the query groups and
        # pads the MLP width 128 to 256 (8 devices x one group of 32), so every device holds whole
        # groups; the same tokens as on one device, and saved at TP=8, the same again on one
        with LLM(model=path, tensor_parallel_size=8, **zp) as llm:
            layer = llm._engine.runner.params["layers"][0]
            assert layer["w_down_scale"].shape == (8, 64) and layer["w_down_scale"].sharding.spec[0] == "tp"
            assert layer["wq_zero"].sharding.spec[1] == "tp"
            assert _tokens(llm) == zp_tokens
            llm.save(tmp_path / "w4z-tp8")
        with LLM(model=str(tmp_path / "w4z-tp8"), dtype="float32", skip_tokenizer_init=True, **SIZES) as llm:
            assert _tokens(llm) == zp_tokens
        with pytest.raises(ValueError, match=r"W4A16 groups of 4 input channels along the MLP width 100 .* "
                                             r"tensor_parallel_size=2: the width would be padded to 104"):  # fmt: skip
            LLM(model=str(tiny_dir("llama-odd")), tensor_parallel_size=2, **args)
    with pytest.raises(ValueError, match="group_size=100 is not supported for W4A16"):
        QuantConfig(quant_algo="W4A16", group_size=100)
    with pytest.raises(ValueError, match="group_size=64 is not supported: it tunes"):
        QuantConfig(quant_algo="W8A16", group_size=64)
    with pytest.raises(ValueError, match="group_size=24 is not supported for W8A16_GPTQ; allowed: a power of two"):
        QuantConfig(quant_algo="W8A16_GPTQ", group_size=24)


def test_w8a16_gptq_is_int8_weights_per_group_with_offsets(tiny_dir, tmp_path):
    """QuantConfig(quant_algo='W8A16_GPTQ', group_size=g, has_zero_point=True): int8 projections
    with a scale and an offset per group (256 levels from the group's minimum: weights on such a
    grid come back exactly, as a GGUF file's 5- to 8-bit blocks do), made from a float checkpoint
    by rounding to nearest; the engine's tokens survive LLM.save and tensor parallelism."""
    from jaxllm.layers.linear import dequantize_groups
    from jaxllm.quantization import quantize_int_asymmetric

    levels = jax.random.randint(jax.random.key(8), (64, 24), 0, 256)
    levels = levels.at[0].set(0).at[1].set(255).at[32].set(0).at[33].set(255)  # each group's min and max used
    grid = levels * jnp.linspace(0.001, 0.02, 24) - jnp.linspace(0.5, 1.5, 24)  # [64 in, 24 out]: groups of 32
    q, scale, zero = quantize_int_asymmetric(grid, 1, 32, "W8A16")
    assert q.dtype == jnp.int8 and scale.shape == zero.shape == (2, 24)
    np.testing.assert_allclose(np.asarray(dequantize_groups(q, scale, 1, jnp.float32, zero)), np.asarray(grid),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    args = dict(dtype="float32", skip_tokenizer_init=True, max_batch_size=4, max_num_tokens=64)
    path = str(tiny_dir("llama"))
    quant = QuantConfig(quant_algo="W8A16_GPTQ", group_size=16, has_zero_point=True)
    with LLM(model=path, quant_config=quant, **args) as llm:
        layer = llm._engine.runner.params["layers"][0]
        assert layer["w_down"].dtype == jnp.int8 and layer["w_down_zero"].shape == layer["w_down_scale"].shape == (8, 64)
        assert (llm.config.quant_algo, llm.config.quant_group_size, llm.config.quant_zero_point) == ("W8A16", 16, True)
        tokens = _tokens(llm)
        llm.save(tmp_path / "w8g")
    with LLM(model=str(tmp_path / "w8g"), dtype="float32", skip_tokenizer_init=True, **SIZES) as llm:
        assert llm._engine.runner.params["layers"][0]["w_down"].dtype == jnp.int8
        assert _tokens(llm) == tokens
    if len(jax.devices()) >= 4:
        with LLM(model=path, quant_config=quant, tensor_parallel_size=4, **args) as llm:
            assert _tokens(llm) == tokens
    with pytest.raises(ValueError, match="has_zero_point=True is not supported: it tunes"):
        QuantConfig(quant_algo="FP8", has_zero_point=True)


def test_w4a16_engine_with_int4_weights_stored_input_axes_last(tiny_dir, monkeypatch):
    """An engine whose W4A16 groups are at least linear.GROUPED_MIN_GROUP channels (here this tiny
    model's groups of 16 and 32 are taken as 128's are) stores its int4 weights input axes last (on
    GPUs; here the switch is set as on GPUs) and gives the tokens of the checkpoint's layout
    (WEIGHT_ONLY_INPUT_LAST off), also at TP=2, where each transposed weight's sharding is permuted
    alike."""
    from jaxllm.layers import linear

    monkeypatch.setattr(linear, "GROUPED_MIN_GROUP", 16)
    monkeypatch.setitem(linear.WEIGHT_ONLY_INPUT_LAST, "int4", True)  # the GPU's layout (None: GPUs only)
    args = dict(dtype="float32", skip_tokenizer_init=True, max_batch_size=4, max_num_tokens=64,
                quant_config=QuantConfig(quant_algo="W4A16", group_size=32, has_zero_point=True))  # fmt: skip
    path = str(tiny_dir("llama"))
    with LLM(model=path, **args) as llm:
        layer = llm._engine.runner.params["layers"][0]
        assert {"wqkv_t", "wo_t", "w_gate_up_t", "w_down_t"} <= set(layer) and layer["w_down_t"].dtype == jnp.int4
        assert layer["w_down_t"].shape == (64, 128) and layer["w_down_scale"].shape == (4, 64)
        tokens = _tokens(llm)
    monkeypatch.setitem(linear.WEIGHT_ONLY_INPUT_LAST, "int4", False)
    with LLM(model=path, **args) as llm:
        assert "w_down" in llm._engine.runner.params["layers"][0]
        assert _tokens(llm) == tokens
    monkeypatch.setitem(linear.WEIGHT_ONLY_INPUT_LAST, "int4", True)
    if len(jax.devices()) >= 2:
        with LLM(model=path, tensor_parallel_size=2, **args) as llm:
            layer = llm._engine.runner.params["layers"][0]
            assert layer["w_down_t"].sharding.spec == P(None, "tp") and layer["wq_t"].sharding.spec[0] == "tp"
            assert _tokens(llm) == tokens


def test_exclude_modules_leaves_projections_in_the_models_dtype(tiny_dir, tmp_path):
    """QuantConfig.exclude_modules (fnmatch patterns over the HF module names): the projections it
    matches stay float (and out of the fused q/k/v when their neighbours are quantized); every
    module excluded is the float engine; the same tokens at TP=8 and after LLM.save (the exclusions
    saved with the config); a pattern matching nothing, or a string, is refused by name."""
    path = str(tiny_dir("llama"))
    args = dict(dtype="float32", skip_tokenizer_init=True, max_batch_size=4, max_num_tokens=64)
    with LLM(model=path, **args) as llm:
        float_tokens = _tokens(llm)
    with LLM(model=path, quant_config=QuantConfig(quant_algo="W8A16", exclude_modules=["*"]), **args) as llm:
        assert len(llm.config.quant_exclude) == 21 and _tokens(llm) == float_tokens
    quant = QuantConfig(quant_algo="W4A16", group_size=32, has_zero_point=True,
                        exclude_modules=["model.layers.0.self_attn.v_proj", "*.mlp.down_proj", "lm_head"])  # fmt: skip
    with LLM(model=path, quant_config=quant, **args) as llm:
        assert llm.config.quant_exclude == ("layers.0.wv", "layers.0.w_down", "layers.1.w_down", "layers.2.w_down")
        first, second = llm._engine.runner.params["layers"][:2]
        assert first["wq"].dtype == jnp.int4 and first["wv"].dtype == jnp.float32 and "wv_scale" not in first
        assert "wqkv" not in first and second["wqkv"].dtype == jnp.int4  # layer 0's q/k/v stored two ways: apart
        assert first["w_down"].dtype == jnp.float32 and first["w_gate_up"].dtype == jnp.int4
        tokens = _tokens(llm)
        llm.save(tmp_path / "excluded")
    with LLM(model=str(tmp_path / "excluded"), **args) as llm:  # the same engine: its programs from the cache
        assert llm.config.quant_exclude[0] == "layers.0.wv" and _tokens(llm) == tokens
    if len(jax.devices()) >= 8:
        with LLM(model=path, quant_config=quant, tensor_parallel_size=8, **args) as llm:
            assert _tokens(llm) == tokens
    with pytest.raises(ValueError, match=r"pattern '\*.q_prj' matches no layer projection of this model; allowed"):
        LLM(model=path, quant_config=QuantConfig(quant_algo="W8A16", exclude_modules=["*.q_prj"]), **args)
    with pytest.raises(ValueError, match="exclude_modules='lm_head' is invalid; allowed: None or a list"):
        QuantConfig(quant_algo="FP8", exclude_modules="lm_head")


@pytest.mark.parametrize("algo,dtype,qmax", [("W8A16", jnp.int8, 127)])
def test_weight_only_is_int_weights_per_channel_and_float_activations(algo, dtype, qmax, tiny_dir, tmp_path):
    """QuantConfig(quant_algo='W8A16' / 'W4A16'): int8 / int4 projections (round to nearest, amax /
    127 or / 7 per output channel), the product the float32 einsum of the input and the dequantized
    weight; an engine's tokens the same with the weights stored input axes last (the GPU's layout:
    linear.stores_input_last), at TP=1 and TP=2 (padded heads and MLP) and after LLM.save."""
    from jaxllm.layers import linear
    from jaxllm.layers.linear import weight_only_linear
    from jaxllm.quantization import quantize_int

    w = jax.random.normal(jax.random.key(3), (48, 4, 8)) * jnp.logspace(-3, 1, 32).reshape(4, 8)
    q, scale = quantize_int(w, 1, algo)
    assert q.dtype == dtype and scale.shape == (4, 8) and int(jnp.abs(q.astype(jnp.int32)).max()) == qmax
    assert float(jnp.max(jnp.abs(q.astype(jnp.float32) * scale - w) / scale)) <= 0.5 + 1e-5  # half a step
    x = jax.random.normal(jax.random.key(4), (5, 48))
    want = jnp.einsum("td,dhk->thk", x, q.astype(jnp.float32) * scale, precision="highest")
    np.testing.assert_allclose(np.asarray(weight_only_linear(x, q, scale, "...d,dhk->...hk")), np.asarray(want),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    args = dict(dtype="float32", skip_tokenizer_init=True, max_batch_size=4, max_num_tokens=64,
                quant_config=QuantConfig(quant_algo=algo))  # fmt: skip
    path = str(tiny_dir("llama-odd"))
    with LLM(model=path, **args) as llm:
        assert llm._engine.runner.params["layers"][0]["w_down"].dtype == dtype  # the CPU's layout
        tokens = _tokens(llm)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(linear.WEIGHT_ONLY_INPUT_LAST, "int8", True)  # the GPU's layout: input axes last
        with LLM(model=path, **args) as llm:
            assert llm._engine.runner.params["layers"][0]["w_down_t"].dtype == dtype
            assert _tokens(llm) == tokens
            llm.save(tmp_path / "w8")
        if len(jax.devices()) >= 2:
            with LLM(model=path, tensor_parallel_size=2, **args) as llm:
                assert llm._engine.runner.params["layers"][0]["w_down_t"].sharding.spec == P(None, "tp")
                assert _tokens(llm) == tokens
    with LLM(model=str(tmp_path / "w8"), dtype="float32", skip_tokenizer_init=True, **SIZES) as llm:
        assert llm.config.quant_algo == algo and _tokens(llm) == tokens
