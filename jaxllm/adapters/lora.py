"""LoRA adapters: what a request names (LoRARequest), how many the engine holds (LoraConfig), and
reading Hugging Face PEFT adapter directories into host arrays (`load_lora_adapter`), and writing
them (`save_lora_adapter`, e.g. for an adapter trained through `forward_dense(..., lora=)`).

TensorRT-LLM's names. An adapter directory holds `adapter_config.json` (peft_type LORA, r,
lora_alpha, use_rslora, target_modules, ...) and `adapter_model.safetensors` with one pair per
adapted module, e.g. `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` [r, in] and
`...lora_B.weight` [out, r]. PEFT computes `W x + scaling * B (A x)` with scaling = alpha / r, or
alpha / sqrt(r) with rsLoRA; the scaling is folded into B here, once, on the host.

Seven projections of the decoder can be adapted (q/k/v/o_proj, gate/up/down_proj). Everything else
a PEFT adapter may carry is refused with an error naming it: LoRA on the embedding or the LM head,
DoRA, LoRA biases, modules_to_save, trainable tokens, target_parameters.

Host layout of one adapted projection, in the checkpoint's (un-padded) engine layout: the base
weight's input axes followed by the rank for A, the rank followed by the output axes for B:
  wq: A [D, r], B [r, H, hd]      wk, wv: A [D, r], B [r, K, hd]      wo: A [H, hd, r], B [r, D]
  w_gate, w_up: A [D, r], B [r, F]                                    w_down: A [F, r], B [r, D]
so the tensor sharing the base weight's split axis (B of column-parallel projections, A of the
row-parallel ones) has that axis where the base weight has it, and the tensor-parallel layout plan
applies to it unchanged (jaxllm/adapters/bank.py). The module names, the file shapes and this layout
come from the checkpoint converter's tables (jaxllm/checkpoints/names.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from jaxllm.adapters.peft import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, read_adapter_config,
                                  read_adapter_tensors)
from jaxllm.checkpoints import names
from jaxllm.config import ModelConfig

LORA_PARAMS = names.PROJECTIONS  # every projection of a decoder layer, in the bank's module order
# HF module name -> (param name in the params pytree, its parent module in a decoder layer).
HF_MODULES = {names.hf_module(param)[1]: (param, names.hf_module(param)[0]) for param in LORA_PARAMS}
# TensorRT-LLM's module names (its default trtllm_modules_to_hf_modules).
TRTLLM_MODULES = {
    "attn_q": "q_proj",
    "attn_k": "k_proj",
    "attn_v": "v_proj",
    "attn_dense": "o_proj",
    "mlp_h_to_4h": "gate_proj",
    "mlp_4h_to_h": "down_proj",
    "mlp_gate": "up_proj",
}
# Input axes of each base weight (the rest are its output axes): wo [H, hd, D] has two.
NUM_INPUT_AXES = {param: names.num_input_axes(param) for param in LORA_PARAMS}
DEFAULT_MAX_LORAS = 4


@dataclasses.dataclass
class LoRARequest:
    """A request's LoRA adapter: a name, a unique non-negative integer id, and its PEFT directory.

    The id identifies the adapter for the LLM's lifetime (caches and KV-cache reuse key on it):
    one id, one directory. 0 is an id like any other (TensorRT-LLM's rule; vLLM wants ids >= 1).
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    lora_ckpt_source: str = "hf"

    def __post_init__(self):
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"LoRARequest.lora_name must be a non-empty str, got {self.lora_name!r}")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 0:
            raise ValueError(f"LoRARequest.lora_int_id={self.lora_int_id!r} is invalid; allowed: an int >= 0")
        if not isinstance(self.lora_path, (str, os.PathLike)) or not os.path.isdir(self.lora_path):
            raise ValueError(f"LoRARequest.lora_path={str(self.lora_path)!r} is not a directory (a PEFT adapter directory)")
        self.lora_path = str(self.lora_path)
        if self.lora_ckpt_source != "hf":
            raise ValueError(f"LoRARequest.lora_ckpt_source={self.lora_ckpt_source!r} is invalid; allowed: 'hf'")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path


def _positive_int(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}.{name}={value!r} is invalid; allowed: an int >= 1")


