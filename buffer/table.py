"""A table of rollout groups: selection, removal, a size bound and a staleness bound.

Plain Python, single-threaded: the server owns its tables (buffer.table is "rollouts",
buffer.tables adds more) and calls them from its loop.
"""
from __future__ import annotations

import math
import random
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from itertools import islice

import numpy as np

from common.config import check
from common.rollout import RolloutGroup

SELECTORS = ("fifo", "lifo", "uniform", "prioritized", "max_heap", "min_heap")
RATE_LIMITERS = ("min_size", "ratio", "queue")


@dataclass
class TableConfig:
    max_size: int = 1024
    """Groups held at most; inserting into a full table removes the oldest group (with the
    queue rate limiter the insert waits instead)."""
    max_staleness: int = 4
    """A group is never sampled once learner_version - group.version exceeds this; it is
    dropped and counted in `dropped_stale`."""
    selector: str = "fifo"
    """Which groups a sample takes: fifo (oldest first), lifo (newest first), uniform,
    prioritized (drawn with probability proportional to priority ** priority_exponent),
    max_heap or min_heap (highest or lowest priority first; ties oldest first). A group's
    priority is given at insert (default 1.0) and changed by update_priorities."""
    priority_exponent: float = 1.0
    """The exponent of the prioritized selector (0: uniform)."""
    rate_limiter: str = "min_size"
    """When inserts and samples may go ahead (one mechanism, three presets):
    min_size: samples wait for min_size_to_sample groups, inserts never wait;
    ratio: also keep samples per insert near samples_per_insert, within error_buffer: inserts
    wait when the learner falls behind, samples when the actors do;
    queue: inserts wait while the table is full (nothing is evicted); needs fifo and
    max_times_sampled=1."""
    samples_per_insert: float = 1.0
    """ratio: group hand-outs per inserted group. A group removed unsampled (stale, evicted)
    counts as sampled here, or a staleness drop could stop the actors for ever."""
    error_buffer: float = 8.0
    """ratio: how far (in hand-outs) samples may run ahead of or behind the ratio."""
    max_times_sampled: int = 1
    """A group is removed after this many samples (counted in `consumed`); 0 keeps it until
    evicted or stale."""
    min_size_to_sample: int = 1
    """A sample waits until the table holds at least this many groups (and enough for it)."""

    def validate(self):
        check(self.max_size >= 1, "max_size", f"must be >= 1, got {self.max_size}")
        check(self.max_staleness >= 0, "max_staleness", f"must be >= 0, got {self.max_staleness}")
        check(self.selector in SELECTORS, "selector", f"must be one of {SELECTORS}, got {self.selector!r}")
        check(self.max_times_sampled >= 0, "max_times_sampled", "must be >= 0")
        check(1 <= self.min_size_to_sample <= self.max_size, "min_size_to_sample",
              f"must lie in [1, max_size={self.max_size}], got {self.min_size_to_sample}")
        check(self.priority_exponent >= 0, "priority_exponent", f"must be >= 0, got {self.priority_exponent}")
        check(self.rate_limiter in RATE_LIMITERS, "rate_limiter",
              f"must be one of {RATE_LIMITERS}, got {self.rate_limiter!r}")
        check(self.samples_per_insert > 0, "samples_per_insert", f"must be > 0, got {self.samples_per_insert}")
        if self.rate_limiter == "ratio":
            # an insert moves the balance by +samples_per_insert, a hand-out by -1: the window
            # must fit both, or neither could ever go ahead (Reverb refuses the same)
            check(2 * self.error_buffer >= max(1.0, self.samples_per_insert), "error_buffer",
                  f"must be >= max(1, samples_per_insert) / 2 = {max(1.0, self.samples_per_insert) / 2:g} "
                  f"with rate_limiter=ratio, got {self.error_buffer:g}: inserts and samples would both wait for ever")
        if self.rate_limiter == "queue":
            check(self.selector == "fifo", "selector", f"must be fifo with rate_limiter=queue, got {self.selector!r}")
            check(self.max_times_sampled == 1, "max_times_sampled",
                  f"must be 1 with rate_limiter=queue, got {self.max_times_sampled}")


@dataclass
class _Entry:
    group: RolloutGroup
    times_sampled: int = 0
    priority: float = 1.0
    order: int = 0  # insertion number: ties of the heap selectors go to the oldest


