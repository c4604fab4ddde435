"""Tensor parallelism as data: a device mesh, a logical-axis rules table, and the TP layout plan.

Model code names logical axes only (jaxllm/models/params.py); `RULES` maps them onto the mesh's
"tp" axis: attention heads and the MLP's up/gate are column-parallel, the output and down
projections row-parallel (their inputs are split, XLA all-reduces their outputs), the embedding and
LM head are split over the vocabulary, norms are replicated. The KV cache is split by KV head.

`plan_tensor_parallel` decides how a model that does not divide evenly is laid out:
  * KV heads: with N devices and K KV heads, K is padded with empty heads to K' (the smallest
    K' >= K that N divides, or that divides N); when N > K', each KV head is replicated r = N / K'
    times, and each replica serves a slice of its query-head group (groups are padded with empty
    query heads so that r divides them). Empty heads have zero weights and contribute nothing.
  * The MLP width and the vocabulary are padded with zeros to multiples of N; padded logits are cut
    off before sampling. Under W4A16 (int4 weights with a scale per group of input channels) the
    MLP width is padded to a multiple of N groups, so each device holds whole groups of `w_down`'s
    and every group is the one it is on one device.
With N = 1, or a model that divides evenly, the plan changes nothing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.config import ModelConfig
from jaxllm.models.params import ParamSpec, abstract_params, is_spec, param_specs, transpose_layer, transposed
from jaxllm.quantization import QUANTIZED_PARAMS, SCALE_SUFFIX, ZERO_SUFFIX, group_of

TP_AXIS = "tp"

# Logical axis -> mesh axis (None: replicated).
RULES: dict[str, str | None] = {
    "vocab": TP_AXIS,
    "embed": None,
    "q_heads": TP_AXIS,
    "kv_heads": TP_AXIS,
    "head_dim": None,
    "ffw": TP_AXIS,
    "norm": None,
    "pages": None,  # the KV cache's page axis
    "page_offset": None,  # a token's slot within its page
}


def make_mesh(tensor_parallel_size: int, devices=None) -> Mesh:
    """A 1-D mesh with axis "tp" over `devices` (default: the first N of jax.devices())."""
    available = list(devices) if devices is not None else jax.devices()
    n = tensor_parallel_size
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"tensor_parallel_size={n!r} is invalid; allowed: an int >= 1")
    if n > len(available):
        raise ValueError(
            f"tensor_parallel_size={n} exceeds the {len(available)} available devices "
            f"({available[0].platform}); allowed: 1..{len(available)}"
        )
    return Mesh(np.array(available[:n]), (TP_AXIS,))


def spec_for(spec: ParamSpec, rules: dict[str, str | None] = RULES) -> P:
    """The PartitionSpec of a parameter from its logical axes; refuses a mesh axis used twice."""
    mesh_axes = [rules.get(axis) for axis in spec.axes]
    used = [a for a in mesh_axes if a is not None]
    if len(used) != len(set(used)):
        raise ValueError(f"sharding rules map two axes of {spec.axes} onto the same mesh axis")
    return P(*mesh_axes)


def shardings_of(specs, mesh: Mesh, rules: dict[str, str | None] = RULES):
    """A pytree of NamedShardings shaped like `specs` (ParamSpec leaves: the params, the KV cache)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, spec_for(s, rules)), specs, is_leaf=is_spec)


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: dict[str, str | None] = RULES):
    """A pytree of NamedShardings shaped like the params of `cfg`."""
    return shardings_of(param_specs(cfg), mesh, rules)


def engine_param_shardings(cfg: ModelConfig, mesh: Mesh, rules: dict[str, str | None] = RULES, base=None):
    """param_shardings in the engine's layout under a mesh: each weight models/params.py `transposed`
    names (float8; on GPUs int8 and int4) stored input axes last (transpose_params), its
    PartitionSpec permuted alike. `base`: param_shardings of (cfg, mesh, rules) when the caller has
    them already."""
    shardings = base if base is not None else param_shardings(cfg, mesh, rules)
    abstract = abstract_params(cfg, jnp.float32)

    def permuted(sharding: NamedSharding, num_input_axes: int) -> NamedSharding:
        spec = tuple(sharding.spec)  # one entry per axis (spec_for)
        return NamedSharding(mesh, P(*spec[num_input_axes:], *spec[:num_input_axes]))

    layers = [transpose_layer(sh, transposed(lp), permuted) for sh, lp in zip(shardings["layers"], abstract["layers"])]
    return {**shardings, "layers": layers}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


