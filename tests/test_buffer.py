"""The buffer server and client over real ZeroMQ sockets on loopback."""
import time

import msgpack
import pytest
import zmq

from buffer.client import BufferClient, BufferError, BufferTimeout
from buffer.table import Table, TableConfig
from common.config import ConfigError, validate
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


def test_groups_past_the_staleness_bound_are_dropped_and_never_sampled(buffer_server):
    client = BufferClient(buffer_server(max_staleness=2).address, timeout_s=5.0)
    old, fresh = make_group(version=0, seed=1), make_group(version=3, seed=2)
    client.insert(old, fresh)
    assert client.set_learner_version(3)["dropped"] == 1  # 3 - 0 > 2
    groups, staleness, version = client.sample(1)
    assert groups[0].id == fresh.id and staleness == [0] and version == 3
    stats = client.stats()
    assert stats["dropped_stale"] == 1 and stats["staleness_histogram"] == {"0": 1}
    late = make_group(version=0, seed=3)  # arrives already too stale
    client.insert(late)
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


def test_malformed_and_oversize_requests_get_an_error_reply_and_the_server_keeps_serving(buffer_server):
    server = buffer_server()
    server.config.max_message_mb = 0.001
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.connect(server.address)
    raw.send_multipart([b"\xc1not msgpack"])
    assert raw.poll(5000)
    reply = msgpack.unpackb(raw.recv_multipart()[0])
    assert reply["ok"] is False and "WireError" in reply["error"]
    raw.send_multipart([msgpack.packb({"op": "insert", "rid": 7, "groups": [{"tokens": 1}]})])
    assert raw.poll(5000)
    reply = msgpack.unpackb(raw.recv_multipart()[0])
    assert reply["ok"] is False and reply["rid"] == 7 and "SchemaError: group 0" in reply["error"]
    raw.send_multipart([msgpack.packb({"op": "stats", "rid": 8}), b"x" * 2000])
    assert raw.poll(5000)
    reply = msgpack.unpackb(raw.recv_multipart()[0])
    assert reply["ok"] is False and "exceeds max_message_mb" in reply["error"]
    raw.close(linger=0)
    server.config.max_message_mb = 512
    client = BufferClient(server.address, timeout_s=5.0)
    assert client.insert(make_group())["stored"] == [True] and server.errors == 3


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
