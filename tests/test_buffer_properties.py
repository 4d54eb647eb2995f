"""Property-based tests of the table's selectors, removers and rate limiters against a simple
reference model: random sequences of inserts, samples, version moves and priority updates."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, example
from hypothesis import strategies as st

from buffer.table import SumTree, Table, TableConfig
from tests.conftest import make_group


class Reference:
    """The table's documented behaviour, written as plainly as possible (lists, scans)."""

    def __init__(self, c: TableConfig):
        self.c = c
        self.items = []  # dicts: id, version, times, priority, order
        self.seen = set()
        self.version = self.inserts = self.samples = self.credit = 0
        self.dropped = self.evicted = self.consumed = self.duplicates = 0

    def remove(self, item):
        self.items.remove(item)
        self.credit += (self.c.max_times_sampled - item["times"]) if self.c.max_times_sampled else int(item["times"] == 0)

    def balance(self):
        return self.inserts * self.c.samples_per_insert - self.samples - self.credit

    def can_insert(self, n=1):
        if self.c.rate_limiter == "queue":
            return len(self.items) + n <= self.c.max_size
        if self.c.rate_limiter == "ratio":
            return self.balance() + self.c.samples_per_insert <= \
                self.c.samples_per_insert * self.c.min_size_to_sample + self.c.error_buffer
        return True

    def insert(self, gid, version, priority):
        if gid in self.seen:
            self.duplicates += 1
            return False
        self.seen.add(gid)
        self.inserts += 1
        if self.version - version > self.c.max_staleness:
            self.dropped += 1
            return True
        self.items.append({"id": gid, "version": version, "times": 0, "priority": priority, "order": self.inserts})
        while len(self.items) > self.c.max_size:
            self.remove(self.items[0])
            self.evicted += 1
        return True

    def set_version(self, v):
        self.version = max(self.version, v)
        for item in [i for i in self.items if self.version - i["version"] > self.c.max_staleness]:
            self.remove(item)
            self.dropped += 1

    def can_sample(self, n):
        if len(self.items) < max(n, self.c.min_size_to_sample):
            return False
        if self.c.rate_limiter == "ratio":
            return self.balance() - 1 >= self.c.samples_per_insert * self.c.min_size_to_sample - self.c.error_buffer
        return True

    def select(self, n):
        s = self.c.selector
        if s == "fifo":
            return self.items[:n]
        if s == "lifo":
            return self.items[::-1][:n]
        sign = -1 if s == "max_heap" else 1
        return sorted(self.items, key=lambda i: (sign * i["priority"], i["order"]))[:n]

    def sample(self, n, taken=None):
        """`taken`: the ids a random selector (uniform, prioritized) drew, to be checked by the caller."""
        if not self.can_sample(n):
            return None
        chosen = self.select(n) if taken is None else [next(i for i in self.items if i["id"] == t) for t in taken]
        for item in chosen:
            item["times"] += 1
            if self.c.max_times_sampled and item["times"] >= self.c.max_times_sampled:
                self.items.remove(item)
                self.consumed += 1
        self.samples += n
        return [i["id"] for i in chosen]


configs = st.one_of(
    st.builds(TableConfig, max_size=st.integers(1, 12), max_staleness=st.integers(0, 3),
              selector=st.sampled_from(["fifo", "lifo", "max_heap", "min_heap", "uniform", "prioritized"]),
              priority_exponent=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
              max_times_sampled=st.integers(0, 3), min_size_to_sample=st.just(1),
              rate_limiter=st.just("min_size")),
    st.builds(TableConfig, max_size=st.integers(4, 12), max_staleness=st.integers(0, 3),
              selector=st.sampled_from(["fifo", "lifo", "max_heap"]), max_times_sampled=st.integers(1, 2),
              min_size_to_sample=st.integers(1, 3), rate_limiter=st.just("ratio"),
              samples_per_insert=st.sampled_from([0.5, 1.0, 2.0]), error_buffer=st.sampled_from([1.0, 2.5, 6.0])),
    st.builds(TableConfig, max_size=st.integers(1, 8), max_staleness=st.integers(0, 3), selector=st.just("fifo"),
              max_times_sampled=st.just(1), rate_limiter=st.just("queue")),
)
_insert = st.tuples(st.just("insert"), st.integers(-3, 0), st.floats(0, 10))
_sample = st.tuples(st.just("sample"), st.integers(1, 4))
operations = st.lists(st.one_of(  # inserts and samples most often, so tables fill and drain
    _insert, _insert, _insert, _sample, _sample,
    st.tuples(st.just("version"), st.integers(0, 2)),
    st.tuples(st.just("priority"), st.integers(0, 11), st.floats(0, 10)),
), min_size=10, max_size=80)


