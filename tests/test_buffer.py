"""The buffer server and client over real ZeroMQ sockets on loopback."""
import random
import subprocess
import threading
import sys
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from buffer.client import PROTOCOL, BufferClient, BufferError, BufferHeld, BufferRefused, BufferTimeout
from buffer.server import BufferConfig, BufferServer
from buffer.table import Table, TableConfig
from common.config import ConfigError, validate
from common.rollout import RolloutGroup
from common.wire import Frames, encode
from tests.conftest import make_group


def test_inserted_groups_come_back_whole_and_in_fifo_order(buffer_server):
    server = buffer_server()
    client = BufferClient(server.address, timeout_s=5.0)
    sent = [make_group(seed=i) for i in range(3)]
    for g in sent:
        assert client.insert(g)["stored"] == [True]
    groups, staleness, version = client.sample(2)
    assert [g.id for g in groups] == [sent[0].id, sent[1].id]
    assert (groups[0].tokens == sent[0].tokens).all() and staleness == [0, 0] and version == 0
    assert client.stats()["size"] == 1  # max_times_sampled=1: sampled groups leave the table


def test_a_resent_insert_is_stored_once(buffer_server):
    client = BufferClient(buffer_server().address, timeout_s=5.0)
    group = make_group()
    assert client.insert(group)["stored"] == [True]
    assert client.insert(group, make_group(seed=5))["stored"] == [False, True]
    stats = client.stats()
    assert stats["size"] == 2 and stats["inserts"] == 2 and stats["duplicates"] == 1


def test_a_group_held_longer_than_the_remembered_ids_is_still_refused_when_resent():
    """The table remembers the last `remember_ids` ids; a group still held past them is a
    duplicate all the same (it once took a second slot, and a later draw failed on it)."""
    table = Table(TableConfig(max_size=10, max_staleness=100), remember_ids=3)
    groups = [make_group(seed=i, prompt_id=f"p{i}") for i in range(5)]
    assert all(table.insert(g) for g in groups)
    assert table.insert(groups[0]) is False and table.stats.duplicates == 1 and len(table) == 5
    assert sorted(g.id for g in table.select(5)) == sorted(g.id for g in groups)


def test_groups_past_the_staleness_bound_are_dropped_and_never_sampled(buffer_server):
    client = BufferClient(buffer_server(max_staleness=2).address, timeout_s=5.0)
    old, fresh = make_group(version=0, seed=1), make_group(version=3, seed=2)
    client.insert(old, fresh)
    assert client.set_learner_version(3)["dropped"] == 1  # 3 - 0 > 2
    groups, staleness, version = client.sample(1)
    assert groups[0].id == fresh.id and staleness == [0] and version == 3
    stats = client.stats()
    assert stats["dropped_stale"] == 1 and stats["staleness_histogram"] == {"0": 1}
    assert stats["dropped_staleness_histogram"] == {"3": 1}  # what was dropped, and how stale
    late = make_group(version=0, seed=3)  # arrives already too stale
    client.insert(late)
    assert client.stats()["dropped_staleness_histogram"] == {"3": 2}
    with pytest.raises(BufferError, match="timeout: fewer than 1 fresh groups"):
        client.sample(1, timeout_s=0.3)
    assert client.stats()["dropped_stale"] == 2


def test_a_sample_waits_for_inserts_until_its_deadline(buffer_server):
    server = buffer_server()
    learner, actor = BufferClient(server.address, timeout_s=5.0), BufferClient(server.address, timeout_s=5.0)
    import threading
    threading.Timer(0.3, lambda: actor.insert(make_group(seed=1), make_group(seed=2))).start()
    t = time.monotonic()
    groups, _, _ = learner.sample(2, timeout_s=5.0)
    assert len(groups) == 2 and 0.25 < time.monotonic() - t < 4.0


def test_malformed_and_oversize_requests_get_an_error_reply_echoing_their_rid_and_the_server_keeps_serving(
        buffer_server):
    server = buffer_server()
    server.config.max_message_mb = 0.001
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.connect(server.address)

    def ask(*frames):
        raw.send_multipart(list(frames))
        assert raw.poll(5000)
        rid, header = raw.recv_multipart()
        return int.from_bytes(rid, "big"), msgpack.unpackb(header)

    rid, reply = ask((6).to_bytes(8, "big"), b"\xc1not msgpack")
    assert rid == 6 and reply["ok"] is False and "WireError: header is not valid msgpack" in reply["error"]
    rid, reply = ask((7).to_bytes(8, "big"), msgpack.packb({"op": "insert", "protocol": PROTOCOL, "groups": [{"tokens": 1}]}))
    assert rid == 7 and reply["ok"] is False and "SchemaError: group 0" in reply["error"]
    rid, reply = ask((8).to_bytes(8, "big"), msgpack.packb({"op": "stats"}), b"x" * 2000)
    assert rid == 8 and reply["ok"] is False and "exceeds max_message_mb" in reply["error"]
    rid, reply = ask(msgpack.packb({"op": "stats"}))  # no request id frame: answered with rid 0
    assert rid == 0 and reply["ok"] is False and "request id, a frame of 8 bytes" in reply["error"]
    raw.close(linger=0)
    server.config.max_message_mb = 512
    client = BufferClient(server.address, timeout_s=5.0)
    assert client.insert(make_group())["stored"] == [True] and server.errors == 4


