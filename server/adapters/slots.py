"""Which mix or adapter sits in which device slot of a pool (``lora_pool.py``'s factors, ``member_pool.py``'s adapters and cores).

A slot is handed out when a mix's first sequence is admitted and stays loaded after its last one
finishes, until another mix needs the slot (least recently used first): a popular mix is copied in
once. The table keeps only weak references to the mixes: their memory stays the mix cache's.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable


class PoolFullError(RuntimeError):
    """Every slot holds a mix some running sequence uses."""


class SlotTable:
    """Slots ``1..count`` (slot 0 is the base model's, never handed out) and the mixes loaded in them."""

    def __init__(self, count: int, what: str = "mix") -> None:
        if count < 1:
            raise ValueError(f"a pool needs at least one {what} slot")
        self.count, self.what = count, what
        self._loaded: dict[int, tuple[int, weakref.ref]] = {}  # slot -> (id, weak reference) of the mix there
        self._slot_of: dict[int, int] = {}  # id(mix) -> slot
        self._refs: dict[int, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # loaded, unreferenced slots, least recent first
        self._never_used = list(range(count, 0, -1))
        self.loads = 0  # copies into a slot
        self.evictions = 0  # loads that replaced an idle slot's earlier occupant

    def loaded(self) -> list[tuple[int, object]]:
        """``(slot, mix)`` for every slot whose occupant is still alive."""
        out = []
        for slot, (_, ref) in sorted(self._loaded.items()):
            mix = ref()
            if mix is not None:
                out.append((slot, mix))
        return out

    def is_idle(self, mix: object) -> bool:
        """Whether ``mix`` is loaded in a slot no running sequence holds."""
        slot = self.slot_of(mix)
        return slot is not None and slot in self._idle

    def free_count(self) -> int:
        """Slots that could take a new occupant now (never used, or loaded and idle)."""
        return len(self._never_used) + len(self._idle)

    def in_use(self) -> int:
        """Slots held by running sequences."""
        return sum(1 for n in self._refs.values() if n > 0)

    def slot_of(self, mix: object) -> int | None:
        entry = self._loaded.get(self._slot_of.get(id(mix), -1))
        return self._slot_of[id(mix)] if entry is not None and entry[1]() is mix else None

    def can_acquire(self, mix: object) -> bool:
        return self.slot_of(mix) is not None or bool(self._never_used or self._idle)

    def acquire(self, mix: object, load: Callable[[int, object], None]) -> int:
        """The slot holding ``mix``, calling ``load(slot, mix)`` to copy it in if needed. Pair with
        :meth:`release`."""
        slot = self.slot_of(mix)
        if slot is None:
            if self._never_used:
                slot = self._never_used.pop()
            elif self._idle:
                slot, _ = self._idle.popitem(last=False)
                old_id, _ = self._loaded.pop(slot)
                if self._slot_of.get(old_id) == slot:
                    del self._slot_of[old_id]
                self.evictions += 1
            else:
                raise PoolFullError(f"all {self.count} {self.what} slots are in use by running sequences")
            try:
                load(slot, mix)
                self.loads += 1
            except BaseException:  # e.g. out of device memory growing the pool: the slot stays usable
                self._never_used.append(slot)
                raise
            # A weak reference: an idle slot does not keep a mix the mix cache has evicted alive; the
            # id is only trusted while the reference still points at it.
            self._loaded[slot] = (id(mix), weakref.ref(mix))
            self._slot_of[id(mix)] = slot
        self._idle.pop(slot, None)
        self._refs[slot] = self._refs.get(slot, 0) + 1
        return slot

    def release(self, slot: int) -> None:
        if slot == 0:
            return
        if self._refs.get(slot, 0) <= 0:
            raise ValueError(f"{self.what} slot {slot} released more often than acquired")
        self._refs[slot] -= 1
        if self._refs[slot] == 0:
            self._idle[slot] = None