@dataclass
class TableStats:
    """Counts since the table was made. Every inserted group is held or has left exactly one
    way, so inserts == size + consumed + dropped_stale + evicted, whatever max_times_sampled."""
    inserts: int = 0          # groups stored (re-sent ids not counted)
    duplicates: int = 0       # inserts refused because the id was stored before
    samples: int = 0          # hand-outs: a group sampled k times counts k
    consumed: int = 0         # groups removed because they were sampled max_times_sampled times
    dropped_stale: int = 0    # groups removed (or refused on arrival) as too stale, sampled or not
    evicted: int = 0          # groups removed, sampled or not, because the table was full
    unsampled_credit: int = 0  # hand-outs that removed groups will never have (the ratio limiter's)
    staleness: Counter = field(default_factory=Counter)  # staleness at sampling -> hand-outs
    dropped_staleness: Counter = field(default_factory=Counter)  # staleness when dropped -> groups


MAX_WEIGHT = 1e290   # a prioritized group's weight at most: sums of a million stay finite


class SumTree:
    """Weights by slot and their sums in a binary tree over a list of a power-of-two length
    (leaves at capacity + slot, each node the sum of its two children): setting a weight and
    finding where a running sum crosses a value cost O(log slots). The prioritized selector
    summed the whole table for each draw before: 7.5 ms a sample of 16 at 133k groups.
    A node is always recomputed from its children, never adjusted by a difference, so sums
    do not drift and a subtree of zero weights sums to exactly 0."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._tree = [0.0] * (2 * capacity)

    @property
    def total(self) -> float:
        return self._tree[1]

    def get(self, slot: int) -> float:
        return self._tree[self.capacity + slot] if slot < self.capacity else 0.0

    def set(self, slot: int, weight: float) -> None:
        if slot >= self.capacity:
            self._grow(slot)
        tree, i = self._tree, self.capacity + slot
        tree[i] = weight
        i >>= 1
        while i:
            tree[i] = tree[2 * i] + tree[2 * i + 1]
            i >>= 1

    def _grow(self, slot: int) -> None:
        capacity = self.capacity
        while capacity <= slot:
            capacity *= 2
        tree = [0.0] * capacity + self._tree[self.capacity:] + [0.0] * (capacity - self.capacity)
        for i in range(capacity - 1, 0, -1):
            tree[i] = tree[2 * i] + tree[2 * i + 1]
        self._tree, self.capacity = tree, capacity

    def find(self, value: float) -> int:
        """The slot where the running sum of weights first exceeds `value` (0 <= value <
        total, total > 0); never a slot of weight 0, even where rounding would lead there."""
        tree, i = self._tree, 1
        while i < self.capacity:
            left = tree[2 * i]
            if value < left or tree[2 * i + 1] <= 0.0:
                i = 2 * i
            else:
                value -= left
                i = 2 * i + 1
        return i - self.capacity


class Table:
    def __init__(self, config: TableConfig, seed: int = 0, remember_ids: int = 100_000):
        self.config = config
        self.learner_version = 0
        self.stats = TableStats()
        self._items: OrderedDict[str, _Entry] = OrderedDict()  # insertion order
        # the held ids in slots, each id's slot by id: uniform draws slots, and a group that
        # leaves gives its slot to the last one, so no step costs O(table) (rebuilding a list of
        # 133k ids after each eviction cost a sample 16 ms)
        self._slots: list[str] = []
        self._slot_of: dict[str, int] = {}
        # the held ids by group version: a new learner version drops whole buckets, not a scan
        self._by_version: dict[int, dict[str, None]] = {}
        # by slot: each group's priority and insertion number, so the heap selectors work on
        # arrays (a sample of a full table of 133k sorted it in Python: 0.1-1 s), and for the
        # prioritized selector priority ** priority_exponent in a sum tree
        self._priority, self._order = np.zeros(64), np.zeros(64, np.int64)
        self._weights = SumTree() if config.selector == "prioritized" else None
        self._seen: OrderedDict[str, None] = OrderedDict()      # recent ids, for idempotent inserts
        self._remember_ids = remember_ids
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self._items)

    def insert(self, group: RolloutGroup, priority: float = 1.0) -> bool:
        """Store the group; False if its id was stored before (a re-sent insert). ValueError,
        with nothing changed, if a prioritized table cannot weigh its priority (weight_of)."""
        self.weight_of(float(priority))
        # held, or stored lately: a group held longer than `remember_ids` later inserts is
        # still refused, not given a second slot
        if group.id in self._seen or group.id in self._items:
            self.stats.duplicates += 1
            return False
        self._seen[group.id] = None
        if len(self._seen) > self._remember_ids:
            self._seen.popitem(last=False)
        self.stats.inserts += 1
        if self.staleness(group) > self.config.max_staleness:  # arrived too late to be used
            self.stats.dropped_stale += 1
            self.stats.dropped_staleness[self.staleness(group)] += 1
            return True
        self._items[group.id] = _Entry(group, priority=float(priority), order=self.stats.inserts)
        self._hold(self._items[group.id])
        while len(self._items) > self.config.max_size:
            self._remove_unsampled(next(iter(self._items)))
            self.stats.evicted += 1
        return True

    def _remove_unsampled(self, key: str) -> None:
        """Remove a group that leaves without (all its) hand-outs; the ratio limiter counts
        what it will never hand out as handed out."""
        entry = self._items.pop(key)
        self._forget(entry.group)
        if self.config.max_times_sampled:
            self.stats.unsampled_credit += self.config.max_times_sampled - entry.times_sampled
        elif entry.times_sampled == 0:
            self.stats.unsampled_credit += 1

    def _hold(self, entry: _Entry) -> None:
        """Give a group just put in _items its slot and its version bucket."""
        group, slot = entry.group, len(self._slots)
        self._slot_of[group.id] = slot
        self._slots.append(group.id)
        self._by_version.setdefault(group.version, {})[group.id] = None
        if slot == len(self._order):   # the slot arrays double when full
            self._priority, self._order = (np.concatenate([a, np.zeros_like(a)]) for a in (self._priority, self._order))
        self._order[slot] = entry.order
        self._set_priority(slot, entry.priority)

    def _set_priority(self, slot: int, priority: float) -> None:
        self._priority[slot] = priority
        if self._weights is not None:
            self._weights.set(slot, self.weight_of(priority))

    def weight_of(self, priority: float) -> float:
        """priority ** priority_exponent, what a prioritized draw weighs a group by; ValueError
        if so large that the sum tree's sums could overflow (a draw from an infinite total
        would take the first slot every time). Other selectors draw by no weight: any finite
        priority will do."""
        if self._weights is None:
            return priority
        try:
            weight = priority ** self.config.priority_exponent
        except OverflowError:
            weight = math.inf
        if not weight <= MAX_WEIGHT:
            raise ValueError(f"priority {priority!r} ** priority_exponent {self.config.priority_exponent} is too large "
                             f"for the prioritized selector's sums (at most {MAX_WEIGHT:g})")
        return weight

    def _forget(self, group: RolloutGroup) -> None:
        """Take a group just removed from _items out of the slots and its version bucket."""
        key = group.id
        slot, last = self._slot_of.pop(key), self._slots.pop()
        if last != key:
            self._slots[slot] = last
            self._slot_of[last] = slot
            end = len(self._slots)   # the last one's slot, now free
            for a in (self._priority, self._order):
                a[slot] = a[end]
            if self._weights is not None:
                self._weights.set(slot, self._weights.get(end))
        if self._weights is not None:
            self._weights.set(len(self._slots), 0.0)   # the freed slot draws nothing
        bucket = self._by_version[group.version]
        del bucket[key]
        if not bucket:
            del self._by_version[group.version]

    # -- the rate limiter -------------------------------------------------------------------
    def _balance(self) -> float:
        """inserts x samples_per_insert - hand-outs (a removed unsampled group counted as handed out)."""
        s = self.stats
        return s.inserts * self.config.samples_per_insert - s.samples - s.unsampled_credit

    def can_insert(self, n: int = 1) -> bool:
        """Whether n groups may be inserted now (else the insert waits)."""
        room = self.room()
        if room is None:
            return True
        if self.config.rate_limiter == "ratio":
            return room >= 1   # n at once would never fit a small window: admit them if one more would
        return room >= n

    def room(self) -> int | None:
        """How many more groups the rate limiter would take now without holding an insert;
        None for a limiter that never holds one (min_size). An actor starts no more groups
        than this (actors/actor.py), so none waits generated while the learner moves on."""
        c = self.config
        if c.rate_limiter == "queue":
            return max(0, c.max_size - len(self._items))
        if c.rate_limiter == "ratio":
            most = c.samples_per_insert * c.min_size_to_sample + c.error_buffer
            # can_insert's test, k times over (the 1e-9: a quotient that should be whole)
            return max(0, math.floor((most - self._balance()) / c.samples_per_insert + 1e-9))
        return None

    def update_priorities(self, priorities: dict) -> int:
        """Set the priority of each id held; returns how many were held (others are gone).
        ValueError, with nothing changed, if a prioritized table cannot weigh one (weight_of)."""
        for value in priorities.values():
            self.weight_of(float(value))
        held = 0
        for key, value in priorities.items():
            entry = self._items.get(key)
            if entry is not None:
                entry.priority = float(value)
                self._set_priority(self._slot_of[key], entry.priority)
                held += 1
        return held

    def set_learner_version(self, version: int) -> None:
        self.learner_version = max(self.learner_version, int(version))
        self.drop_stale()

    def staleness(self, group: RolloutGroup) -> int:
        return self.learner_version - group.version

    def drop_stale(self) -> int:
        oldest_fresh = self.learner_version - self.config.max_staleness   # staleness > max_staleness below it
        stale = [k for v in sorted(self._by_version) if v < oldest_fresh for k in self._by_version[v]]
        for k in stale:
            self.stats.dropped_staleness[self.staleness(self._items[k].group)] += 1
            self._remove_unsampled(k)
        self.stats.dropped_stale += len(stale)
        return len(stale)

    def can_sample(self, n: int) -> bool:
        # Staleness only grows when the version moves (drop_stale) or a group arrives (insert),
        # so every held group is fresh here without a scan.
        c = self.config
        if len(self._items) < max(n, c.min_size_to_sample):
            return False
        if c.rate_limiter == "ratio":
            least = c.samples_per_insert * c.min_size_to_sample - c.error_buffer
            return self._balance() - 1 >= least  # (n at once: admitted if one hand-out would be)
        return True

    def sample(self, n: int) -> list[RolloutGroup] | None:
        """n distinct groups chosen by the selector, or None if too few are held."""
        groups = self.select(n)
        if groups is not None:
            self.mark_sampled(groups)
        return groups

    def select(self, n: int) -> list[RolloutGroup] | None:
        """The n groups a sample would take, or None if too few are held; changes nothing
        until mark_sampled, so a sample whose reply cannot be delivered takes nothing."""
        if not self.can_sample(n):
            return None
        selector = self.config.selector
        # fifo and lifo read the ends, and uniform draws slots: a sample costs O(n), not
        # O(table) (listing an OrderedDict of 133k groups took 16 ms)
        if selector == "fifo":
            chosen = list(islice(self._items, n))
        elif selector == "lifo":
            chosen = list(islice(reversed(self._items), n))
        elif selector == "uniform":
            chosen = [self._slots[i] for i in self._rng.sample(range(len(self._slots)), n)]
        elif selector in ("max_heap", "min_heap"):
            chosen = [self._slots[i] for i in self._first_by_priority(n, -1.0 if selector == "max_heap" else 1.0)]
        else:  # prioritized: n distinct draws, each with probability ~ priority ** exponent
            chosen = [self._slots[i] for i in self._drawn_by_weight(n)]
        return [self._items[k].group for k in chosen]

    def _first_by_priority(self, n: int, sign: float) -> list:
        """The n slots first by (sign * priority, insertion number), in that order."""
        held = len(self._slots)
        key, order = sign * self._priority[:held], self._order[:held]
        if n < held:   # those below the n-th key, then its ties oldest first
            nth = np.partition(key, n - 1)[n - 1]
            below, ties = np.flatnonzero(key < nth), np.flatnonzero(key == nth)
            slots = np.concatenate([below, ties[np.argsort(order[ties], kind="stable")][:n - len(below)]])
        else:
            slots = np.arange(held)
        return slots[np.lexsort((order[slots], key[slots]))].tolist()

    def _drawn_by_weight(self, n: int) -> list:
        """n distinct slots, each draw with probability proportional to its weight among those
        not drawn yet (uniformly among them if all their weights are 0). O(n log table)."""
        weights, drawn, taken = self._weights, [], []
        for _ in range(n):
            total = weights.total
            if total > 0:   # the slot whose running sum first exceeds the draw: never a weight of 0
                i = weights.find(self._rng.random() * total)
            else:
                chosen = set(drawn)
                left = [s for s in range(len(self._slots)) if s not in chosen]
                i = left[self._rng.randrange(len(left))]
            drawn.append(i)
            taken.append(weights.get(i))
            weights.set(i, 0.0)   # drawn once: not again in this sample
        for i, weight in zip(drawn, taken):
            weights.set(i, weight)
        return drawn

    def mark_sampled(self, groups: list[RolloutGroup]) -> None:
        """Count the hand-out of groups from select(); remove those sampled max_times_sampled times."""
        for group in groups:
            entry = self._items[group.id]
            entry.times_sampled += 1
            if self.config.max_times_sampled and entry.times_sampled >= self.config.max_times_sampled:
                del self._items[group.id]
                self._forget(group)
                self.stats.consumed += 1
            self.stats.staleness[self.staleness(group)] += 1
        self.stats.samples += len(groups)

    # -- checkpoints -----------------------------------------------------------------------
    def state(self, new_after: int | None = None) -> dict:
        """Everything a restored table needs to continue as this one: the groups in insertion
        order with their sample counts, their slots (what uniform draws), the recent ids (so
        re-sent inserts stay idempotent across a restart), the learner version, the counters
        and the RNG. `new_after` (a delta checkpoint's: the inserts its base had counted): the
        groups stored before then are named by their id alone, the base holding them."""
        s = self.stats
        return {"learner_version": self.learner_version,
                "items": [[e.group.to_wire() if new_after is None or e.order > new_after else e.group.id,
                           e.times_sampled, e.priority, e.order] for e in self._items.values()],
                "slots": list(self._slots),
                "seen": list(self._seen),
                "stats": {"inserts": s.inserts, "duplicates": s.duplicates, "samples": s.samples,
                          "consumed": s.consumed, "dropped_stale": s.dropped_stale, "evicted": s.evicted,
                          "unsampled_credit": s.unsampled_credit,
                          "staleness": [[k, v] for k, v in s.staleness.items()],
                          "dropped_staleness": [[k, v] for k, v in s.dropped_staleness.items()]},
                "rng": _jsonable_rng(self._rng.getstate())}

    def restore(self, state: dict, base: dict | None = None) -> None:
        """Become the table `state()` described (its groups validated again); `base`: the state
        of the whole checkpoint a delta's state builds on, which holds the groups it names by
        id. ValueError, with nothing changed, if one is not there."""
        held = {}
        if base is not None:
            named = {data for data, *_ in state["items"] if type(data) is str}
            held = {g.id: g for g in (RolloutGroup.from_wire(data) for data, *_ in base["items"]) if g.id in named}
            missing = named - held.keys()
            if missing:
                raise ValueError(f"{len(missing)} group(s) named by the checkpoint are not in its base, "
                                 f"such as {sorted(missing)[0]!r}")
        elif any(type(data) is str for data, *_ in state["items"]):
            raise ValueError("the checkpoint is a delta (it names groups by id) but no base was given")
        self._items = OrderedDict()
        self._priority, self._order = np.zeros(64), np.zeros(64, np.int64)   # what was held weighs nothing now
        self._weights = SumTree() if self.config.selector == "prioritized" else None
        for data, times_sampled, priority, order in state["items"]:
            group = held[data] if type(data) is str else RolloutGroup.from_wire(data)
            self._items[group.id] = _Entry(group, int(times_sampled), float(priority), int(order))
        slots = [str(k) for k in state.get("slots", [])]   # (checkpoints before slots: insertion order)
        self._slots, self._slot_of, self._by_version = [], {}, {}
        for key in slots if sorted(slots) == sorted(self._items) else list(self._items):
            self._hold(self._items[key])
        self._seen = OrderedDict((str(k), None) for k in state["seen"])
        self.learner_version = int(state["learner_version"])
        st = dict(state["stats"])
        self.stats = TableStats(**{k: int(st[k]) for k in ("inserts", "duplicates", "samples", "consumed",
                                                         "dropped_stale", "evicted", "unsampled_credit")},
                                staleness=Counter({int(k): int(v) for k, v in st["staleness"]}),
                                dropped_staleness=Counter({int(k): int(v) for k, v in st.get("dropped_staleness", [])}))
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self.drop_stale()  # the table's own bound, in case the config changed

    def summary(self) -> dict:
        """size (groups held), learner_version and the counters of TableStats, whose meanings
        it documents; inserts == size + consumed + dropped_stale + evicted."""
        s = self.stats
        return {
            "size": len(self._items), "learner_version": self.learner_version,
            "inserts": s.inserts, "duplicates": s.duplicates, "samples": s.samples,
            "consumed": s.consumed, "dropped_stale": s.dropped_stale, "evicted": s.evicted,
            "staleness_histogram": {str(k): v for k, v in sorted(s.staleness.items())},
            "dropped_staleness_histogram": {str(k): v for k, v in sorted(s.dropped_staleness.items())},
            "rate_limiter": self.config.rate_limiter, "balance": self._balance(),
        }


def _jsonable_rng(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]