@dataclasses.dataclass(frozen=True)
class TPPlan:
    """How a model's heads, MLP width and vocabulary are laid out over N devices."""

    size: int  # N
    num_kv_heads: int  # K of the checkpoint
    group: int  # G = query heads per KV head, in the checkpoint
    padded_kv_heads: int  # K' >= K (empty heads appended)
    kv_replicas: int  # r: copies of each KV head (N > K')
    padded_group: int  # G' >= G, a multiple of r
    intermediate_size: int
    padded_intermediate_size: int
    vocab_size: int
    padded_vocab_size: int
    grouped_scales: bool = False  # W4A16's scales: per group of input channels, with the weight's axes

    @property
    def is_identity(self) -> bool:
        return (self.padded_kv_heads, self.kv_replicas, self.padded_group) == (self.num_kv_heads, 1, self.group) and (
            self.padded_intermediate_size == self.intermediate_size and self.padded_vocab_size == self.vocab_size
        )

    def engine_config(self, cfg: ModelConfig) -> ModelConfig:
        """The config the sharded engine runs with (padded and replicated head counts)."""
        if self.is_identity:
            return cfg
        return dataclasses.replace(
            cfg,
            num_heads=self.padded_kv_heads * self.padded_group,
            num_kv_heads=self.padded_kv_heads * self.kv_replicas,
            intermediate_size=self.padded_intermediate_size,
            padded_vocab_size=self.padded_vocab_size if self.padded_vocab_size != self.vocab_size else 0,
        )

    # ---- numpy layout changes, applied to each tensor as it is loaded --------------------------
    def _q_heads(self, w, axis: int, xp=np):
        """[..., H, ...] along `axis` -> [..., K' * G', ...]: groups padded, empty groups appended."""
        K, G, Kp, Gp = self.num_kv_heads, self.group, self.padded_kv_heads, self.padded_group
        shape = w.shape
        w = w.reshape(shape[:axis] + (K, G) + shape[axis + 1 :])
        pad = [(0, 0)] * w.ndim
        pad[axis], pad[axis + 1] = (0, Kp - K), (0, Gp - G)
        w = xp.pad(w, pad)
        return w.reshape(shape[:axis] + (Kp * Gp,) + shape[axis + 1 :])

    def _kv_heads(self, w, axis: int, xp=np):
        """[..., K, ...] -> [..., K' * r, ...]: empty heads appended, each head repeated r times."""
        pad = [(0, 0)] * w.ndim
        pad[axis] = (0, self.padded_kv_heads - self.num_kv_heads)
        return xp.repeat(xp.pad(w, pad), self.kv_replicas, axis=axis)

    def transform(self, path: str, w, xp=np):
        """A checkpoint-layout tensor (numpy, or jnp with xp=jnp) in the engine's layout."""
        if self.is_identity:
            return w
        name = self._layout_of(path)
        if name in ("wq", "bq"):
            return self._q_heads(w, 1 if name == "wq" else 0, xp)
        if name == "wo":
            return self._q_heads(w, 0, xp)
        if name in ("wk", "wv", "bk", "bv"):
            return self._kv_heads(w, 1 if name in ("wk", "wv") else 0, xp)
        if name in ("w_gate", "w_up", "w_down", "ffw_scale"):
            axis = 0 if name in ("w_down", "ffw_scale") else 1
            pad = [(0, 0)] * w.ndim  # (w_down's group scales pad by groups: the same share of the axis)
            pad[axis] = (0, w.shape[axis] * self.padded_intermediate_size // self.intermediate_size - w.shape[axis])
            return xp.pad(w, pad)
        if name in ("embed", "lm_head"):
            axis = 0 if name == "embed" else 1
            pad = [(0, 0)] * w.ndim
            pad[axis] = (0, self.padded_vocab_size - self.vocab_size)
            return xp.pad(w, pad)
        return w

    def restore(self, path: str, w):
        """Inverse of `transform` (for saving a sharded engine in the checkpoint's layout)."""
        if self.is_identity:
            return w
        name = self._layout_of(path)
        K, G, Kp, Gp, r = self.num_kv_heads, self.group, self.padded_kv_heads, self.padded_group, self.kv_replicas
        if name in ("wq", "bq", "wo"):
            axis = 0 if name in ("bq", "wo") else 1
            shape = w.shape
            w = w.reshape(shape[:axis] + (Kp, Gp) + shape[axis + 1 :])
            index = [slice(None)] * w.ndim
            index[axis], index[axis + 1] = slice(0, K), slice(0, G)
            return w[tuple(index)].reshape(shape[:axis] + (K * G,) + shape[axis + 1 :])
        if name in ("wk", "wv", "bk", "bv"):
            axis = 1 if name in ("wk", "wv") else 0
            index = [slice(None)] * w.ndim
            index[axis] = slice(0, K * r, r)
            return w[tuple(index)]
        F, Fp = self.intermediate_size, self.padded_intermediate_size
        sizes = {"w_gate": (1, F, Fp), "w_up": (1, F, Fp), "ffw_scale": (0, F, Fp), "w_down": (0, F, Fp),
                 "embed": (0, self.vocab_size, self.padded_vocab_size),
                 "lm_head": (1, self.vocab_size, self.padded_vocab_size)}  # fmt: skip
        if name in sizes:
            axis, size, padded = sizes[name]
            index = [slice(None)] * w.ndim
            index[axis] = slice(0, w.shape[axis] * size // padded)
            return w[tuple(index)]
        return w

    def _layout_of(self, path: str) -> str:
        """The tensor whose layout change a parameter takes: itself, or for a quantized projection's
        scales (and offsets) the tensor of the same axes (per output channel: its bias's; per group
        of input channels: its weight's)."""
        name = path.rsplit(".", 1)[-1]
        if self.grouped_scales:
            for suffix in (SCALE_SUFFIX, ZERO_SUFFIX):
                if name.endswith(suffix) and name[: -len(suffix)] in QUANTIZED_PARAMS:
                    return name[: -len(suffix)]
        return _SCALE_LIKE.get(name, name)


# A projection's scales per output channel lie over its output axes: laid out as the tensor of the
# same axes (wo's and w_down's, over the model width, are replicated).
_SCALE_LIKE = {"wq_scale": "bq", "wk_scale": "bk", "wv_scale": "bv", "w_gate_scale": "ffw_scale",
               "w_up_scale": "ffw_scale"}  # fmt: skip


def _round_up(x: int, n: int) -> int:
    return -(-x // n) * n


def _padded_width(cfg: ModelConfig, size: int) -> int:
    """The MLP width over `size` devices: a multiple of `size`, and under grouped scales (W4A16, W8A16
    in groups) of `size` groups of w_down's input channels, each group the one it is on one device.

    Raises:
      ValueError: padding would change the groups (a width that is not a multiple of group_size).
    """
    F, G = cfg.intermediate_size, cfg.quant_group_size
    if not G:
        return _round_up(F, size)
    group = group_of(F, G)
    padded = _round_up(F, size * group)
    if group_of(padded, G) != group:
        raise ValueError(
            f"{cfg.quant_algo} groups of {group} input channels along the MLP width {F} (its gcd with group_size={G}) "
            f"cannot be laid out over tensor_parallel_size={size}: the width would be padded to {padded}, "
            f"whose groups are of {group_of(padded, G)}; allowed: tensor_parallel_size 1, a size that divides "
            f"the {F // group} groups, or a group_size that divides the width"
        )
    return padded


def plan_tensor_parallel(cfg: ModelConfig, size: int) -> TPPlan:
    """How `cfg` (the checkpoint's config, with its quantization) is laid out over `size` devices.

    Raises:
      ValueError: W4A16 groups that cannot be kept over `size` devices (`_padded_width`).
    """
    K, H = cfg.num_kv_heads, cfg.num_heads
    G = H // K
    Kp = next(k for k in range(K, K + size + 1) if k % size == 0 or size % k == 0)
    r = size // Kp if size > Kp else 1
    Gp = _round_up(G, r)
    return TPPlan(
        size=size,
        num_kv_heads=K,
        group=G,
        padded_kv_heads=Kp,
        kv_replicas=r,
        padded_group=Gp,
        intermediate_size=cfg.intermediate_size,
        padded_intermediate_size=_padded_width(cfg, size),
        vocab_size=cfg.vocab_size,
        padded_vocab_size=_round_up(cfg.vocab_size, size),
        grouped_scales=bool(cfg.quant_group_size),
    )


def place_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array present on every process; each device gets only its shard."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def place(array, sharding) -> jax.Array:
    """A host array on `sharding`'s devices: put there, or, where they span several processes (each
    passing the same values), assembled from every process's shards."""
    if sharding.is_fully_addressable:
        return jax.device_put(array, sharding)
    return place_global(np.asarray(array), sharding)
