"""Tiny random checkpoints of every supported family, built with transformers (fixed seed).

Each variant exercises a family's switches: RoPE scalings, tied and untied embeddings, explicit
head_dim, sliding windows, q/k/v biases, q/k norms, Gemma 3's layer pattern and norms.
"""

from __future__ import annotations

from pathlib import Path

VOCAB = 320
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip


def _configs():
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}  # fmt: skip
    return {
        "llama": (LlamaConfig, dict(COMMON, rope_scaling=llama3, rope_theta=500000.0, tie_word_embeddings=False)),
        "llama-linear": (LlamaConfig, dict(COMMON, num_key_value_heads=4, rope_scaling={"rope_type": "linear", "factor": 4.0},
                                           tie_word_embeddings=True)),
        "mistral": (MistralConfig, dict(COMMON, head_dim=24, sliding_window=7)),
        # Sizes no tensor-parallel degree divides: 6 query / 3 KV heads, MLP 100, vocabulary 330.
        "llama-odd": (LlamaConfig, dict(COMMON, hidden_size=48, num_attention_heads=6, num_key_value_heads=3,
                                        intermediate_size=100, vocab_size=330, tie_word_embeddings=True)),
        # Llama-3.1-70B's head layout at a tiny scale: 8 query heads per KV head, 8 KV heads, so TP=4
        # holds 2 KV heads and 16 query heads per device as the 70B model does.
        "llama-70b-shape": (LlamaConfig, dict(COMMON, num_attention_heads=32, num_key_value_heads=8, head_dim=8,
                                              rope_scaling=llama3, rope_theta=500000.0, tie_word_embeddings=False)),
        "qwen2": (Qwen2Config, dict(COMMON, tie_word_embeddings=True)),
        "qwen3": (Qwen3Config, dict(COMMON, head_dim=32, tie_word_embeddings=False)),
        "gemma3": (Gemma3TextConfig, dict(COMMON, head_dim=32, sliding_window=5, query_pre_attn_scalar=24,
                                          layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                          rope_local_base_freq=100.0, rope_theta=10000.0)),
    }  # fmt: skip


FAMILIES = ["llama", "llama-linear", "mistral", "qwen2", "qwen3", "gemma3"]


def build_tiny(name: str, seed: int = 0):
    """A transformers model of the variant, float32, random weights with a wide spread."""
    import torch
    from transformers import AutoModelForCausalLM

    config_class, fields = _configs()[name]
    config = config_class(**fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def save_tiny(name: str, path: Path, seed: int = 0) -> Path:
    model = build_tiny(name, seed)
    model.save_pretrained(str(path), safe_serialization=True)
    return Path(path)


# ---- NVIDIA ModelOpt FP8 checkpoints, as its HF export writes them --------------------------------
FP8_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _fp8_linears(model):
    return {name: module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in FP8_PROJECTIONS}


def save_modelopt_fp8(model, path: Path, quant_algo: str, calibration: list[list[int]], kv_fp8: bool = True,
                      kv_scales: tuple[float, float] = (1.0, 1.0), fold: dict | None = None,
                      exclude: tuple[str, ...] = ()) -> dict:  # fmt: skip
    """Write `model` (a float32 transformers model) as a ModelOpt FP8 checkpoint: each projection's
    weight float8 E4M3 with `weight_scale` (FP8: per tensor []; FP8_PER_CHANNEL_PER_TOKEN: per
    output channel [out, 1]) and, for FP8, `input_scale` [] calibrated as amax / 448 of the
    projection's inputs over `calibration`; k_proj.k_scale / v_proj.v_scale tensors (`kv_scales`);
    hf_quant_config.json. `fold` {projection suffix ('q_proj', ...): factor} multiplies those weight
    scales (the same fp8 weights meaning factor x the weight). `exclude`: module names left float
    (listed in exclude_modules beside lm_head). Returns {module name: (float8 weight, weight scale,
    input scale or None)} for `fake_quantize`."""
    import json

    import torch
    from safetensors.torch import save_file

    linears = {name: m for name, m in _fp8_linears(model).items() if name not in exclude}
    amax = input_amax(model, calibration)[0]
    quantized, state = {}, {k: v.contiguous() for k, v in model.state_dict().items()}
    for name, module in linears.items():
        w = module.weight.detach().float()
        if quant_algo == "FP8":
            scale = w.abs().max() / 448.0
        else:
            scale = w.abs().amax(dim=1, keepdim=True) / 448.0
        w8 = (w / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        input_scale = amax[name] / 448.0 if quant_algo == "FP8" else None
        quantized[name] = (w8, scale, input_scale)
        state[name + ".weight"] = w8
        scale = scale * (fold or {}).get(name.rsplit(".", 1)[-1], 1.0)
        state[name + ".weight_scale"] = scale.reshape(()) if quant_algo == "FP8" else scale
        if input_scale is not None:
            state[name + ".input_scale"] = input_scale.reshape(())
        if name.endswith("k_proj") or name.endswith("v_proj"):
            state[f"{name}.{name[-6]}_scale"] = torch.tensor(kv_scales[0 if name.endswith("k_proj") else 1])
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(path))
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    quant = {"quant_algo": quant_algo, "kv_cache_quant_algo": "FP8" if kv_fp8 else None,
             "exclude_modules": ["lm_head", *exclude]}
    (path / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt", "version": "0.31.0"},
                                                           "quantization": quant}))  # fmt: skip
    return quantized