def test_a_request_with_one_bad_group_stores_none_of_it(buffer_server):
    client = BufferClient(buffer_server().address, timeout_s=5.0)
    good, bad = make_group(seed=1), make_group(seed=2)
    bad.rewards = bad.rewards.astype("float64")
    with pytest.raises(BufferError, match="group 1: rewards: dtype must be float32"):
        client.insert(good, bad)
    assert client.stats()["size"] == 0
    assert client.insert(good)["stored"] == [True]  # nothing of the refused request was kept


def test_a_client_with_no_server_fails_loudly_naming_the_address():
    client = BufferClient("tcp://127.0.0.1:1", timeout_s=0.2, retries=1)
    t = time.monotonic()
    with pytest.raises(BufferTimeout, match=r"buffer at tcp://127.0.0.1:1 did not answer stats within 0.2s \(2 attempt"):
        client.stats()
    assert time.monotonic() - t < 3.0


def test_unknown_ops_and_impossible_samples_are_refused(buffer_server):
    client = BufferClient(buffer_server(max_size=4).address, timeout_s=5.0)
    with pytest.raises(BufferError, match="unknown op 'nope'"):
        client._call("nope")
    with pytest.raises(BufferError, match="can never be met"):
        client.sample(5)


def test_a_full_table_evicts_its_oldest_group():
    table = Table(TableConfig(max_size=2))
    groups = [make_group(seed=i) for i in range(3)]
    for g in groups:
        table.insert(g)
    assert [g.id for g in table.sample(2)] == [groups[1].id, groups[2].id] and table.stats.evicted == 1


@pytest.mark.parametrize("selector", ["lifo", "uniform"])
def test_other_selectors(selector):
    table = Table(TableConfig(selector=selector, max_times_sampled=0), seed=0)
    groups = [make_group(seed=i) for i in range(4)]
    for g in groups:
        table.insert(g)
    picked = table.sample(2)
    assert len({g.id for g in picked}) == 2 and len(table) == 4  # max_times_sampled=0 keeps them
    if selector == "lifo":
        assert picked[0].id == groups[-1].id


def test_impossible_table_settings_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match="'min_size_to_sample'"):
        validate(TableConfig(max_size=4, min_size_to_sample=8))
    with pytest.raises(ConfigError, match="'selector'"):
        validate(TableConfig(selector="random"))


# -- review, issue 18 --------------------------------------------------------------------------

def test_an_oversize_request_fails_at_once_with_the_servers_reason(buffer_server):
    server = buffer_server()
    server.config.max_message_mb = 0.001
    client = BufferClient(server.address, timeout_s=2.0, retries=3)
    t = time.monotonic()
    with pytest.raises(BufferError, match="refused insert: RequestError: message of .* exceeds max_message_mb"):
        client.insert(make_group(length=200))
    assert time.monotonic() - t < 1.0 and server.errors == 1  # answered at once, never re-sent


@pytest.mark.parametrize("op, fields, key", [
    ("set_version", {"version": float("inf")}, "version"),
    ("sample", {"n": 1, "timeout_s": float("inf")}, "timeout_s"),
    ("sample", {"n": 1, "timeout_s": float("nan")}, "timeout_s"),
    ("sample", {"n": float("inf")}, "n"),
])
def test_non_finite_numbers_are_refused_naming_the_field_and_the_server_keeps_serving(buffer_server, op, fields, key):
    server = buffer_server()
    client = BufferClient(server.address, timeout_s=1.0, retries=0)
    with pytest.raises(BufferError, match=f"'{key}' must be a finite"):
        client._call(op, idempotent=False, **fields)
    assert client.insert(make_group())["stored"] == [True]
    server.check()  # the serving thread is alive


class _TableWithABug(Table):
    def can_sample(self, n):
        raise RuntimeError("injected fault")


def test_a_dead_server_thread_fails_check_and_stop_naming_the_cause():
    server = BufferServer(BufferConfig(timeout_s=5.0))
    server.tables["rollouts"] = _TableWithABug(server.table.config)
    server.start()
    client = BufferClient(server.address, timeout_s=5.0)
    with pytest.raises(BufferTimeout):  # a pending sample reaches the bug, outside any one request
        client._call("sample", deadline_s=0.5, idempotent=False, n=1, timeout_s=5.0)
    with pytest.raises(BufferError, match="stopped serving: RuntimeError: injected fault"):
        server.check()
    with pytest.raises(BufferError, match="stopped serving: RuntimeError: injected fault"):
        server.stop()


