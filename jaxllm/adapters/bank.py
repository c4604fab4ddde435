"""The device memory of the adapters an engine serves: the LoRA bank and the virtual-token table.

LoRA bank, per layer and adapted projection (param name as in jaxllm/models/params.py):
  a [S, *in, R], b [S, R, *out]    S = max_loras slots, R = max_lora_rank
Row s - 1 holds the adapter of device slot s, zero-padded to rank R (slot 0 means "no adapter" and
has no row); the bank is zeros until written. `lora_bank_specs` describes it once, from the base
weights' ParamSpecs, so shapes, logical axes and shardings all derive from the same place as the
weights': b of column-parallel projections (q/k/v, gate/up) is split like the weight's output
heads or width, a of row-parallel ones (o, down) like its input, the rest is replicated. Writing
an adapter lays out that tensor with the tensor-parallel plan (padding, head regrouping, KV-head
replication) exactly as the base weight was laid out when it loaded.

Prompt table: [P * M, D] (P = max_prompt_adapters slots, M = max_prompt_adapter_token), slot s
at rows (s - 1) * M onwards, replicated.

Slots are written between steps by the engine thread (jaxllm/engine/adapter_slots.py decides
which); each write is one jitted in-place update of the donated bank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm import sharding as sharding_lib
from jaxllm.adapters.lora import NUM_INPUT_AXES, LoraAdapter
from jaxllm.adapters.prompt import PromptAdapter
from jaxllm.config import ModelConfig
from jaxllm.layers.adapters import AdapterInputs
from jaxllm.models.params import ParamSpec, is_spec, param_specs

# Logical axes of the bank and the prompt table (all replicated).
LORA_SLOT, LORA_RANK, PROMPT_ROWS = "lora_slot", "lora_rank", "prompt_rows"
# Base-weight axes the tensor-parallel plan pads or regroups: the LoRA tensor holding one of them
# gets the same layout change as the base weight.
PLANNED_AXES = ("q_heads", "kv_heads", "ffw")


def lora_bank_specs(cfg: ModelConfig, targets: tuple[str, ...], num_slots: int, rank: int) -> list[dict]:
    """Per layer {param name: {"a": ParamSpec, "b": ParamSpec}} of the bank for `cfg`'s layout."""
    layers = []
    for base in param_specs(cfg)["layers"]:
        layer = {}
        for name in targets:
            spec, n_in = base[name], NUM_INPUT_AXES[name]
            layer[name] = {  # the base weight's input axes, then the rank; the rank, then its output axes
                "a": ParamSpec((num_slots, *spec.shape[:n_in], rank), (LORA_SLOT, *spec.axes[:n_in], LORA_RANK)),
                "b": ParamSpec((num_slots, rank, *spec.shape[n_in:]), (LORA_SLOT, LORA_RANK, *spec.axes[n_in:])),
            }
        layers.append(layer)
    return layers


def planned_tensor(name: str, cfg: ModelConfig) -> str:
    """'a' or 'b': which LoRA tensor of projection `name` holds the base weight's planned axis."""
    axes = param_specs(cfg)["layers"][0][name].axes
    return "a" if any(axis in PLANNED_AXES for axis in axes[: NUM_INPUT_AXES[name]]) else "b"


def _write_rows(bank, values, row):
    """bank leaves [S, ...] <- values [...] at index `row` of the leading axis (bank donated)."""
    return jax.tree.map(lambda b, v: jax.lax.dynamic_update_index_in_dim(b, v.astype(b.dtype), row, 0), bank, values)


def _write_table(table, values, start):
    return jax.lax.dynamic_update_slice_in_dim(table, values.astype(table.dtype), start, 0)


