"""One entry for every checkpoint form: resolve what `model=` names, read its config, load its weights.

`LLM(model=...)` accepts a built-in name, a local Hugging Face directory (single or sharded
safetensors), a `.gguf` file, a directory jaxllm saved, or a Hugging Face Hub id. Weights are read
one tensor at a time and placed on the device(s) by a caller-given function, so that a sharded
engine puts each tensor straight into its shards. A quantized engine (ModelConfig.quant_algo) reads
a float checkpoint and quantizes each layer projection on its device(s) as it is placed
(jaxllm/quantization.py), so the float model is never whole in memory.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxllm.checkpoints import builtin, gguf, hf, hub, saved
from jaxllm.checkpoints.hf import PICKLE_ERROR, PICKLE_SUFFIXES
from jaxllm.checkpoints.names import CheckpointError
from jaxllm.config import ModelConfig
from jaxllm.models.params import abstract_params, flatten_paths, unflatten_paths
from jaxllm.quantization import QUANTIZED_PARAMS, SCALE_SUFFIX, base_config, is_quantized, quantize_fp8


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    kind: str  # hf | gguf | saved
    path: Path  # the directory, or the .gguf file
    source: str  # what the user passed

    @property
    def directory(self) -> Path:
        return self.path.parent if self.kind == "gguf" else self.path


def resolve(model: str | Path, revision: str | None = None) -> ResolvedModel:
    """Find the checkpoint that `model` names.

    Raises:
      FileNotFoundError: nothing by that name (local path, built-in, hub or cache).
      CheckpointError: a pickled checkpoint, which is refused.
      TypeError: `model` is not a string or path.
    """
    if not isinstance(model, (str, Path)):
        raise TypeError(f"model must be a str or path, got {type(model).__name__}")
    text = str(model)
    if not text:
        raise ValueError("model must not be empty")
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix == ".gguf":
                return ResolvedModel("gguf", path, text)
            if path.suffix in PICKLE_SUFFIXES:
                raise CheckpointError(PICKLE_ERROR.format(path=path, src=path.parent))
            raise ValueError(f"{path}: not a checkpoint jaxllm reads (a .gguf file or a directory)")
        if saved.is_saved_directory(path):
            return ResolvedModel("saved", path, text)
        if hf.is_hf_directory(path):
            return ResolvedModel("hf", path, text)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModel("gguf", ggufs[0], text)
        raise FileNotFoundError(
            f"{path}: neither a Hugging Face directory (config.json), a jaxllm directory "
            f"({saved.CONFIG_FILE}), nor a directory holding one .gguf file"
        )
    name = builtin.builtin_name(text)
    if name is not None:
        return ResolvedModel("gguf", builtin.fetch(name), text)
    if hub.looks_like_hub_id(text):
        return ResolvedModel("hf", hub.resolve_hub_id(text, revision), text)
    raise FileNotFoundError(
        f"model {text!r} is not a local path, not a built-in model ({', '.join(builtin.BUILTIN_MODELS)}), "
        "and not a Hugging Face Hub id (org/name)"
    )


def read_config(resolved: ResolvedModel) -> ModelConfig:
    if resolved.kind == "gguf":
        return gguf.read_config(resolved.path)
    if resolved.kind == "saved":
        return saved.read_config(resolved.path)[0]
    return hf.read_config(resolved.path)


def iter_tensors(resolved: ResolvedModel, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(param path, numpy array in params layout) for every parameter of a hf or gguf checkpoint."""
    if resolved.kind == "gguf":
        return gguf.load_gguf_tensors(resolved.path, cfg)
    if resolved.kind == "hf":
        return hf.load_hf_tensors(resolved.path, cfg)
    raise ValueError(f"iter_tensors reads hf and gguf checkpoints, not {resolved.kind!r}")


Placer = Callable[[str, np.ndarray], jax.Array]