def test_a_sample_whose_client_gave_up_takes_no_groups(buffer_server):
    server = buffer_server()
    quitter, actor = BufferClient(server.address, timeout_s=5.0), BufferClient(server.address, timeout_s=5.0)
    # The client gives up after 0.3s while the server would wait 30s, as when a busy server reads
    # the request late: its reply would come to nobody.
    with pytest.raises(BufferTimeout):
        quitter._call("sample", deadline_s=0.3, idempotent=False, n=2, timeout_s=30.0)
    time.sleep(0.2)
    sent = [make_group(seed=1), make_group(seed=2)]
    actor.insert(*sent)
    assert actor.stats()["size"] == 2
    groups, _, _ = BufferClient(server.address, timeout_s=5.0).sample(2)
    assert [g.id for g in groups] == [g.id for g in sent]


def test_a_sample_whose_client_was_killed_takes_no_groups(buffer_server):
    server = buffer_server()
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; from buffer.client import BufferClient; "
         f"c = BufferClient({server.address!r}); print('sampling', flush=True); c.sample(2, timeout_s=60)"],
        cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "sampling"
        time.sleep(0.5)  # the sample is pending in the server
    finally:
        child.kill()
        child.wait(10)
    time.sleep(0.2)
    actor = BufferClient(server.address, timeout_s=5.0)
    sent = [make_group(seed=1), make_group(seed=2)]
    actor.insert(*sent)
    assert actor.stats()["size"] == 2
    groups, _, _ = actor.sample(2)
    assert [g.id for g in groups] == [g.id for g in sent]


def test_a_request_with_an_unhashable_id_stores_none_of_it(buffer_server):
    client = BufferClient(buffer_server().address, timeout_s=5.0)
    good, bad = make_group(seed=1), make_group(seed=2)
    bad.id = ["not", "a", "string"]
    with pytest.raises(BufferError, match="group 1: id: must be a non-empty string"):
        client.insert(good, bad)
    assert client.stats()["size"] == 0
    assert client.insert(good)["stored"] == [True]


def test_a_request_that_repeats_an_id_is_refused_whole(buffer_server):
    client = BufferClient(buffer_server().address, timeout_s=5.0)
    group = make_group()
    with pytest.raises(BufferError, match=f"group 2: id {group.id!r} repeats group 0's"):
        client.insert(group, make_group(seed=1), group)
    assert client.stats()["size"] == 0


@pytest.mark.parametrize("max_times_sampled", [0, 1, 2])
def test_the_counters_add_up_for_every_max_times_sampled(max_times_sampled):
    table = Table(TableConfig(max_size=6, max_staleness=1, max_times_sampled=max_times_sampled))
    rng = random.Random(max_times_sampled)
    for i in range(300):
        action = rng.random()
        if action < 0.6:  # some arrive already too stale, some fill the table past max_size
            table.insert(make_group(version=max(0, table.learner_version - rng.randint(0, 2)), seed=i))
        elif action < 0.9:
            table.sample(rng.randint(1, 3))
        else:
            table.set_learner_version(table.learner_version + 1)
        s = table.summary()
        assert s["inserts"] == s["size"] + s["consumed"] + s["dropped_stale"] + s["evicted"], s
    assert s["evicted"] > 0 and s["dropped_stale"] > 0 and s["samples"] > 0
    assert (s["consumed"] > 0) == (max_times_sampled > 0)


def test_a_port_in_use_is_refused_naming_the_address_and_the_key(buffer_server):
    taken = buffer_server()
    with pytest.raises(ConfigError, match=rf"'buffer.port'.*tcp://127.0.0.1:{taken.port}.*in use"):
        BufferServer(BufferConfig(port=taken.port))


def test_a_rate_limited_insert_waits_for_the_learner_and_a_sample_releases_it(buffer_server):
    import threading

    from buffer.client import BufferClient
    server = buffer_server(rate_limiter="ratio", samples_per_insert=1.0, error_buffer=1.0, min_size_to_sample=1)
    actor, learner = BufferClient(server.address, timeout_s=5.0), BufferClient(server.address, timeout_s=5.0)
    try:
        actor.insert(make_group(seed=1, prompt_id="a"))
        actor.insert(make_group(seed=2, prompt_id="b"))      # the window: 2 inserts ahead of samples
        done = {}
        waiting = threading.Thread(target=lambda: done.update(reply=actor.insert(make_group(seed=3, prompt_id="c"))))
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive()                              # held by the rate limiter
        groups, _, _ = learner.sample(1, timeout_s=2.0)
        waiting.join(3.0)
        assert not waiting.is_alive() and done["reply"]["stored"] == [True]
        with pytest.raises(BufferError, match=r"rate limiter \(ratio\) of the table .rollouts. held this insert"):
            actor.insert(make_group(seed=4, prompt_id="d"), timeout_s=0.3)
    finally:
        actor.close()
        learner.close()


