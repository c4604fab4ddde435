"""Which adapters occupy the device slots (plain Python, on the engine thread).

The device holds max_loras LoRA adapters and max_prompt_adapters prompt adapters in numbered
slots (jaxllm/adapters/bank.py). A slot is held while any running sequence uses its adapter and is
never evicted then; a free slot keeps its adapter, so a later request for it needs no upload, until
the slot is reused, least recently released first. The scheduler asks `AdapterAdmission.admit`
before it admits a waiting sequence: if the sequence's adapters cannot all get a slot, it waits
(first come, first served) until running sequences finish or are preempted and release theirs.
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
    """The scheduler's admission gate: a sequence runs only with its adapters in device slots.

    Sets `seq.lora_slot` / `seq.prompt_adapter_slot` on admission and clears them on release.
    """

    def __init__(self, lora: SlotTable | None, prompt: SlotTable | None):
        self.lora = lora
        self.prompt = prompt

    def admit(self, seq: Sequence) -> bool:
        request = seq.request
        pairs = ((self.lora, request.lora_adapter), (self.prompt, request.prompt_adapter))
        wanted = [(table, adapter) for table, adapter in pairs if adapter is not None]
        if not all(table.can_acquire(adapter.adapter_id) for table, adapter in wanted):
            return False
        if request.lora_adapter is not None:
            seq.lora_slot = self.lora.acquire(request.lora_adapter)
        if request.prompt_adapter is not None:
            seq.prompt_adapter_slot = self.prompt.acquire(request.prompt_adapter)
        return True

    def release(self, seq: Sequence) -> None:
        """Give back the sequence's slots (a no-op for one that holds none)."""
        if seq.lora_slot:
            self.lora.release(seq.lora_slot)
            seq.lora_slot = 0
        if seq.prompt_adapter_slot:
            self.prompt.release(seq.prompt_adapter_slot)
            seq.prompt_adapter_slot = 0