def valid(config: TableConfig) -> bool:
    try:
        config.validate()
        return True
    except Exception:
        return False


@settings(max_examples=300, deadline=None)
@given(configs, operations)
def test_the_table_does_what_the_reference_model_does(config, ops):
    if not valid(config):
        return
    table, ref = Table(config), Reference(config)
    for i, op in enumerate(ops):
        if op[0] == "insert":
            version = max(0, ref.version + op[1])
            assert table.can_insert() == ref.can_insert()
            if ref.can_insert():  # the server holds an insert the limiter refuses
                group = make_group(version=version, prompt_id=f"g{i}", group_size=2, length=4)
                assert table.insert(group, op[2]) == ref.insert(group.id, version, op[2])
        elif op[0] == "sample":
            got = table.sample(op[1])
            if config.selector in ("uniform", "prioritized") and got is not None:   # a random draw: distinct groups held
                ids = [g.id for g in got]
                assert len(set(ids)) == len(ids) == op[1] and set(ids) <= {i["id"] for i in ref.items}
                want = ref.sample(op[1], taken=ids)
            else:
                want = ref.sample(op[1])
            assert (got is None) == (want is None)
            if got is not None:
                assert [g.id for g in got] == want
        elif op[0] == "version":
            table.set_learner_version(ref.version + op[1])
            ref.set_version(ref.version + op[1])
        elif ref.items:
            item = ref.items[op[1] % len(ref.items)]
            item["priority"] = op[2]
            assert table.update_priorities({item["id"]: op[2]}) == 1
        # the indexes beside the groups: every held id in one slot, and in the bucket of its version
        assert sorted(table._slots) == sorted(i["id"] for i in ref.items)
        assert all(table._slots[slot] == key for key, slot in table._slot_of.items())
        assert {k: v for v, bucket in table._by_version.items() for k in bucket} == \
            {i["id"]: i["version"] for i in ref.items} and all(table._by_version.values())
        held = {i["id"]: i for i in ref.items}   # and each slot's priority and insertion number
        assert all((table._priority[slot], table._order[slot]) == (held[key]["priority"], held[key]["order"])
                   for key, slot in table._slot_of.items())
        if table._weights is not None:   # the sum tree: held slots weigh priority ** exponent, the rest 0
            tree, cap = table._weights._tree, table._weights.capacity
            assert all(tree[cap + slot] == held[key]["priority"] ** config.priority_exponent
                       for key, slot in table._slot_of.items())
            assert not any(tree[cap + len(table._slots):])
            assert all(tree[i] == tree[2 * i] + tree[2 * i + 1] for i in range(1, cap))
        s = table.summary()
        assert (s["size"], s["inserts"], s["samples"], s["consumed"], s["dropped_stale"], s["evicted"]) == \
            (len(ref.items), ref.inserts, ref.samples, ref.consumed, ref.dropped, ref.evicted)
        assert s["inserts"] == s["size"] + s["consumed"] + s["dropped_stale"] + s["evicted"] or \
            config.max_times_sampled == 0
        if config.rate_limiter == "ratio":  # inserts never run ahead of the window
            c = config
            assert ref.balance() <= c.samples_per_insert * c.min_size_to_sample + c.error_buffer + 1e-9
        if config.rate_limiter == "queue":
            assert s["evicted"] == 0  # a queue makes inserts wait instead


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(0, 5), min_size=2, max_size=10), st.floats(0, 3), st.integers(0, 2**31))
@example([1.0, 5e-324, 0.0, 1.0, 1.0], 1.0, 0)   # random.choices took the 0 beside a denormal weight
def test_prioritized_sampling_takes_distinct_held_groups_and_never_a_zero_priority_one_needlessly(
        priorities, exponent, seed):
    table = Table(TableConfig(selector="prioritized", priority_exponent=exponent, max_times_sampled=0), seed=seed)
    groups = [make_group(prompt_id=f"g{i}", group_size=2, length=4) for i in range(len(priorities))]
    for g, p in zip(groups, priorities):
        table.insert(g, p)
    positive = [g.id for g, p in zip(groups, priorities) if p ** exponent > 0]
    for n in range(1, len(groups) + 1):
        chosen = [g.id for g in table.sample(n)]
        assert len(set(chosen)) == n and set(chosen) <= {g.id for g in groups}
        if n <= len(positive):
            assert set(chosen) <= set(positive)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.sampled_from([0.0, 5e-324, 0.5, 1.0, 3.0, 1e6])), min_size=1,
                max_size=60), st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=10))