def test_priorities_given_at_insert_and_updated_choose_what_a_max_heap_samples(buffer_server):
    from buffer.client import BufferClient
    server = buffer_server(selector="max_heap", max_times_sampled=0)
    client = BufferClient(server.address, timeout_s=5.0)
    try:
        a, b, c = (make_group(seed=i, prompt_id=p) for i, p in enumerate("abc"))
        client.insert(a, b, c, priorities=[1.0, 5.0, 3.0])
        assert [g.prompt_id for g in client.sample(2, timeout_s=2.0)[0]] == ["b", "c"]
        assert client.update_priorities({a.id: 9.0, "gone": 1.0})["updated"] == 1
        assert client.sample(1, timeout_s=2.0)[0][0].prompt_id == "a"
        with pytest.raises(BufferError, match="priority must be a finite number >= 0"):
            client.insert(make_group(seed=7), priorities=[-1.0])
    finally:
        client.close()


def test_pipelined_inserts_are_acknowledged_as_they_land_and_stored_once(buffer_server):
    server = buffer_server(max_size=1000)
    client = BufferClient(server.address, timeout_s=5.0, window=8)
    try:
        groups = [make_group(seed=i, prompt_id=f"p{i}") for i in range(40)]
        for g in groups:
            client.put(g)
            assert client.in_flight <= 8
        assert client.flush() == {"puts": 40, "stored": 40, "duplicates": 0} and client.in_flight == 0
        client.put(*groups[:5])                 # re-sent: refused, not stored twice
        assert client.stats()["size"] == 40     # a blocking call hands the put's reply on, not drops it
        assert client.flush() == {"puts": 1, "stored": 0, "duplicates": 5}
        assert [g.prompt_id for g in client.sample(3)[0]] == ["p0", "p1", "p2"]   # in the order put
    finally:
        client.close()


def test_stats_report_how_long_samples_took_from_request_to_reply(buffer_server):
    server = buffer_server()
    reader, writer = BufferClient(server.address, timeout_s=5.0), BufferClient(server.address, timeout_s=5.0)
    try:
        assert reader.stats()["sample_reply_ms"] == {"p50": None, "p99": None, "count": 0}
        writer.insert(make_group(seed=1))
        threading.Timer(0.3, lambda: writer.insert(make_group(seed=2))).start()
        t = time.monotonic()
        reader.sample(2)                             # waits for the second group
        waited_ms = 1e3 * (time.monotonic() - t)
        times = reader.stats()["sample_reply_ms"]
        assert times["count"] == 1 and 290 <= times["p50"] == times["p99"] <= waited_ms
    finally:
        reader.close()
        writer.close()


def test_a_malformed_put_is_refused_alone_and_the_others_are_stored(buffer_server):
    client = BufferClient(buffer_server().address, timeout_s=5.0, window=4)
    try:
        good = [make_group(seed=i) for i in range(4)]
        bad = make_group(seed=9)
        bad.rewards = bad.rewards.astype("float64")
        client.put(good[0])
        client.put(good[1], bad)                # refused whole, alone
        client.put(good[2])
        client.put(good[3], table="nope")       # refused too: no such table
        with pytest.raises(BufferRefused, match="refused 2 of 4 pipelined inserts; the first, put 1") as refused:
            client.flush()
        assert [(index, ids) for index, ids, _ in refused.value.refused] == [(1, [good[1].id, bad.id]), (3, [good[3].id])]
        assert "rewards: dtype must be float32" in refused.value.refused[0][2]
        assert "unknown table 'nope'" in refused.value.refused[1][2]
        assert sorted(g.id for g in client.sample(2)[0]) == sorted([good[0].id, good[2].id])
        client.put(good[1])                     # the next flush starts afresh
        assert client.flush() == {"puts": 1, "stored": 1, "duplicates": 0}
    finally:
        client.close()


def test_puts_made_while_the_window_is_full_go_together_and_a_malformed_one_is_refused_alone():
    server = BufferServer(BufferConfig(timeout_s=5.0))   # bound, not serving yet: nothing is acknowledged
    client = BufferClient(server.address, timeout_s=5.0, window=2)
    try:
        good = [make_group(seed=i) for i in range(5)]
        bad = make_group(seed=9)
        bad.token_versions = bad.token_versions - 1     # a policy token without a version
        client.put(good[0])
        client.put(good[1])
        client.put(good[2], bad)
        client.put(good[3], good[4], priorities=[2.0, 3.0])
        assert client.in_flight == 2     # the window is full: the last two puts wait, to go as one request
        assert client.pending_puts == 4  # puts, not requests: what a writer counts as unacknowledged
        server.start()
        with pytest.raises(BufferRefused, match="refused 1 of 4 pipelined inserts; the first, put 2") as refused:
            client.flush()
        assert "token_versions" in refused.value.refused[0][2]
        assert client.pending_puts == 0
        assert client.stats()["size"] == 4 and server.errors == 1
        assert [g.id for g in client.sample(4, timeout_s=2.0)[0]] == [g.id for g in good[:2] + good[3:]]
    finally:
        client.close()
        server.stop()