def _bar(resolved: ResolvedModel, cfg: ModelConfig, dtype, progress: bool):
    """A progress bar over the weights' bytes (a count of tensors misleads: the first ones are the
    largest), shown only if loading takes over a second."""
    leaves = flatten_paths(abstract_params(base_config(cfg), dtype)).values()
    total = sum(int(np.prod(a.shape)) * jnp.dtype(dtype).itemsize for a in leaves)
    return tqdm(total=total, desc=f"loading {resolved.path.name}", unit="B", unit_scale=True, disable=None if progress else True,
                leave=False, delay=1.0)  # fmt: skip


def quantizer(cfg: ModelConfig, shardings: dict | None = None) -> Callable[[str, jax.Array], dict]:
    """(path, a placed float tensor) -> {path: tensor, ...}: under cfg.quant_algo a layer projection
    becomes its FP8 weight and its scales, computed on the tensor's device(s) (laid out by the flat
    `shardings` when given); anything else is kept as it is."""
    programs = {}

    def quantize(path: str, w: jax.Array) -> dict:
        if not is_quantized(path, cfg.quant_algo):
            return {path: w}
        name = path.rsplit(".", 1)[-1]
        out = None if shardings is None else (shardings[path], shardings[path + SCALE_SUFFIX])
        fn = programs.get((name, out))
        if fn is None:
            fn = programs[(name, out)] = jax.jit(functools.partial(quantize_fp8, num_input_axes=QUANTIZED_PARAMS[name]),
                                                 out_shardings=out)  # fmt: skip
        q, scale = fn(w)
        w.delete()
        return {path: q, path + SCALE_SUFFIX: scale}

    return quantize


def default_placer(dtype) -> Placer:
    np_dtype = np.dtype(jnp.dtype(dtype))

    def place(path: str, array: np.ndarray) -> jax.Array:
        return jax.device_put(np.asarray(array).astype(np_dtype, copy=False))

    return place


def load_params(
    resolved: ResolvedModel,
    cfg: ModelConfig,
    dtype,
    place: Placer | None = None,
    shardings=None,
    progress: bool = True,
) -> dict:
    """Read every weight of the checkpoint into a params pytree on the device(s).

    Args:
      place: puts one converted numpy tensor on the device(s) (default: the default device).
      shardings: for saved (orbax) directories, a pytree of shardings like the params (or None).
    """
    if resolved.kind == "saved":
        abstract = abstract_params(cfg, dtype)
        if shardings is None:  # the default device (not the layout it was saved from: a TP engine's)
            shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        params = saved.restore_params(resolved.path, abstract)
        return jax.tree.map(lambda x, a: x.astype(a.dtype), params, abstract)
    place = place or default_placer(dtype)
    quantize = quantizer(cfg)
    flat = {}
    with _bar(resolved, cfg, dtype, progress) as bar:
        for path, array in iter_tensors(resolved, base_config(cfg)):
            placed = place(path, array)
            bar.update(placed.nbytes)
            flat.update(quantize(path, placed))
    return unflatten_paths(flat, cfg)


