"""A table of rollout groups: selection, removal, a size bound and a staleness bound.

Plain Python, single-threaded: the server owns one table and calls it from its loop.
"""
from __future__ import annotations

import random
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from common.config import check
from common.rollout import RolloutGroup

SELECTORS = ("fifo", "lifo", "uniform")


@dataclass
class TableConfig:
    max_size: int = 1024
    """Groups held at most; inserting into a full table removes the oldest group."""
    max_staleness: int = 4
    """A group is never sampled once learner_version - group.version exceeds this; it is
    dropped and counted in `dropped_stale`."""
    selector: str = "fifo"
    """Which groups a sample takes: fifo (oldest first), lifo (newest first) or uniform."""
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


@dataclass
class _Entry:
    group: RolloutGroup
    times_sampled: int = 0


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
    staleness: Counter = field(default_factory=Counter)  # staleness at sampling -> hand-outs


class Table:
    def __init__(self, config: TableConfig, seed: int = 0, remember_ids: int = 100_000):
        self.config = config
        self.learner_version = 0
        self.stats = TableStats()
        self._items: OrderedDict[str, _Entry] = OrderedDict()  # insertion order
        self._seen: OrderedDict[str, None] = OrderedDict()      # recent ids, for idempotent inserts
        self._remember_ids = remember_ids
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self._items)

    def insert(self, group: RolloutGroup) -> bool:
        """Store the group; False if its id was stored before (a re-sent insert)."""
        if group.id in self._seen:
            self.stats.duplicates += 1
            return False
        self._seen[group.id] = None
        if len(self._seen) > self._remember_ids:
            self._seen.popitem(last=False)
        self.stats.inserts += 1
        if self.staleness(group) > self.config.max_staleness:  # arrived too late to be used
            self.stats.dropped_stale += 1
            return True
        self._items[group.id] = _Entry(group)
        while len(self._items) > self.config.max_size:
            self._items.popitem(last=False)
            self.stats.evicted += 1
        return True

    def set_learner_version(self, version: int) -> None:
        self.learner_version = max(self.learner_version, int(version))
        self.drop_stale()

    def staleness(self, group: RolloutGroup) -> int:
        return self.learner_version - group.version

    def drop_stale(self) -> int:
        stale = [k for k, e in self._items.items() if self.staleness(e.group) > self.config.max_staleness]
        for k in stale:
            del self._items[k]
        self.stats.dropped_stale += len(stale)
        return len(stale)

    def can_sample(self, n: int) -> bool:
        # Staleness only grows when the version moves (drop_stale) or a group arrives (insert),
        # so every held group is fresh here without a scan.
        return len(self._items) >= max(n, self.config.min_size_to_sample)

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
        keys = list(self._items)
        if self.config.selector == "fifo":
            chosen = keys[:n]
        elif self.config.selector == "lifo":
            chosen = keys[-n:][::-1]
        else:
            chosen = self._rng.sample(keys, n)
        return [self._items[k].group for k in chosen]

    def mark_sampled(self, groups: list[RolloutGroup]) -> None:
        """Count the hand-out of groups from select(); remove those sampled max_times_sampled times."""
        for group in groups:
            entry = self._items[group.id]
            entry.times_sampled += 1
            if self.config.max_times_sampled and entry.times_sampled >= self.config.max_times_sampled:
                del self._items[group.id]
                self.stats.consumed += 1
            self.stats.staleness[self.staleness(group)] += 1
        self.stats.samples += len(groups)

    # -- checkpoints -----------------------------------------------------------------------
    def state(self) -> dict:
        """Everything a restored table needs to continue as this one: the groups in insertion
        order with their sample counts, the recent ids (so re-sent inserts stay idempotent
        across a restart), the learner version, the counters and the RNG."""
        s = self.stats
        return {"learner_version": self.learner_version,
                "items": [[e.group.to_wire(), e.times_sampled] for e in self._items.values()],
                "seen": list(self._seen),
                "stats": {"inserts": s.inserts, "duplicates": s.duplicates, "samples": s.samples,
                          "consumed": s.consumed, "dropped_stale": s.dropped_stale, "evicted": s.evicted,
                          "staleness": [[k, v] for k, v in s.staleness.items()]},
                "rng": _jsonable_rng(self._rng.getstate())}

    def restore(self, state: dict) -> None:
        """Become the table `state()` described (its groups validated again)."""
        self._items = OrderedDict()
        for data, times_sampled in state["items"]:
            group = RolloutGroup.from_wire(data)
            self._items[group.id] = _Entry(group, int(times_sampled))
        self._seen = OrderedDict((str(k), None) for k in state["seen"])
        self.learner_version = int(state["learner_version"])
        st = dict(state["stats"])
        self.stats = TableStats(**{k: int(st[k]) for k in ("inserts", "duplicates", "samples", "consumed",
                                                         "dropped_stale", "evicted")},
                                staleness=Counter({int(k): int(v) for k, v in st["staleness"]}))
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
        }


def _jsonable_rng(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]