def test_puts_waiting_for_the_window_go_together_up_to_coalesce_then_put_waits_for_room():
    """A writer that outruns the server sends fewer, larger requests: while the window is full,
    puts wait; the put that makes `coalesce` of them waits for room and sends them as one
    request. Every put is stored once, in order."""
    server = BufferServer(BufferConfig(timeout_s=5.0))   # bound, not serving yet: nothing is acknowledged
    client = BufferClient(server.address, timeout_s=5.0, window=1, coalesce=3)
    try:
        groups = [make_group(seed=i) for i in range(6)]
        for group in groups[:3]:
            client.put(group)
        assert client.in_flight == 1 and client.pending_puts == 3   # one sent, two waiting
        threading.Timer(0.3, server.start).start()
        t = time.monotonic()
        client.put(groups[3])   # the third waiting put: waits for room, then the three go as one request
        assert time.monotonic() - t >= 0.2
        assert client.in_flight == 1 and client.pending_puts == 3
        client.put(groups[4])   # the window is full again: these wait to go together at the flush
        client.put(groups[5])
        assert client.flush() == {"puts": 6, "stored": 6, "duplicates": 0}
        assert [g.id for g in client.sample(6, timeout_s=2.0)[0]] == [g.id for g in groups]
    finally:
        client.close()
        server.stop()


def test_a_put_of_a_group_a_batch_does_not_fit_is_refused_alone_by_the_server_naming_the_field(buffer_server):
    """A group whose tokens are not 2-D travels one by one with the puts beside it: the server
    names the field and refuses that put alone; the others are stored."""
    server = buffer_server()
    client = BufferClient(server.address, timeout_s=5.0, window=1)
    try:
        good = [make_group(seed=i) for i in range(3)]
        flat = make_group(seed=9)
        flat.tokens = flat.tokens.reshape(-1)
        client.put(good[0])
        client.put(flat)
        client.put(good[1])
        client.put(good[2])
        with pytest.raises(BufferRefused, match="refused 1 of 4 pipelined inserts; the first, put 1") as refused:
            client.flush()
        assert "tokens: must be a 2-D array" in refused.value.refused[0][2]
        assert client.stats()["size"] == 3
    finally:
        client.close()


def test_a_client_refuses_a_window_or_coalesce_below_one():
    for window, coalesce in ((0, 1), (1, 0)):
        with pytest.raises(ValueError, match="window and coalesce must be >= 1"):
            BufferClient("tcp://127.0.0.1:9", window=window, coalesce=coalesce)


def test_pipelined_inserts_to_a_dead_server_fail_within_their_deadline():
    client = BufferClient("tcp://127.0.0.1:9", timeout_s=0.2, retries=1, window=2)
    t = time.monotonic()
    with pytest.raises(BufferTimeout, match="did not acknowledge 3 pipelined insert"):
        for i in range(3):
            client.put(make_group(seed=i))
        client.flush()
    assert time.monotonic() - t < 30 and client.in_flight == 0 and client.pending_puts == 0
    client.close()


def test_a_fuzz_of_thousands_of_malformed_messages_leaves_the_server_answering_correctly(buffer_server):
    """Random frames, random msgpack of the wrong shape, and valid requests with one field
    broken: each gets an error reply (or none, for one whose rid frame is unreadable) and is
    counted; afterwards the server still stores and samples correctly."""
    rng = random.Random(7)
    server = buffer_server(max_size=64)
    good = make_group(seed=1).to_wire()
    broken_fields = [("op", 3), ("op", "drop_table"), ("groups", "x"), ("groups", [{"tokens": 1}]), ("n", -1),
                     ("n", 2**64 - 1), ("timeout_s", float("nan")), ("version", "1"), ("priorities", [float("inf")]),
                     ("parts", [2]), ("parts", [0, 1]), ("parts", "x"), ("batch", "x"), ("batch", [1, 2, 3, []]),
                     ("batch", [[1, 2], "<i4", None, [[]]])]
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.address)
    sent = 0
    try:
        for i in range(3000):
            kind = i % 3
            if kind == 0:
                frames = [bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 24)))
                          for _ in range(rng.randrange(1, 4))]
            elif kind == 1:
                payload = rng.choice([[1, 2], "op", {"op": None}, {1: 2}, None, 3.5, {"op": "insert"}])
                frames = [(i + 1).to_bytes(8, "big"), msgpack.packb(payload)]
            else:
                key, value = rng.choice(broken_fields)
                op = {"groups": "insert", "batch": "insert", "priorities": "insert", "parts": "insert", "n": "sample", "timeout_s": "sample",
                      "version": "set_version"}.get(key, "insert")
                request = {"op": op, "protocol": PROTOCOL, "groups": [good], "n": 1, "timeout_s": 0.01, "version": 1}
                request[key] = value
                frames = [(i + 1).to_bytes(8, "big"), *encode(request)]
            sock.send_multipart(frames)
            sent += 1
        replies = 0
        while sock.poll(2000):
            sock.recv_multipart()
            replies += 1
            if replies == sent:
                break
        assert replies >= 2000  # every request with a readable rid frame was answered
        assert server.errors >= 2000 and server.check() is None
    finally:
        sock.close()
    client = BufferClient(server.address, timeout_s=5.0)
    try:
        assert client.insert(make_group(seed=2, prompt_id="after"))["stored"] == [True]
        assert client.stats()["size"] == 1  # nothing malformed was stored
        assert client.sample(1, timeout_s=2.0)[0][0].prompt_id == "after"
    finally:
        client.close()


