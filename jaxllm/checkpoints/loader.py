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
from jaxllm.models.params import (abstract_params, flatten_paths, fuse_params, param_specs, transpose_params,
                                 unflatten_paths)  # fmt: skip
from jaxllm.quantization import IntGroups, base_config, quantize_path, quantized_paths, quantizes


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


def iter_tensors(resolved: ResolvedModel, cfg: ModelConfig, quantized: ModelConfig | None = None,
                 only: Callable[[str], bool] | None = None
                 ) -> Iterator[tuple[str, np.ndarray | IntGroups]]:  # fmt: skip
    """(param path, numpy array in params layout) for every parameter of a hf or gguf checkpoint (with
    `only`, a predicate on param paths, for those alone: no other tensor is read); with `quantized`
    (the engine's config), a GGUF projection whose blocks serve its groups comes as an IntGroups
    (checkpoints/gguf.py)."""
    if resolved.kind == "gguf":
        return gguf.load_gguf_tensors(resolved.path, cfg, quantized, only)
    if resolved.kind == "hf":
        return hf.load_hf_tensors(resolved.path, cfg, only)
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
        if not quantizes(path, cfg):
            return {path: w}
        name, made = path.rsplit(".", 1)[-1], quantized_paths(path, cfg)
        out = None if shardings is None else tuple(shardings[p] for p in made)
        fn = programs.get((name, out))
        if fn is None:
            quantize_one = functools.partial(quantize_path, path, cfg=cfg)
            fn = programs[(name, out)] = jax.jit(lambda w: tuple(quantize_one(w).values()), out_shardings=out)
        arrays = fn(w)
        w.delete()
        return dict(zip(made, arrays))

    return quantize


def stored_dtypes(cfg: ModelConfig, dtype) -> Callable[[str], np.dtype]:
    """path -> the numpy dtype a tensor of `cfg` is placed in: `dtype`, or the one its spec names (a
    pre-quantized checkpoint's float8 weights and float32 scales)."""
    own = {p: np.dtype(s.dtype) for p, s in flatten_paths(param_specs(cfg)).items() if s.dtype is not None}
    default = np.dtype(jnp.dtype(dtype))
    return lambda path: own.get(path, default)


def checkpoint_config(resolved: ResolvedModel, cfg: ModelConfig) -> ModelConfig:
    """The config the checkpoint's tensors are read with: `cfg` for a pre-quantized (ModelOpt)
    checkpoint, else its float twin (an engine's quantized weights are made as they load)."""
    return cfg if resolved.kind == "hf" and hf.quantization_of(resolved.path) is not None else base_config(cfg)


def default_placer(dtype, cfg: ModelConfig | None = None) -> Placer:
    """Puts a tensor on the default device in `dtype` (or, with `cfg`, the dtype its spec names)."""
    dtype_of = stored_dtypes(cfg, dtype) if cfg is not None else (lambda path, d=np.dtype(jnp.dtype(dtype)): d)

    def place(path: str, array: np.ndarray) -> jax.Array:
        return jax.device_put(np.asarray(array).astype(dtype_of(path), copy=False))

    return place


def read_float_params(resolved: ResolvedModel, cfg: ModelConfig, dtype, only: Callable[[str], bool],
                      load_format: str = "auto", seed: int = 0) -> dict[str, jax.Array]:  # fmt: skip
    """{path: array on the default device} of the float model `cfg`'s params whose paths `only`
    accepts ("layers.3.wq"): read from a hf or gguf checkpoint (no other tensor is read), or with
    load_format 'dummy' the random weights load_engine_params makes (the same keys)."""
    from jaxllm.models.params import init_param, param_keys

    if load_format == "dummy":
        keys = param_keys(cfg, jax.random.key(seed))
        return {path: init_param(spec, keys[path], dtype) for path, spec in flatten_paths(param_specs(cfg)).items()
                if only(path)}  # fmt: skip
    place = default_placer(dtype, cfg)
    return {path: place(path, array) for path, array in iter_tensors(resolved, cfg, only=only)}


def _with_scales(flat: dict, scales: dict | None, shardings: dict | None = None) -> dict:
    """`flat` with calibrated static scales (jaxllm/calibration.py: path -> value) in place of the
    quantizer's placeholder input scales (1), and as the K/V cache scales a float checkpoint lacks;
    each a float32 scalar on the device(s) its `shardings` entry names (default: the default device)."""
    for path, value in (scales or {}).items():
        flat[path] = jax.device_put(np.float32(value), (shardings or {}).get(path))
    return flat


