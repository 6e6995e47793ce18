"""What each scenario books, the same for both designs.

Every session lasts `SLOT_MINUTES` and starts on a slot boundary from tomorrow's midnight (UTC)
on, in therapists open around the clock with no buffers: slot k of a therapist never overlaps
slot j != k, so a refusal means two clients wanted the same slot, never a near miss.

- spread: many therapists (8 per client worker); each call books the next free slot of a
  random therapist. Almost no two calls want the same therapist at once: the design's cost per
  booking, with little lock waiting.
- hot: one therapist; each call books the therapist's next free slot. Every booking serializes
  on that therapist's lock: the cost of the locked section.
- contended: one therapist, and only `CONTENDED_OPEN_SLOTS` slots open at a time; every call
  picks one of them at random, so most lose the race and are refused (SLOT_UNAVAILABLE). A slot
  closes when someone books it; the next one opens. The test of correctness under contention.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

SCENARIO_NAMES = ("spread", "hot", "contended")
SLOT_MINUTES = 10
# Far enough ahead that every slot is bookable for the whole run (no notice, no horizon issue).
HORIZON_DAYS = 730
FIRST_SLOT_DAYS_AHEAD = 1
# Slots per therapist that stay within the horizon, with a day to spare at the end.
SLOTS_PER_THERAPIST = (HORIZON_DAYS - FIRST_SLOT_DAYS_AHEAD - 1) * 24 * 60 // SLOT_MINUTES
CREDIT_COST = 1
# Each client is granted this much once (the credit service's largest single grant).
CLIENT_CREDITS = 1_000_000
CONTENDED_OPEN_SLOTS = 4
SPREAD_THERAPISTS_PER_WORKER = 8
CLIENTS_PER_WORKER = 4
MINIMUM_CLIENTS = 8


@dataclass(frozen=True)
class Shape:
    """How many therapists and clients a scenario needs at a concurrency."""

    therapists: int
    clients: int


def shape(scenario: str, concurrency: int) -> Shape:
    assert scenario in SCENARIO_NAMES, scenario
    assert concurrency >= 1
    clients = max(MINIMUM_CLIENTS, CLIENTS_PER_WORKER * concurrency)
    if scenario == "spread":
        return Shape(therapists=max(16, SPREAD_THERAPISTS_PER_WORKER * concurrency), clients=clients)
    return Shape(therapists=1, clients=clients)


def first_slot_start(now: datetime) -> datetime:
    day = (now.astimezone(UTC) + timedelta(days=FIRST_SLOT_DAYS_AHEAD)).date()
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def slot_start(base: datetime, slot: int) -> datetime:
    assert 0 <= slot < SLOTS_PER_THERAPIST, slot
    return base + timedelta(minutes=SLOT_MINUTES * slot)


class SlotPicker:
    """Chooses (therapist index, slot index) for the next call, and learns which slots are gone.

    One event loop owns it (the load generator's), so it needs no locking. Returns None when the
    scenario has run out of slots (far beyond any bounded run).
    """

    def __init__(self, scenario: str, therapists: int, rng: random.Random) -> None:
        assert scenario in SCENARIO_NAMES
        self._scenario = scenario
        self._rng = rng
        self._next = [0] * therapists
        self._frontier = 0  # contended: the lowest slot not known to be taken
        self._taken: set[int] = set()

    def pick(self) -> tuple[int, int] | None:
        if self._scenario == "contended":
            return self._pick_contended()
        therapist = self._rng.randrange(len(self._next)) if self._scenario == "spread" else 0
        slot = self._next[therapist]
        if slot >= SLOTS_PER_THERAPIST:
            return None
        self._next[therapist] = slot + 1
        return therapist, slot

    def _pick_contended(self) -> tuple[int, int] | None:
        open_slots = [
            s for s in range(self._frontier, self._frontier + CONTENDED_OPEN_SLOTS) if s not in self._taken
        ] or [self._frontier]
        slot = self._rng.choice(open_slots)
        return None if slot >= SLOTS_PER_THERAPIST else (0, slot)

    def taken(self, slot: int) -> None:
        """The slot is booked (we booked it, or a call was refused because someone had)."""
        if self._scenario != "contended":
            return
        self._taken.add(slot)
        while self._frontier in self._taken:
            self._taken.discard(self._frontier)
            self._frontier += 1