class AdapterBank:
    """The device arrays of an engine's adapters, and how slots are written.

    Args:
      cfg: the checkpoint's model config (adapters are read in its layout).
      engine_cfg: the config the engine runs with (tensor-parallel padding applied).
      dtype: the weights' dtype (the bank's).
      lora_slots, lora_rank, lora_targets: max_loras, max_lora_rank, the param names adapted
        (lora_slots 0: no LoRA bank).
      prompt_slots, prompt_tokens: max_prompt_adapters, max_prompt_adapter_token (0: no table).
      plan, mesh: the tensor-parallel plan and mesh, or None for one device.
    """

    def __init__(self, cfg: ModelConfig, engine_cfg: ModelConfig, dtype, *, lora_slots: int = 0, lora_rank: int = 0,
                 lora_targets: tuple[str, ...] = (), prompt_slots: int = 0, prompt_tokens: int = 0, plan=None,
                 mesh=None):  # fmt: skip
        self.cfg, self.engine_cfg, self.dtype = cfg, engine_cfg, dtype
        self.plan = plan if plan is not None and not plan.is_identity else None
        self.mesh = mesh
        self.lora_slots, self.lora_rank, self.lora_targets = lora_slots, lora_rank, tuple(lora_targets)
        self.prompt_slots, self.prompt_tokens = prompt_slots, prompt_tokens
        self.lora = None
        self.prompt_table = None
        if lora_slots:
            specs = lora_bank_specs(engine_cfg, self.lora_targets, lora_slots, lora_rank)
            self._lora_shardings = self._shardings(specs)
            self._lora_value_shardings = jax.tree.map(self._drop_slot_axis, self._lora_shardings)
            self.lora = self._zeros(specs, self._lora_shardings)
            self._write_lora = self._jit(_write_rows, self._lora_shardings)
            self._planned = {name: planned_tensor(name, cfg) for name in self.lora_targets}
            base = param_specs(cfg)["layers"][0]
            self._host_shapes = {  # one slot of each projection in the checkpoint's layout
                name: ((*base[name].shape[: NUM_INPUT_AXES[name]], lora_rank),
                       (lora_rank, *base[name].shape[NUM_INPUT_AXES[name] :]))
                for name in self.lora_targets
            }  # fmt: skip
        if prompt_slots:
            spec = ParamSpec((prompt_slots * prompt_tokens, cfg.hidden_size), (PROMPT_ROWS, "embed"), "zeros")
            self._table_sharding = self._shardings(spec)
            self.prompt_table = self._zeros(spec, self._table_sharding)
            self._write_prompt = self._jit(_write_table, self._table_sharding)

    # ---- layout ------------------------------------------------------------------------------
    def _shardings(self, specs):
        if self.mesh is None:
            return jax.tree.map(lambda s: None, specs, is_leaf=is_spec)
        rules = {**sharding_lib.RULES, LORA_SLOT: None, LORA_RANK: None, PROMPT_ROWS: None}
        return jax.tree.map(lambda s: NamedSharding(self.mesh, sharding_lib.spec_for(s, rules)), specs, is_leaf=is_spec)

    def _jit(self, write, shardings):
        """A slot writer: the bank is donated and keeps its shardings."""
        if self.mesh is None:
            return jax.jit(write, donate_argnums=(0,))
        return jax.jit(write, donate_argnums=(0,), out_shardings=shardings)

    @staticmethod
    def _drop_slot_axis(sharding):
        return None if sharding is None else NamedSharding(sharding.mesh, P(*sharding.spec[1:]))

    def _zeros(self, specs, shardings):
        make = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, self.dtype), specs, is_leaf=is_spec)  # noqa: E731
        if self.mesh is None:
            return make()
        return jax.jit(make, out_shardings=shardings)()

    def _place(self, values, shardings):
        if self.mesh is None:
            return values
        return jax.tree.map(lambda v, s: sharding_lib.place_global(v, s), values, shardings)

    # ---- writing slots -----------------------------------------------------------------------
    def lora_values(self, adapter: LoraAdapter) -> list[dict]:
        """The host tensors of one slot in the checkpoint's layout, rank padded to the bank's, zeros for
        the projections the adapter does not adapt (the slot's previous occupant is overwritten)."""
        values = []
        for i in range(self.cfg.num_layers):
            layer = {}
            for name in self.lora_targets:
                a_shape, b_shape = self._host_shapes[name]
                a, b = np.zeros(a_shape, np.float32), np.zeros(b_shape, np.float32)
                if name in adapter.layers[i]:
                    ha, hb = adapter.layers[i][name]
                    r = ha.shape[-1]
                    a[..., :r] = ha
                    b[:r] = hb
                layer[name] = {"a": a, "b": b}
            values.append(layer)
        return values

    def write_lora(self, slot: int, values: list[dict]) -> None:
        """Put lora_values(adapter) into device slot `slot` (1..max_loras)."""
        if not 1 <= slot <= self.lora_slots:
            raise ValueError(f"LoRA slot {slot} is out of range; allowed: 1..{self.lora_slots}")
        laid_out = []
        for i, layer in enumerate(values):
            out = {}
            for name, pair in layer.items():
                pair = dict(pair)
                if self.plan is not None:
                    which = self._planned[name]
                    pair[which] = self.plan.transform(f"layers.{i}.{name}", pair[which])
                out[name] = {k: np.asarray(v, np.dtype(jnp.dtype(self.dtype))) for k, v in pair.items()}
            laid_out.append(out)
        placed = self._place(laid_out, self._lora_value_shardings)
        self.lora = self._write_lora(self.lora, placed, np.int32(slot - 1))

    def prompt_values(self, adapter: PromptAdapter) -> np.ndarray:
        """[max_prompt_adapter_token, D] host rows of one slot (zeros past the adapter's tokens)."""
        rows = np.zeros((self.prompt_tokens, self.cfg.hidden_size), np.float32)
        rows[: adapter.num_virtual_tokens] = adapter.embeddings
        return rows

    def write_prompt_adapter(self, slot: int, rows: np.ndarray) -> None:
        """Put prompt_values(adapter) into device slot `slot` (1..max_prompt_adapters)."""
        if not 1 <= slot <= self.prompt_slots:
            raise ValueError(f"prompt adapter slot {slot} is out of range; allowed: 1..{self.prompt_slots}")
        rows = np.asarray(rows, np.dtype(jnp.dtype(self.dtype)))
        if self.mesh is not None:
            rows = sharding_lib.place_global(rows, self._drop_slot_axis(self._table_sharding))
        self.prompt_table = self._write_prompt(self.prompt_table, rows, np.int32((slot - 1) * self.prompt_tokens))

    # ---- what a step reads ---------------------------------------------------------------------
    def virtual_token_id(self, slot: int, index: int) -> int:
        """The device token id of virtual token `index` of the prompt adapter in `slot`."""
        return self.engine_cfg.vocab_size + (slot - 1) * self.prompt_tokens + index

    def step_inputs(self, lora_slots) -> AdapterInputs:
        """AdapterInputs of a step; lora_slots: [T] int32 (device or abstract) or None."""
        return AdapterInputs(lora=self.lora, lora_slots=lora_slots if self.lora is not None else None,
                             prompt_table=self.prompt_table)  # fmt: skip

    def bank_arrays(self) -> tuple:
        """(LoRA bank, prompt table), as a step program takes them (either may be None)."""
        return self.lora, self.prompt_table

    def warm_up(self) -> None:
        """Compile the slot writers now (writing what slot 1 holds: zeros), not at the first request."""
        if self.lora is not None:
            zeros = [{name: {"a": np.zeros(self._host_shapes[name][0], np.float32),
                             "b": np.zeros(self._host_shapes[name][1], np.float32)} for name in self.lora_targets}
                     for _ in range(self.cfg.num_layers)]  # fmt: skip
            self.write_lora(1, zeros)
        if self.prompt_table is not None:
            self.write_prompt_adapter(1, np.zeros((self.prompt_tokens, self.cfg.hidden_size), np.float32))

    def arrays(self) -> list:
        return jax.tree.leaves((self.lora, self.prompt_table))

    def delete(self) -> None:
        for array in self.arrays():
            if isinstance(array, jax.Array) and not array.is_deleted():
                array.delete()
        self.lora = self.prompt_table = None