@dataclasses.dataclass
class LoraConfig:
    """How the engine serves LoRA adapters (`LLM(enable_lora=True, lora_config=LoraConfig(...))`).

    Args:
      lora_dir: adapter directories read (and checked) when the LLM starts; when
        lora_target_modules is empty, the modules they adapt are the ones the engine serves.
      lora_ckpt_source: 'hf' (PEFT directories).
      max_lora_rank: the largest adapter rank served; a larger adapter is refused. Every adapter
        takes this rank on the device (zero-padded).
      lora_target_modules: modules adapters may target, HF names (q_proj, k_proj, v_proj, o_proj,
        gate_proj, up_proj, down_proj) or TensorRT-LLM names (attn_q, attn_k, attn_v, attn_dense,
        mlp_h_to_4h, mlp_gate, mlp_4h_to_h); empty means those of lora_dir, or all seven.
      trtllm_modules_to_hf_modules: overrides of the TensorRT-LLM -> HF name map.
      max_loras: adapters resident on the device at once (default 4); a request whose adapter
        finds no free slot waits until a running request releases one.
      max_cpu_loras: adapters kept loaded in host memory (default max_loras; at least max_loras).
    """

    lora_dir: List[str] = dataclasses.field(default_factory=list)
    lora_ckpt_source: str = "hf"
    max_lora_rank: int = 64
    lora_target_modules: List[str] = dataclasses.field(default_factory=list)
    trtllm_modules_to_hf_modules: Dict[str, str] = dataclasses.field(default_factory=dict)
    max_loras: Optional[int] = None
    max_cpu_loras: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.lora_dir, (str, os.PathLike)):
            self.lora_dir = [self.lora_dir]
        if not isinstance(self.lora_dir, (list, tuple)):
            raise TypeError(f"LoraConfig.lora_dir must be a list of directories, got {type(self.lora_dir).__name__}")
        self.lora_dir = [str(d) for d in self.lora_dir]
        missing = [d for d in self.lora_dir if not os.path.isdir(d)]
        if missing:
            raise ValueError(f"LoraConfig.lora_dir: {missing} are not directories (PEFT adapter directories)")
        if self.lora_ckpt_source != "hf":
            raise ValueError(f"LoraConfig.lora_ckpt_source={self.lora_ckpt_source!r} is invalid; allowed: 'hf'")
        _positive_int("LoraConfig", "max_lora_rank", self.max_lora_rank)
        if self.max_loras is None:
            self.max_loras = DEFAULT_MAX_LORAS
        _positive_int("LoraConfig", "max_loras", self.max_loras)
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        _positive_int("LoraConfig", "max_cpu_loras", self.max_cpu_loras)
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"LoraConfig.max_cpu_loras={self.max_cpu_loras} is invalid; "
                             f"allowed: >= max_loras={self.max_loras}")  # fmt: skip
        if not isinstance(self.trtllm_modules_to_hf_modules, dict):
            raise TypeError("LoraConfig.trtllm_modules_to_hf_modules must be a dict of module names")
        if not isinstance(self.lora_target_modules, (list, tuple)):
            raise TypeError(f"LoraConfig.lora_target_modules must be a list of module names, "
                            f"got {type(self.lora_target_modules).__name__}")  # fmt: skip
        self.lora_target_modules = list(self.lora_target_modules)
        self.target_params()  # validates the names

    def target_params(self) -> tuple[str, ...]:
        """The configured target modules as param names in bank order (empty: not restricted)."""
        names = {**TRTLLM_MODULES, **self.trtllm_modules_to_hf_modules}
        params = set()
        for module in self.lora_target_modules:
            hf_name = names.get(module, module)
            if hf_name not in HF_MODULES:
                raise ValueError(
                    f"LoraConfig.lora_target_modules: {module!r} is not a module jaxllm adapts; allowed: "
                    f"{', '.join(HF_MODULES)} (or TensorRT-LLM's {', '.join(TRTLLM_MODULES)})"
                )
            params.add(HF_MODULES[hf_name][0])
        return tuple(p for p in LORA_PARAMS if p in params)


@dataclasses.dataclass(frozen=True, eq=False)
class LoraAdapter:
    """One adapter's weights on the host, scaling folded into B (layout in the module docstring)."""

    adapter_id: int
    path: str
    rank: int  # the largest rank of its modules
    layers: tuple  # per layer: {param name: (A, B)} float32 numpy, only the modules it adapts

    @property
    def target_params(self) -> tuple[str, ...]:
        present = {name for layer in self.layers for name in layer}
        return tuple(p for p in LORA_PARAMS if p in present)