def test_a_malformed_batch_is_refused_naming_what_is_wrong_and_a_bad_group_in_a_good_one_only_its_part(buffer_server):
    """Clients send an insert's groups as one batch of six columns (RolloutGroup.batch_to_wire);
    every way of breaking one gets an error reply naming it, nothing is stored, and the server
    keeps serving. A batch well formed as a whole with one bad group refuses that put alone."""
    server = buffer_server()
    groups = [make_group(seed=i) for i in range(3)]
    good = RolloutGroup.batch_to_wire([g.to_wire() for g in groups])

    def broken(index, value):
        batch = list(good)
        batch[index] = value
        return batch

    shapes, _, columns, metas = good
    short = Frames([c[:-1] if i == 0 else c for i, c in enumerate(columns.items)])
    cases = [(broken(0, shapes[:-1]), "shapes must be [G, T] of each of its 3 groups"),
             (broken(0, [0] + shapes[1:]), "each G >= 1"),
             (broken(1, "<i4" * 6), "dtype must be"),
             (broken(2, short), "tokens: the batch's column must hold"),
             (broken(3, metas[:2]), "shapes must be [G, T] of each of its 2 groups"),
             (broken(3, [m[:-1] for m in metas]), "metas must be a non-empty list"),
             ([shapes, good[1], columns], "'batch' must be [shapes, dtypes, columns, metas]")]
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(server.address)
    client = BufferClient(server.address, timeout_s=5.0)
    try:
        for rid, (batch, expected) in enumerate(cases, 1):
            reply = _ask(raw, rid, {"op": "insert", "batch": batch})
            assert reply["ok"] is False and expected in reply["error"], (expected, reply["error"])
        bad = [m[:] for m in metas]
        bad[1][list(RolloutGroup.__dataclass_fields__).index("temperature") - 6] = -1.0   # group 1's temperature
        reply = _ask(raw, 99, {"op": "insert", "batch": [shapes, good[1], columns, bad], "parts": [1, 1, 1]})
        assert reply["ok"] is True and reply["stored"] == [True, True], reply
        assert reply["refused"] == [[1, "SchemaError: group 1: temperature: must be a finite number > 0, got float -1.0"]]
        assert client.stats()["size"] == 2 and server.errors == len(cases) + 1
    finally:
        raw.close()
        client.close()


def test_named_tables_keep_their_own_groups_selector_and_bounds():
    config = BufferConfig(timeout_s=5.0, tables={"solved": TableConfig(selector="max_heap", max_size=2,
                                                                       max_times_sampled=0)})
    server = BufferServer(config).start()
    client = BufferClient(server.address, timeout_s=5.0)
    try:
        rollouts = [make_group(seed=i) for i in range(2)]
        solved = [make_group(seed=10 + i) for i in range(3)]
        client.insert(*rollouts)
        client.insert(*solved, priorities=[0.5, 2.0, 1.0], table="solved")   # max_size 2: the oldest goes
        assert client.stats()["size"] == 2 and client.stats("solved")["size"] == 2
        assert client.stats("solved")["evicted"] == 1 and client.stats()["tables"]["solved"]["inserts"] == 3
        groups, _, _ = client.sample(1, table="solved")   # max_heap: the highest priority, kept (0)
        assert groups[0].id == solved[1].id and client.stats("solved")["size"] == 2
        assert client.update_priorities({solved[2].id: 9.0}, table="solved")["updated"] == 1
        assert client.sample(1, table="solved")[0][0].id == solved[2].id
        assert [g.id for g in client.sample(2)[0]] == [g.id for g in rollouts]   # fifo, untouched by the other
        client.set_learner_version(9)   # one learner version for every table: all of it is stale now
        assert client.stats("solved")["dropped_stale"] == 2 and client.stats("solved")["learner_version"] == 9
        info = client.info()
        assert set(info["tables"]) == {"rollouts", "solved"} and info["tables"]["solved"]["config"]["selector"] == "max_heap"
        with pytest.raises(BufferError, match="unknown table 'nope'; this server has \\['rollouts', 'solved'\\]"):
            client.insert(make_group(seed=50), table="nope")
        with pytest.raises(BufferError, match="unknown table"):
            client.sample(1, table="nope")
        assert client.stats()["inserts"] == 2   # the refused insert stored nothing anywhere
    finally:
        client.close()
        server.stop()