def _observing_attention(on_kv):
    """An attention implementation for transformers that hands each layer's keys (rotated) and values
    to on_kv(layer, k, v) -> (k, v), then attends as 'sdpa' does."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module, query, key, value, attention_mask, **kwargs):
        key, value = on_kv(module.layer_idx, key, value)
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)

    name = f"observing_{id(on_kv)}"
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def input_amax(model, calibration: list[list[int]]) -> tuple[dict, list, list]:
    """What calibration measures of `model` over the `calibration` token ids, in float32 torch:
    ({projection module name: amax of its input}, [each layer's amax of its rotated keys],
    [... of its values])."""
    import torch

    linears = _fp8_linears(model)
    amax = {name: torch.zeros(()) for name in linears}
    layers = model.config.num_hidden_layers
    k_amax, v_amax = [torch.zeros(())] * layers, [torch.zeros(())] * layers

    def observe(name, x):  # (a hook that returns a value would replace the module's output)
        amax[name] = torch.maximum(amax[name], x.detach().abs().max())

    def on_kv(layer, k, v):
        k_amax[layer] = torch.maximum(k_amax[layer], k.abs().max())
        v_amax[layer] = torch.maximum(v_amax[layer], v.abs().max())
        return k, v

    hooks = [m.register_forward_hook(lambda m, args, out, name=name: observe(name, args[0]))
             for name, m in linears.items()]  # fmt: skip
    implementation = model.config._attn_implementation
    model.config._attn_implementation = _observing_attention(on_kv)
    try:
        with torch.no_grad():
            for ids in calibration:
                model(torch.tensor([ids]))
    finally:
        model.config._attn_implementation = implementation
        for hook in hooks:
            hook.remove()
    return amax, [float(a) for a in k_amax], [float(a) for a in v_amax]


def _fp8_rounded(x, scale):
    """x / scale rounded to float8 E4M3 (saturating at +-448), times scale, in float32 torch."""
    import torch

    return (x / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * scale


def fake_quantize_kv(model, k_scales: list[float], v_scales: list[float]) -> None:
    """Make `model`'s attention read K and V as an fp8 KV cache with these per-layer scales holds
    them: divided by the layer's scale, rounded to float8 E4M3 (saturating at +-448), multiplied back."""
    def on_kv(layer, k, v):
        return _fp8_rounded(k, k_scales[layer]), _fp8_rounded(v, v_scales[layer])

    model.config._attn_implementation = _observing_attention(on_kv)


def fake_quantize(model, quantized: dict) -> None:
    """Make `model`'s projections compute what a ModelOpt FP8 checkpoint means, in float32: the
    dequantized float8 weight times the input rounded to float8 by its static scale (FP8) or by
    its own per-token amax / 448 (FP8_PER_CHANNEL_PER_TOKEN). The reference of an FP8 engine."""

    def forward(x, w8, scale, input_scale, bias):
        s = input_scale if input_scale is not None else (x.abs().amax(dim=-1, keepdim=True) / 448.0).clamp_min(1e-30)
        y = _fp8_rounded(x, s) @ (w8.float() * scale).T
        return y if bias is None else y + bias

    for name, module in _fp8_linears(model).items():
        if name not in quantized:  # left float (exclude_modules)
            continue
        w8, scale, input_scale = quantized[name]
        module.forward = lambda x, w8=w8, scale=scale, s=input_scale, b=module.bias: forward(x, w8, scale, s, b)


def _reference_entry(path: Path) -> Path:
    """Where a GGUF file's transformers references are kept: under the user cache, keyed by the file
    and transformers' version."""
    import transformers

    from jaxllm.checkpoints.builtin import cache_root

    stat = path.stat()
    key = f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}-transformers-{transformers.__version__}"
    entry = cache_root() / "test-references" / key
    entry.parent.mkdir(parents=True, exist_ok=True)
    return entry