def load_params(
    resolved: ResolvedModel,
    cfg: ModelConfig,
    dtype,
    place: Placer | None = None,
    shardings=None,
    progress: bool = True,
    scales: dict | None = None,
) -> dict:
    """Read every weight of the checkpoint into a params pytree on the device(s).

    Args:
      place: puts one converted numpy tensor on the device(s) (default: the default device).
      shardings: for saved (orbax) directories, a pytree of shardings like the params (or None).
      scales: calibrated static scales of a float checkpoint (jaxllm/calibration.py), path -> value.
    """
    if resolved.kind == "saved":
        abstract = abstract_params(cfg, dtype)
        if shardings is None:  # the default device (not the layout it was saved from: a TP engine's)
            shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        params = saved.restore_params(resolved.path, abstract)
        return jax.tree.map(lambda x, a: x.astype(a.dtype), params, abstract)
    read_cfg = checkpoint_config(resolved, cfg)
    place = place or default_placer(dtype, read_cfg)
    quantize = quantizer(cfg if read_cfg is not cfg else base_config(cfg))
    flat = {}
    with _bar(resolved, cfg, dtype, progress) as bar:
        for path, array in iter_tensors(resolved, read_cfg, cfg):
            if isinstance(array, IntGroups):  # already quantized: placed as it is
                flat.update({p: jax.device_put(a) for p, a in array.params(path, cfg).items()})
                bar.update(array.q.size * np.dtype(jnp.dtype(dtype)).itemsize)
                continue
            placed = place(path, array)
            bar.update(placed.nbytes)
            flat.update(quantize(path, placed))
    return unflatten_paths(_with_scales(flat, scales), cfg)


def _dummy_params(cfg: ModelConfig, engine_cfg: ModelConfig, dtype, seed: int, plan, shardings,
                  cache_dir=None, scales: dict | None = None) -> dict:  # fmt: skip
    """The checkpoint's random weights (load_format='dummy') in the engine's layout: the same values
    at every TP size. One small program per distinct parameter kind, reused by every layer (one
    program for the whole model takes minutes to compile on the GPU), kept in the program cache
    (`cache_dir`, engine/executables.py) like the engine's."""
    from jaxllm.engine.executables import CompileCache, compile_cached
    from jaxllm.models.params import checkpoint_only_specs, init_param, param_keys, param_specs

    base = base_config(cfg)  # a quantized model's are the float model's weights, quantized
    keys = param_keys(base, jax.random.key(seed))
    cache = CompileCache(cache_dir) if cache_dir is not None else None
    flat_shardings = flatten_paths(shardings) if shardings is not None else {}
    programs, flat = {}, {}
    for path, spec in flatten_paths(param_specs(base)).items():
        name, quantized = path.rsplit(".", 1)[-1], quantizes(path, cfg)
        # what the program makes: the parameter, or a quantized one's weight and scales
        made_paths = quantized_paths(path, cfg) if quantized else [path]
        out = tuple(flat_shardings[p] for p in made_paths) if flat_shardings else None
        make = programs.get((name, spec, str(out), quantized))
        if make is None:

            def one(key, spec=spec, path=path, quantized=quantized):
                w = init_param(spec, key, dtype)
                w = w if plan is None else plan.transform(path, w, xp=jnp)
                return tuple(quantize_path(path, w, cfg).values()) if quantized else (w,)

            lowered = jax.jit(one, out_shardings=out).lower(keys[path])
            # (Under a mesh they compile each time: a cached program would load for the default device.)
            make = programs[(name, spec, str(out), quantized)] = compile_cached(lowered, cache if out is None else None)
        flat.update(zip(made_paths, make(keys[path])))
    for path, spec in checkpoint_only_specs(cfg).items():  # a ModelOpt checkpoint's K/V scales
        flat[path] = jax.device_put(init_param(spec, None, spec.dtype or dtype), flat_shardings.get(path))
    return unflatten_paths(_with_scales(flat, scales, flat_shardings), engine_cfg)