def test_the_sum_tree_finds_what_a_running_sum_finds(sets, draws):
    # the oracle: numpy's cumulative sum and search over the same weights
    tree, weights = SumTree(capacity=4), np.zeros(512)
    for slot, weight in sets:
        tree.set(slot, weight)
        weights[slot] = weight
    assert tree.capacity > max(s for s, _ in sets) and all(tree.get(s) == weights[s] for s in range(512))
    assert math.isclose(tree.total, weights.sum(), rel_tol=1e-12)
    if tree.total > 0:
        cumulative = np.cumsum(weights)
        for u in draws:
            value = u * tree.total
            slot = tree.find(value)
            assert weights[slot] > 0
            expected = int(np.searchsorted(cumulative, value, side="right"))
            if weights[min(expected, 511)] > 0 and not math.isclose(value, cumulative[expected - 1] if expected else 0):
                assert slot == expected   # off a boundary between two slots, rounding cannot tell them apart


def test_a_restored_prioritized_table_draws_only_what_it_restored():
    # restoring into a table that held more groups: their weights must not stay in the tree
    small = Table(TableConfig(selector="prioritized", max_times_sampled=0), seed=1)
    for i in range(3):
        small.insert(make_group(prompt_id=f"s{i}", group_size=2, length=4), 1.0)
    big = Table(small.config, seed=2)
    for i in range(10):
        big.insert(make_group(prompt_id=f"b{i}", group_size=2, length=4), 1.0 + i)
    big.restore(small.state())
    held = {g.id for g in small.sample(3)}
    for _ in range(50):
        assert {g.id for g in big.sample(2)} <= held


def test_a_priority_whose_weight_would_overflow_the_sums_is_refused_naming_it():
    table = Table(TableConfig(selector="prioritized", priority_exponent=2.0, max_times_sampled=0))
    with pytest.raises(ValueError, match="priority 1e\\+200 \\*\\* priority_exponent 2.0 is too large"):
        table.weight_of(1e200)
    assert table.weight_of(1e100) == 1e200
    table.insert(make_group(prompt_id="kept", group_size=2, length=4), 1.0)
    with pytest.raises(ValueError, match="too large"):
        table.insert(make_group(prompt_id="heavy", group_size=2, length=4), 1e200)
    with pytest.raises(ValueError, match="too large"):
        table.update_priorities({table.sample(1)[0].id: 1e200})
    assert len(table) == 1 and table.summary()["inserts"] == 1 and table._weights.total == 1.0   # nothing changed
    assert Table(TableConfig(selector="fifo")).weight_of(1e300) == 1e300   # no draw by weight: any finite one


def test_prioritized_sampling_follows_the_priorities():
    table = Table(TableConfig(selector="prioritized", priority_exponent=1.0, max_times_sampled=0), seed=1)
    for i, p in enumerate([1.0, 3.0]):
        table.insert(make_group(prompt_id=f"g{i}", group_size=2, length=4), p)
    picks = [table.sample(1)[0].prompt_id for _ in range(4000)]
    share = picks.count("g1") / len(picks)
    assert math.isclose(share, 0.75, abs_tol=0.03)


@pytest.mark.parametrize("setting, key", [
    (dict(rate_limiter="ratio", samples_per_insert=4.0, error_buffer=1.0), "error_buffer"),
    (dict(rate_limiter="queue", selector="uniform"), "selector"),
    (dict(rate_limiter="queue", max_times_sampled=2), "max_times_sampled"),
    (dict(rate_limiter="leaky"), "rate_limiter"),
])
def test_a_rate_limiter_that_could_deadlock_is_refused_naming_the_key(setting, key):
    from common.config import ConfigError, validate
    with pytest.raises(ConfigError, match=key):
        validate(TableConfig(**setting))