def hf_tokenizer_from_gguf(path: Path):
    """transformers' tokenizer of a GGUF file (AutoTokenizer.from_pretrained(gguf_file=...)).

    Its conversion reads the file's metadata with gguf's Python reader (~30 s for Gemma 3's 262k
    tokens on two busy cores): the tokenizer is pickled under the user cache (_reference_entry) and
    unpickled by later workers and runs, the same object (a save_pretrained round trip is not: it
    changes add_bos_token)."""
    import os
    import pickle

    from filelock import FileLock
    from transformers import AutoTokenizer

    path = Path(path)
    entry = _reference_entry(path)
    entry = entry.with_name(entry.name + ".tokenizer.pickle")
    with FileLock(str(entry) + ".lock"):
        try:
            return pickle.loads(entry.read_bytes())
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError):
            pass
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        staging = entry.with_name(entry.name + f".staging-{os.getpid()}")
        staging.write_bytes(pickle.dumps(tok))
        staging.rename(entry)
    return tok


def hf_from_gguf(path: Path):
    """(transformers float32 model, tokenizer) loaded from a GGUF file, as the reference.

    transformers' conversion (dequantizing the file in Python, ~15-35 s a model on two busy cores)
    runs once: its result is saved under the user cache (_reference_entry) and loaded from there by
    every later test worker and run (a lock keeps two workers from converting it at once)."""
    import os
    import shutil

    import torch
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    entry = _reference_entry(path)
    with FileLock(str(entry) + ".lock"):
        if not (entry / "config.json").is_file():
            staging = entry.with_name(entry.name + f".staging-{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            # Its weights are plain float32 tensors by now: saved as an ordinary checkpoint.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(staging)
            hf_tokenizer_from_gguf(path).save_pretrained(staging)
            staging.rename(entry)
    tok = AutoTokenizer.from_pretrained(str(entry))
    model = AutoModelForCausalLM.from_pretrained(str(entry), dtype=torch.float32).eval()
    return model, tok


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, stop_ids=()) -> list[int]:
    """transformers' greedy continuation of one prompt (stops after an id in stop_ids)."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=list(stop_ids) or None, pad_token_id=0)  # fmt: skip
    return out[0, len(prompt_ids) :].tolist()


def hf_logprobs(model, ids: list[int]):
    """[len(ids), vocab] float32 log-probabilities from transformers."""
    import torch

    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1).numpy()


# ---- GGUF files written the way llama.cpp writes them ---------------------------------------
GGUF_ARCH = {"llama": "llama", "qwen3": "qwen3", "gemma3": "gemma3"}
K_QUANT_BLOCK = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}  # bytes per 256 values


def gguf_config(name: str):
    """A tiny config with 256-wide rows, so every GGUF block size (32 and 256) divides them."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen3Config

    base = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    if name == "llama":
        return LlamaConfig(**base, head_dim=64, rope_theta=10000.0, tie_word_embeddings=False)
    if name == "qwen3":
        return Qwen3Config(**base, head_dim=64, tie_word_embeddings=False)
    # GGUF carries no layer pattern or query_pre_attn_scalar: llama.cpp's defaults (every 6th layer
    # global; head_dim) apply, so the model is built with those.
    return Gemma3TextConfig(**base, head_dim=64, sliding_window=4, query_pre_attn_scalar=64)


def random_k_quant_blocks(kind: str, rows: int, cols: int, rng):
    """Random K-quant blocks with small finite scales (the gguf package cannot quantize K types)."""
    import numpy as np

    size = K_QUANT_BLOCK[kind]
    blocks = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
    scale = np.array([0.01], np.float16).view(np.uint8)
    if kind in ("Q4_K", "Q5_K"):  # d and dmin lead the block
        blocks[..., 0:2] = scale
        blocks[..., 2:4] = scale
    else:  # Q6_K: d closes the block
        blocks[..., size - 2 : size] = scale
    return blocks.reshape(rows, -1)