def _dummy_params(cfg: ModelConfig, engine_cfg: ModelConfig, dtype, seed: int, plan, shardings,
                  cache_dir=None) -> dict:  # fmt: skip
    """The checkpoint's random weights (load_format='dummy') in the engine's layout: the same values
    at every TP size. One small program per distinct parameter kind, reused by every layer (one
    program for the whole model takes minutes to compile on the GPU), kept in the program cache
    (`cache_dir`, engine/executables.py) like the engine's."""
    from jaxllm.engine.executables import CompileCache, compile_cached
    from jaxllm.models.params import init_param, param_keys, param_specs
    from jaxllm.quantization import quantize_path

    base = base_config(cfg)  # a quantized model's are the float model's weights, quantized
    keys = param_keys(base, jax.random.key(seed))
    cache = CompileCache(cache_dir) if cache_dir is not None else None
    flat_shardings = flatten_paths(shardings) if shardings is not None else {}
    programs, flat = {}, {}
    for path, spec in flatten_paths(param_specs(base)).items():
        name, quantized = path.rsplit(".", 1)[-1], is_quantized(path, cfg.quant_algo)
        sharding = flat_shardings.get(path)
        if quantized and sharding is not None:
            sharding = {path: sharding, path + SCALE_SUFFIX: flat_shardings[path + SCALE_SUFFIX]}
        make = programs.get((name, spec, str(sharding)))
        if make is None:

            def one(key, spec=spec, path=path, quantized=quantized):
                w = init_param(spec, key, dtype)
                w = w if plan is None else plan.transform(path, w, xp=jnp)
                return tuple(quantize_path(path, w).values()) if quantized else w

            out = tuple(sharding.values()) if isinstance(sharding, dict) else sharding
            lowered = jax.jit(one, out_shardings=out).lower(keys[path])
            # (Under a mesh they compile each time: a cached program would load for the default device.)
            make = programs[(name, spec, str(sharding))] = compile_cached(lowered, cache if out is None else None)
        made = make(keys[path])
        flat.update({path: made[0], path + SCALE_SUFFIX: made[1]} if quantized else {path: made})
    return unflatten_paths(flat, engine_cfg)


def load_engine_params(resolved: ResolvedModel, cfg: ModelConfig, dtype, plan=None, mesh=None,
                       load_format: str = "auto", seed: int = 0, progress: bool = True,
                       cache_dir=None) -> dict:  # fmt: skip
    """Weights in the engine's layout: placed straight into their shards when a mesh is given.

    Args:
      cfg: the checkpoint's config.
      plan: a jaxllm.sharding.TPPlan (None: one device); tensors are padded/replicated by it.
      mesh: the tensor-parallel mesh (None: the default device).
      load_format: 'auto' reads the checkpoint; 'dummy' makes random weights on the device(s).
    """
    from jaxllm import sharding as sharding_lib
    engine_cfg = plan.engine_config(cfg) if plan is not None else cfg
    shardings = sharding_lib.param_shardings(engine_cfg, mesh) if mesh is not None else None
    if load_format == "dummy":
        return _dummy_params(cfg, engine_cfg, dtype, seed, plan, shardings, cache_dir)
    if mesh is None:
        return load_params(resolved, cfg, dtype, progress=progress)
    if resolved.kind == "saved" and plan.is_identity:
        return load_params(resolved, cfg, dtype, shardings=shardings, progress=progress)
    np_dtype = np.dtype(jnp.dtype(dtype))
    flat_shardings = flatten_paths(shardings)

    def place(path: str, array: np.ndarray, keep_dtype: bool = False) -> jax.Array:
        array = np.asarray(array)
        array = plan.transform(path, array if keep_dtype else array.astype(np_dtype, copy=False))
        return sharding_lib.place_global(array, flat_shardings[path])

    if resolved.kind == "saved":  # restore on the host, then lay out for the mesh (quantized leaves as they are)
        host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        params = load_params(resolved, cfg, dtype, shardings=jax.tree.map(lambda _: host, abstract_params(cfg, dtype)))
        flat = {path: place(path, np.asarray(x), keep_dtype=x.dtype != dtype)
                for path, x in flatten_paths(params).items()}  # fmt: skip
        return unflatten_paths(flat, engine_cfg)
    quantize = quantizer(engine_cfg, flat_shardings)
    flat = {}
    with _bar(resolved, cfg, dtype, progress) as bar:
        for path, array in iter_tensors(resolved, base_config(cfg)):
            flat.update(quantize(path, place(path, array)))
            bar.update(array.size * np.dtype(np_dtype).itemsize)
    return unflatten_paths(flat, engine_cfg)


__all__ = ["CheckpointError", "ResolvedModel", "resolve", "read_config", "iter_tensors", "load_params",
           "load_engine_params"]