def test_a_rate_limiter_holds_inserts_of_its_own_table_only():
    config = BufferConfig(timeout_s=5.0, tables={"queue": TableConfig(rate_limiter="queue", max_size=1)})
    server = BufferServer(config).start()
    client, other = BufferClient(server.address, timeout_s=5.0), BufferClient(server.address, timeout_s=5.0)
    try:
        client.insert(make_group(seed=1), table="queue")
        with pytest.raises(BufferHeld, match="rate limiter \\(queue\\) of the table 'queue' held this insert") as held:
            client.insert(make_group(seed=2), make_group(seed=4), table="queue", timeout_s=0.3)
        assert held.value.stored == []   # nothing of it got in (a prefix would be listed)
        started = time.monotonic()
        assert other.insert(make_group(seed=3))["stored"] == [True]   # rollouts: not held by the full queue
        assert time.monotonic() - started < 0.3
    finally:
        client.close()
        other.close()
        server.stop()


def test_a_bad_table_name_or_one_that_hides_rollouts_is_refused_naming_the_key():
    with pytest.raises(ConfigError) as info:
        validate(BufferConfig(tables={"rollouts": TableConfig()}))
    assert info.value.key == "tables.rollouts"
    with pytest.raises(ConfigError) as info:
        validate(BufferConfig(tables={"a b": TableConfig()}))
    assert info.value.key == "tables.a b"
    with pytest.raises(ConfigError) as info:
        validate(BufferConfig(tables={"q": TableConfig(rate_limiter="queue", selector="lifo")}))
    assert info.value.key == "tables.q.selector"


def test_a_queue_takes_a_request_of_several_groups_as_room_comes_rather_than_waiting_for_room_for_all(buffer_server):
    # a queue of 4 holding 3: an insert of 2 would wait for room for both, while the learner
    # waits for 4 groups: a deadlock. The queue takes one now, the other once the learner sampled.
    server = buffer_server(rate_limiter="queue", max_size=4)
    actor, learner = BufferClient(server.address, timeout_s=5.0), BufferClient(server.address, timeout_s=5.0)
    try:
        actor.insert(*[make_group(seed=i) for i in range(3)])
        done = {}
        pair = [make_group(seed=10), make_group(seed=11)]
        waiting = threading.Thread(target=lambda: done.update(reply=actor.insert(*pair)))
        waiting.start()
        groups, _, _ = learner.sample(4, timeout_s=3.0)   # 3 + the first of the pair
        assert groups[-1].id == pair[0].id
        waiting.join(3.0)
        assert done["reply"]["stored"] == [True, True] and learner.stats()["size"] == 1
        assert learner.stats()["evicted"] == 0   # a queue evicts nothing
    finally:
        actor.close()
        learner.close()


def test_room_is_what_the_rate_limiter_takes_before_it_holds_an_insert_and_a_room_wait_ends_when_a_sample_frees_it(
        buffer_server):
    queue = buffer_server(rate_limiter="queue", max_size=3)
    ratio = buffer_server(rate_limiter="ratio", samples_per_insert=1.0, error_buffer=2.0, min_size_to_sample=1)
    plain = buffer_server()
    actor, learner = BufferClient(queue.address, timeout_s=5.0), BufferClient(queue.address, timeout_s=5.0)
    others = [BufferClient(server.address, timeout_s=5.0) for server in (ratio, plain)]
    try:
        assert actor.room()["room"] == 3
        assert [actor.insert(make_group(seed=i))["room"] for i in range(3)] == [2, 1, 0]
        with pytest.raises(BufferHeld, match=r"\(queue\) of the table 'rollouts' held a wait for room for 1 group"):
            actor.room(hold_s=0.3)
        done = {}
        waiting = threading.Thread(target=lambda: done.update(room=actor.room(hold_s=5.0)["room"]))
        waiting.start()
        waiting.join(0.3)
        assert waiting.is_alive() and learner.stats()["room_waits"] == 1 and learner.stats()["held_inserts"] == 0
        learner.sample(2, timeout_s=2.0)
        waiting.join(3.0)
        assert done["room"] == 2
        # ratio: inserts x samples_per_insert - samples may reach min_size_to_sample + error_buffer = 3
        ratio_actor, plain_actor = others
        assert [ratio_actor.insert(make_group(seed=i))["room"] for i in range(3)] == [2, 1, 0]
        with pytest.raises(BufferHeld):
            ratio_actor.insert(make_group(seed=9), timeout_s=0.3)   # room 0 is what the limiter holds at
        assert plain_actor.insert(make_group(seed=1))["room"] is None and plain_actor.room()["room"] is None   # never holds
    finally:
        for client in (actor, learner, *others):
            client.close()


def _ask(socket, rid: int, request: dict) -> dict:
    socket.send_multipart([rid.to_bytes(8, "big"), *encode({"protocol": PROTOCOL, **request})])
    assert socket.poll(5000), f"no reply to {request['op']}"
    frames = socket.recv_multipart()
    assert int.from_bytes(frames[0], "big") == rid
    return msgpack.unpackb(frames[1])


