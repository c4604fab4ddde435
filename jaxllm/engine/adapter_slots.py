"""Which adapters (and bias rows) occupy the device slots (plain Python, on the engine thread).

The device holds max_loras LoRA adapters and max_prompt_adapters prompt adapters in numbered
slots (jaxllm/adapters/bank.py). A slot is held while any running sequence uses its adapter and is
never evicted then; a free slot keeps its adapter, so a later request for it needs no upload, until
the slot is reused, least recently released first. The scheduler asks `AdapterAdmission.admit`
before it admits a waiting sequence: if the sequence's adapters cannot all get a slot, it waits
(first come, first served) until running sequences finish or are preempted and release theirs.
A request's bias row (embedding bias and banned single tokens) takes a slot of the device's bias
table the same way (engine/runner.py BIAS_SLOTS); requests with equal rows share it.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

from jaxllm.engine.sequence import Sequence


class SlotTable:
    """Device slots 1..num_slots for adapters keyed by id.

    Args:
      num_slots: how many the device holds.
      upload: (slot, adapter) -> None writes an adapter into a slot on the device.
    """

    def __init__(self, num_slots: int, upload: Callable[[int, Any], None]):
        self.num_slots = num_slots
        self.upload = upload
        self.slot_of: dict[int, int] = {}  # adapter id -> its slot
        self.owner: list[int | None] = [None] * (num_slots + 1)  # slot -> adapter id
        self.refs = [0] * (num_slots + 1)  # running sequences using each slot
        # Slots nobody holds, least recently released first (never-used slots lead).
        self.idle: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(1, num_slots + 1))
        self.num_uploads = 0

    def can_acquire(self, adapter_id: int) -> bool:
        return adapter_id in self.slot_of or bool(self.idle)

    def acquire(self, adapter) -> int:
        """The slot holding `adapter` (uploading it into the least recently released slot if needed)."""
        slot = self.slot_of.get(adapter.adapter_id)
        if slot is None:
            if not self.idle:
                raise RuntimeError("no free adapter slot (check can_acquire first)")
            slot = next(iter(self.idle))
            self.upload(slot, adapter)  # first: if it raises, the table still says what the slot held
            self.num_uploads += 1
            previous = self.owner[slot]
            if previous is not None:
                del self.slot_of[previous]
            self.owner[slot] = adapter.adapter_id
            self.slot_of[adapter.adapter_id] = slot
        if self.refs[slot] == 0:
            del self.idle[slot]
        self.refs[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        if self.refs[slot] <= 0:
            raise RuntimeError(f"adapter slot {slot} released more often than it was acquired")
        self.refs[slot] -= 1
        if self.refs[slot] == 0:
            self.idle[slot] = None  # most recently released: reused last


class AdapterAdmission:
    """The scheduler's admission gate: a sequence runs only with its adapters and its request's bias
    row (engine/sequence.py BiasRow) in device slots.

    Sets `seq.lora_slot` / `seq.prompt_adapter_slot` / `seq.bias_slot` on admission and clears them
    on release.
    """

    def __init__(self, lora: SlotTable | None, prompt: SlotTable | None, bias: SlotTable | None = None):
        self.lora = lora
        self.prompt = prompt
        self.bias = bias

    def _wanted(self, seq: Sequence) -> list[tuple[str, SlotTable, Any]]:
        request = seq.request
        pairs = (("lora_slot", self.lora, request.lora_adapter), ("prompt_adapter_slot", self.prompt,
                 request.prompt_adapter), ("bias_slot", self.bias, request.bias_row))  # fmt: skip
        return [(attr, table, item) for attr, table, item in pairs if item is not None]

    def admit(self, seq: Sequence) -> bool:
        wanted = self._wanted(seq)
        if any(table is None for _, table, _ in wanted):
            raise RuntimeError("a sequence needs a device slot this engine does not have")
        if not all(table.can_acquire(item.adapter_id) for _, table, item in wanted):
            return False
        for attr, table, item in wanted:
            setattr(seq, attr, table.acquire(item))
        return True

    def release(self, seq: Sequence) -> None:
        """Give back the sequence's slots (a no-op for one that holds none)."""
        for attr, table in (("lora_slot", self.lora), ("prompt_adapter_slot", self.prompt), ("bias_slot", self.bias)):
            slot = getattr(seq, attr)
            if slot:
                table.release(slot)
                setattr(seq, attr, 0)