# What `adapter_config.json` may say only at its default value (field -> why it is refused).
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) is not supported",
    "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
    "lora_bias": "LoRA biases (lora_bias) are not supported",
    "target_parameters": "LoRA on parameters (target_parameters) is not supported",
    "trainable_token_indices": "trainable tokens (trainable_token_indices) are not supported",
    "layer_replication": "layer_replication is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_qalora": "QA-LoRA (use_qalora) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
}
_PARENTS = "|".join(dict.fromkeys(parent for _, parent in HF_MODULES.values()))  # self_attn|mlp
_KEY = re.compile(rf"base_model\.model\.((?:model\.)?layers\.(\d+)\.({_PARENTS})\.(\w+))\.lora_([AB])\.weight")


def _module_names(cfg: ModelConfig, prefix: str) -> list[tuple[int, str, str]]:
    """(layer, HF module name, full module path) of every projection LoRA may adapt."""
    return [(i, hf, f"{prefix}layers.{i}.{parent}.{hf}") for i in range(cfg.num_layers)
            for hf, (_, parent) in HF_MODULES.items()]  # fmt: skip


def _targeted(config: dict, full: str) -> bool:
    """PEFT's rule for whether module `full` is adapted (target_modules, exclude_modules, layers)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, full):
                return False
        elif full in exclude or any(full.endswith("." + e) for e in exclude):
            return False
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, full) is not None
    if not (full in targets or any(full.endswith("." + t) for t in targets)):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    pattern = config.get("layers_pattern")
    patterns = [pattern] if isinstance(pattern, str) else (pattern or [])
    match = None
    for p in patterns or [None]:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\." if p is None else rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", full)
        if match:
            break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def _pattern_value(patterns: dict, full: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the module's name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", full):
            return value
    return default


def _check_config(config: dict, path: Path) -> None:
    where = f"{path / ADAPTER_CONFIG}"
    for field, why in _UNSUPPORTED.items():
        value = config.get(field)
        if value not in (None, False, [], {}, ""):
            raise AdapterError(f"{where}: {field}={value!r}: {why}; jaxllm serves plain LoRA on "
                               f"{', '.join(HF_MODULES)}")  # fmt: skip
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{where}: bias={config['bias']!r}: trained biases are not supported; allowed: 'none'")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"{where}: r={rank!r} is invalid; allowed: an int >= 1")
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise AdapterError(f"{where}: lora_alpha={alpha!r} is invalid; allowed: a number")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if targets != "all-linear":
            try:
                pattern = re.compile(targets)
            except re.error as e:
                raise AdapterError(f"{where}: target_modules={targets!r} is not a valid regular expression "
                                   f"({e})") from None
            for other in ("model.embed_tokens", "lm_head", "embed_tokens"):
                if pattern.fullmatch(other):
                    raise AdapterError(f"{where}: target_modules={targets!r} matches {other!r}: LoRA on the "
                                       f"embedding or the LM head is not supported; allowed: "
                                       f"{', '.join(HF_MODULES)}")  # fmt: skip
    elif isinstance(targets, (list, tuple)) and targets:
        for target in targets:
            if not isinstance(target, str) or target.rsplit(".", 1)[-1] not in HF_MODULES:
                raise AdapterError(f"{where}: target_modules names {target!r}, which jaxllm cannot adapt; "
                                   f"allowed: {', '.join(HF_MODULES)} (or full paths to them)")  # fmt: skip
    else:
        raise AdapterError(f"{where}: target_modules={targets!r} is invalid; allowed: a list of module names or a "
                           "regex")


def _read_modules(path: Path, tensors: dict, cfg: ModelConfig) -> tuple[dict, dict]:
    """The adapter's tensors by module: ({(layer, HF module name): {"A": lora_A, "B": lora_B}},
    {(layer, HF module name): its full module path}); refuses any tensor of another kind."""
    found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    full_names: dict[tuple[int, str], str] = {}
    for key, array in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            what = ("LoRA on the embedding" if "embed" in key else "LoRA on the LM head" if "lm_head" in key
                    else "DoRA" if "magnitude" in key else "a module jaxllm cannot adapt")  # fmt: skip
            raise AdapterError(f"{path / ADAPTER_WEIGHTS}: tensor {key!r} is {what}; allowed: lora_A / lora_B of "
                               f"{', '.join(HF_MODULES)} in the decoder layers")  # fmt: skip
        full, layer, parent, hf_name, ab = match.groups()
        layer = int(layer)
        if hf_name not in HF_MODULES or HF_MODULES[hf_name][1] != parent:
            raise AdapterError(f"{path / ADAPTER_WEIGHTS}: tensor {key!r} adapts {parent}.{hf_name}, which jaxllm "
                               f"cannot adapt; allowed: {', '.join(HF_MODULES)}")  # fmt: skip
        if layer >= cfg.num_layers:
            raise AdapterError(f"{path / ADAPTER_WEIGHTS}: tensor {key!r} is for layer {layer}; the model has "
                               f"{cfg.num_layers} layers")  # fmt: skip
        found.setdefault((layer, hf_name), {})[ab] = array
        full_names[(layer, hf_name)] = full
    return found, full_names


def _check_modules(path: Path, config: dict, cfg: ModelConfig, found: dict, full_names: dict,
                   allowed: tuple[str, ...]) -> dict:  # fmt: skip
    """Check that the adapter holds both tensors of exactly the modules its config targets, all of
    them modules the engine serves; returns {(layer, HF module name): full module path} of those."""
    prefix = "model." if any(name.startswith("model.") for name in full_names.values()) else ""
    expected = {(i, hf): full for i, hf, full in _module_names(cfg, prefix) if _targeted(config, full)}
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise AdapterError(f"{path}: {ADAPTER_WEIGHTS} adapts {full_names[unexpected[0]]}, which target_modules "
                           f"({config.get('target_modules')!r}) does not name")  # fmt: skip
    missing = [expected[k] + f".lora_{ab}" for k in sorted(expected) for ab in "AB" if ab not in found.get(k, {})]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise AdapterError(f"{path}: {ADAPTER_WEIGHTS} lacks the tensors of {shown}")
    if not found:
        raise AdapterError(f"{path}: {ADAPTER_WEIGHTS} holds no LoRA tensors")
    adapted = [hf for hf in HF_MODULES if any(key[1] == hf for key in found)]
    refused = [hf for hf in adapted if HF_MODULES[hf][0] not in allowed]
    if refused:
        raise AdapterError(f"{path}: the adapter targets {', '.join(refused)}, but the engine serves LoRA on "
                           f"{', '.join(h for h, (p, _) in HF_MODULES.items() if p in allowed)} only "
                           "(LoraConfig.lora_target_modules)")  # fmt: skip
    return expected


def load_lora_adapter(path: str | Path, cfg: ModelConfig, max_rank: int, allowed: tuple[str, ...] = LORA_PARAMS,
                      adapter_id: int = 0) -> LoraAdapter:  # fmt: skip
    """Read and check a PEFT LoRA directory against the model it will adapt.

    Args:
      path: the PEFT directory.
      cfg: the checkpoint's model config (not the tensor-parallel padded one).
      max_rank: LoraConfig.max_lora_rank; a module of larger rank is refused.
      allowed: param names the engine's bank holds; an adapter of any other module is refused.
      adapter_id: the LoRARequest's lora_int_id (what the caches key on).
    Returns:
      the LoraAdapter, float32, scaling folded into B.
    Raises:
      AdapterError (a ValueError): anything jaxllm cannot serve exactly, with the file and the value.
    """
    path = Path(path)
    config = read_adapter_config(path, "LORA")
    _check_config(config, path)
    found, full_names = _read_modules(path, read_adapter_tensors(path), cfg)
    expected = _check_modules(path, config, cfg, found, full_names, allowed)
    order = list(HF_MODULES)
    layers: list[dict] = [{} for _ in range(cfg.num_layers)]
    top_rank = 0
    for (layer, hf_name), pair in sorted(found.items(), key=lambda item: (item[0][0], order.index(item[0][1]))):
        param = HF_MODULES[hf_name][0]
        full = expected[(layer, hf_name)]
        rank = int(_pattern_value(config.get("rank_pattern") or {}, full, config["r"]))
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, full, config["lora_alpha"]))
        if rank > max_rank:
            raise AdapterError(f"{path}: rank {rank} of {full} exceeds max_lora_rank={max_rank}; allowed: ranks <= "
                               f"{max_rank} (raise LoraConfig.max_lora_rank)")  # fmt: skip
        want_a, want_b = names.lora_file_shapes(cfg, param, rank)
        for ab, want in (("A", want_a), ("B", want_b)):
            if tuple(pair[ab].shape) != want:
                raise AdapterError(f"{path}: {full}.lora_{ab} has shape {tuple(pair[ab].shape)}; this model "
                                   f"(rank {rank}) needs {want}")  # fmt: skip
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        a = pair["A"].astype(np.float32)
        b = pair["B"].astype(np.float32) * np.float32(scaling)
        layers[layer][param] = names.lora_to_params(cfg, param, a, b)
        top_rank = max(top_rank, rank)
    return LoraAdapter(adapter_id=adapter_id, path=str(path), rank=top_rank, layers=tuple(layers))


def save_lora_adapter(path: str | Path, cfg: ModelConfig, layers, *, lora_alpha: float | None = None,
                      base_model_name_or_path: str | None = None) -> Path:  # fmt: skip
    """Write a LoRA adapter as a PEFT directory (adapter_config.json, adapter_model.safetensors) that
    `load_lora_adapter`, `LoRARequest` and PEFT's `PeftModel.from_pretrained` read.

    Args:
      path: the directory (created; files in it are overwritten).
      cfg: the checkpoint's model config (the one `LLM(...).config` and `forward_dense` use).
      layers: per decoder layer, {param name (wq, wk, wv, wo, w_gate, w_up, w_down): (A, B)} in params
        layout, A [*input axes, r] and B [r, *output axes], scaling folded into B: the layout of
        `LoraAdapter.layers` and of `forward_dense(..., lora=)`. Every pair has the same rank r.
      lora_alpha: written to the config; B is saved divided by the scaling alpha / r, so that reading
        the directory back (which multiplies by alpha / r) gives B again. Default r (scaling 1).
      base_model_name_or_path: recorded in the config for PEFT (optional).
    Returns:
      the directory's Path.
    Raises:
      ValueError: a layer count, param name or shape that does not fit `cfg`, mixed ranks, or no pair.
    """
    from safetensors.numpy import save_file

    layers = list(layers)
    if len(layers) != cfg.num_layers:
        raise ValueError(f"save_lora_adapter: {len(layers)} layers given; the model has {cfg.num_layers}")
    tensors: dict[str, np.ndarray] = {}
    adapted: dict[int, list[str]] = {}
    ranks = set()
    for i, layer in enumerate(layers):
        for param, pair in layer.items():
            if param not in LORA_PARAMS:
                raise ValueError(f"save_lora_adapter: layer {i} has {param!r}, which jaxllm cannot adapt; "
                                 f"allowed: {', '.join(LORA_PARAMS)}")  # fmt: skip
            a, b = (np.asarray(t, dtype=np.float32) for t in pair)
            lora_a, lora_b = names.lora_from_params(cfg, param, a, b)
            ranks.add(lora_a.shape[0])
            parent, module = names.hf_module(param)
            adapted.setdefault(i, []).append(module)
            tensors[f"base_model.model.model.layers.{i}.{parent}.{module}.lora_A.weight"] = lora_a
            tensors[f"base_model.model.model.layers.{i}.{parent}.{module}.lora_B.weight"] = lora_b
    if not tensors:
        raise ValueError("save_lora_adapter: no LoRA pair given (every layer's dict is empty)")
    if len(ranks) > 1:
        raise ValueError(f"save_lora_adapter: pairs of ranks {sorted(ranks)}; allowed: one rank for every pair")
    rank = ranks.pop()
    alpha = float(rank if lora_alpha is None else lora_alpha)
    if not math.isfinite(alpha) or alpha == 0:
        raise ValueError(f"save_lora_adapter: lora_alpha={lora_alpha!r} is invalid; allowed: a finite non-zero number")
    scaling = np.float32(alpha / rank)
    for key in tensors:
        if key.endswith("lora_B.weight"):
            tensors[key] = np.ascontiguousarray(tensors[key] / scaling)
    module_sets = {tuple(modules) for modules in adapted.values()}
    if len(module_sets) == 1:  # the same modules in every adapted layer: names, and the layers if not all
        targets: list[str] = list(module_sets.pop())
        layer_list = sorted(adapted) if len(adapted) < cfg.num_layers else None
    else:  # full module paths (PEFT matches them by suffix)
        targets = [f"model.layers.{i}.{names.hf_module(HF_MODULES[m][0])[0]}.{m}"
                   for i, modules in sorted(adapted.items()) for m in modules]  # fmt: skip
        layer_list = None
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": targets,
        "layers_to_transform": layer_list,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return path