def test_a_peer_of_another_protocol_is_named_at_either_end(buffer_server):
    """An older client (its requests name no protocol) is refused by name and the server serves
    on; a client meeting an older server (a raw ROUTER answering as one did, with no protocol in
    its reply) raises, naming both protocols, instead of misreading the reply."""
    server = buffer_server()
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.connect(server.address)
    try:
        for rid, request in enumerate([{"op": "stats"}, {"op": "stats", "protocol": 1},
                                       {"op": "insert", "groups": [make_group().to_wire()]}], start=1):
            raw.send_multipart([rid.to_bytes(8, "big"), *encode(request)])
            assert raw.poll(5000)
            reply = msgpack.unpackb(raw.recv_multipart()[1])
            assert reply["ok"] is False and f"this server speaks {PROTOCOL}" in reply["error"], reply
            assert reply["protocol"] == PROTOCOL
    finally:
        raw.close(linger=0)
    client = BufferClient(server.address, timeout_s=5.0)
    assert client.stats()["size"] == 0   # nothing stored, still serving
    client.close()

    old = zmq.Context.instance().socket(zmq.ROUTER)
    port = old.bind_to_random_port("tcp://127.0.0.1")

    def answer_as_an_old_server():
        if old.poll(5000):
            identity, rid, *_ = old.recv_multipart()
            old.send_multipart([identity, rid, msgpack.packb({"ok": True, "size": 0, "incarnation": "old"})])

    thread = threading.Thread(target=answer_as_an_old_server)
    thread.start()
    try:
        client = BufferClient(f"tcp://127.0.0.1:{port}", timeout_s=5.0)
        with pytest.raises(BufferError, match=rf"answers in protocol 1 \(none named\), this client speaks {PROTOCOL}"):
            client.stats()
        client.close()
    finally:
        thread.join()
        old.close(linger=0)


def test_every_reply_names_the_control_port_and_an_insert_sent_there_is_refused(buffer_server):
    server = buffer_server()
    client = BufferClient(server.address, timeout_s=5.0)
    assert client.stats()["control_port"] == server.control_port != server.port
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.connect(f"tcp://127.0.0.1:{server.control_port}")
    reply = _ask(raw, 1, {"op": "insert", "groups": [make_group().to_wire()]})
    assert reply["ok"] is False and f"main port ({server.port}), not its control port" in reply["error"]
    assert _ask(raw, 2, {"op": "stats"})["size"] == 0   # nothing stored; the other ops are served there
    raw.close(linger=0)
    client.insert(make_group())   # the client sends its inserts to the main port
    groups, _, _ = client.sample(1)   # and its sample to the control port
    assert len(groups) == 1 and client._control is not None


def test_the_learners_requests_are_served_before_inserts_that_arrived_first():
    """Inserts queue on the main port before the serving loop starts, then a stats request on
    the control port: the loop answers the stats before it stores any insert."""
    server = BufferServer(BufferConfig(timeout_s=5.0))
    actor, learner = (zmq.Context.instance().socket(zmq.DEALER) for _ in range(2))
    actor.connect(server.address)
    learner.connect(f"tcp://127.0.0.1:{server.control_port}")
    try:
        for i in range(20):
            actor.send_multipart([(i + 1).to_bytes(8, "big"), *encode({"op": "insert", "protocol": PROTOCOL, "groups": [
                make_group(seed=i).to_wire()]})])
        assert server._socket.poll(5000)   # the inserts have arrived (the loop is not running yet)
        learner.send_multipart([(99).to_bytes(8, "big"), *encode({"op": "stats", "protocol": PROTOCOL})])
        assert server._control.poll(5000)
        server.start()
        assert learner.poll(5000)
        assert msgpack.unpackb(learner.recv_multipart()[1])["inserts"] == 0
        acknowledged = 0
        while acknowledged < 20 and actor.poll(5000):
            actor.recv_multipart()
            acknowledged += 1
        assert acknowledged == 20 and server.table.stats.inserts == 20
    finally:
        actor.close(linger=0)
        learner.close(linger=0)
        server.stop()


def test_a_control_port_that_is_the_main_port_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="control_port"):
        validate(BufferConfig(port=5555, control_port=5555))


def test_a_server_owning_its_process_keeps_what_it_stores_out_of_the_collector_and_frees_cycles_when_idle():
    import gc
    import weakref

    from buffer.server import StoredOutOfCollector

    class Node:
        pass
    collector = StoredOutOfCollector(full_every_s=0.0)
    try:
        node = Node()
        node.itself = node               # a cycle: only the cyclic collector frees it
        cycle = weakref.ref(node)
        del node
        collector.after_pass(inserts=1, idle=False)   # a pass that stored groups: all alive is frozen
        assert gc.get_freeze_count() > 0
        gc.collect()
        assert cycle() is not None       # frozen: out of every collection
        collector.after_pass(inserts=1, idle=True)    # an idle pass, the period over: a full collection
        assert cycle() is None and collector.full_collections == 1
        assert gc.get_freeze_count() > 0  # and what is alive frozen again
    finally:
        gc.unfreeze()