def load_engine_params(resolved: ResolvedModel, cfg: ModelConfig, dtype, plan=None, mesh=None,
                       load_format: str = "auto", seed: int = 0, progress: bool = True,
                       cache_dir=None, scales: dict | None = None) -> dict:  # fmt: skip
    """Weights in the engine's layout: placed straight into their shards when a mesh is given; on
    one device with fused projections (models/params.py: fuse_params; engine_abstract_params); float8
    weights stored input axes last in both (transpose_params).

    Args:
      cfg: the checkpoint's config.
      plan: a jaxllm.sharding.TPPlan (None: one device); tensors are padded/replicated by it.
      mesh: the tensor-parallel mesh (None: the default device).
      load_format: 'auto' reads the checkpoint; 'dummy' makes random weights on the device(s).
      scales: calibrated static scales of a float checkpoint (jaxllm/calibration.py), path -> value:
        FP8's input scales and the K/V cache scales, in place of the placeholders.
    """
    from jaxllm import sharding as sharding_lib
    engine_cfg = plan.engine_config(cfg) if plan is not None else cfg
    shardings = sharding_lib.param_shardings(engine_cfg, mesh) if mesh is not None else None
    if mesh is None:
        params = (_dummy_params(cfg, engine_cfg, dtype, seed, plan, shardings, cache_dir, scales)
                  if load_format == "dummy" else load_params(resolved, cfg, dtype, progress=progress, scales=scales))
        return fuse_params(params, engine_cfg, consume=True)
    params = _load_on_mesh(resolved, cfg, engine_cfg, dtype, plan, shardings, load_format, seed, progress, cache_dir,
                           scales)  # fmt: skip
    return transpose_params(params, sharding_lib.engine_param_shardings(engine_cfg, mesh, base=shardings))


def _load_on_mesh(resolved: ResolvedModel, cfg: ModelConfig, engine_cfg: ModelConfig, dtype, plan, shardings,
                  load_format: str, seed: int, progress: bool, cache_dir,
                  scales: dict | None = None) -> dict:  # fmt: skip
    """load_engine_params under a mesh, in the checkpoint's layout laid out by `plan`: each tensor
    placed into its shards (`shardings`) as it is read."""
    from jaxllm import sharding as sharding_lib
    if load_format == "dummy":
        return _dummy_params(cfg, engine_cfg, dtype, seed, plan, shardings, cache_dir, scales)
    if resolved.kind == "saved" and plan.is_identity:
        return load_params(resolved, cfg, dtype, shardings=shardings, progress=progress)
    np_dtype = np.dtype(jnp.dtype(dtype))
    flat_shardings = flatten_paths(shardings)
    read_cfg = cfg if resolved.kind == "saved" else checkpoint_config(resolved, cfg)
    dtype_of = stored_dtypes(read_cfg, dtype)

    def place(path: str, array: np.ndarray, cast: bool = True) -> jax.Array:
        array = np.asarray(array).astype(dtype_of(path), copy=False) if cast else array
        return sharding_lib.place_global(plan.transform(path, array), flat_shardings[path])

    if resolved.kind == "saved":  # restore on the host, then lay out for the mesh
        host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        params = load_params(resolved, cfg, dtype, shardings=jax.tree.map(lambda _: host, abstract_params(cfg, dtype)))
        flat = {path: place(path, np.asarray(x)) for path, x in flatten_paths(params).items()}
        return unflatten_paths(flat, engine_cfg)
    # a float checkpoint's projections are quantized in their shards as they load
    quantize = quantizer(engine_cfg if read_cfg is not cfg else base_config(engine_cfg), flat_shardings)
    flat = {}
    with _bar(resolved, cfg, dtype, progress) as bar:
        for path, array in iter_tensors(resolved, read_cfg, cfg):
            if isinstance(array, IntGroups):  # already quantized: laid out and placed as it is
                flat.update({p: place(p, a, cast=False) for p, a in array.params(path, cfg).items()})
                bar.update(array.q.size * np.dtype(np_dtype).itemsize)
                continue
            flat.update(quantize(path, place(path, array)))
            bar.update(array.size * np.dtype(np_dtype).itemsize)
    return unflatten_paths(_with_scales(flat, scales, flat_shardings), engine_cfg)


__all__ = ["CheckpointError", "ResolvedModel", "resolve", "read_config", "iter_tensors", "load_params",
           "load_engine_params"]