def write_gguf(name: str, model, path: Path, tensor_type: str = "F32", seed: int = 0) -> dict:
    """Write `model` (a transformers model of gguf_config(name)) as a GGUF file.

    2-D weights use `tensor_type` (quantized with the gguf package, or random blocks for K types,
    in which case the file's weights differ from the model's); q/k rows are permuted for "llama"
    and norms stored as 1 + w for Gemma, as llama.cpp does. Returns {gguf name: the float32 array
    the file holds, in Hugging Face layout before those two changes}.
    """
    import gguf
    import numpy as np
    from gguf.quants import dequantize, quantize

    cfg = model.config
    arch = GGUF_ARCH[name]
    rng = np.random.default_rng(seed)
    qtype = gguf.GGMLQuantizationType[tensor_type]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "llama":
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(10000.0)
        writer.add_vocab_size(cfg.vocab_size)
    else:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_rope_freq_base(float(cfg.rope_parameters.get("rope_theta", 1e6)) if arch == "qwen3"
                                  else float(cfg.rope_parameters["full_attention"]["rope_theta"]))  # fmt: skip
        writer.add_vocab_size(cfg.vocab_size)
        if arch == "gemma3":
            writer.add_sliding_window(cfg.sliding_window)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}  # fmt: skip
    layer_names = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "post_attention_norm" if arch == "gemma3" else "ffn_norm",
        "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    }  # fmt: skip
    held = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if hf_name.startswith("model.layers."):
            _, _, layer, rest = hf_name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{layer_names[module]}.{kind}"
        else:
            gguf_name = names[hf_name]
        array = tensor.float().numpy().copy()
        permuted = arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight"))
        heads = cfg.num_attention_heads if "attn_q" in gguf_name else cfg.num_key_value_heads
        stored = _permute(array, heads) if permuted else array
        raw = None
        if array.ndim == 2 and tensor_type != "F32":
            if tensor_type in K_QUANT_BLOCK:
                raw = random_k_quant_blocks(tensor_type, *array.shape, rng)
            else:
                raw = quantize(stored, qtype)
            stored = dequantize(raw, qtype).reshape(array.shape)
        held[gguf_name] = _unpermute(stored, heads) if permuted else stored.copy()
        if arch == "gemma3" and gguf_name.endswith("norm.weight"):
            stored = stored + 1.0
        if raw is not None:
            writer.add_tensor(gguf_name, raw, raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(stored, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def _permute(w, heads):  # llama.cpp's q/k row interleave
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w, heads):
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- PEFT adapters of the tiny models -------------------------------------------------------
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_lora(name: str, rank: int, alpha: float, targets=LORA_MODULES, seed: int = 0, std: float = 0.1, **config):
    """A PEFT LoRA model over the tiny `name`, A and B random (PEFT starts B at zero: no effect)."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_tiny(name), LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_" in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model.eval()


def save_lora(name: str, path: Path, rank: int, alpha: float, targets=LORA_MODULES, seed: int = 0, merge: bool = True,
              **config):  # fmt: skip
    """Save a random LoRA adapter of the tiny `name` at path/adapter and (merge=True) the model it
    merges into at path/merged; returns (adapter dir, merged dir or None, the PEFT model)."""
    import copy

    model = peft_lora(name, rank, alpha, targets, seed, **config)
    model.save_pretrained(str(path / "adapter"))
    if not merge:
        return path / "adapter", None, model
    copy.deepcopy(model).merge_and_unload().save_pretrained(str(path / "merged"), safe_serialization=True)
    return path / "adapter", path / "merged", model


def save_prompt_adapter(name: str, path: Path, num_virtual_tokens: int, seed: int = 0, std: float = 0.5):
    """A PEFT prompt-tuning adapter of the tiny `name` with random embeddings; returns (dir, embeddings [n, D])."""
    import torch
    from peft import PromptTuningConfig, TaskType, get_peft_model

    model = get_peft_model(build_tiny(name), PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                                num_virtual_tokens=num_virtual_tokens))  # fmt: skip
    table = model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(seed)) * std)
    model.save_pretrained(str(path))
    return Path(path), table.detach().float().numpy().copy()
