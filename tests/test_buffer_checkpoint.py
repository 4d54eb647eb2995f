"""Buffer checkpoints and the buffer as a process of its own: a kill -9 and a restart lose
nothing acknowledged and store nothing twice."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from buffer import checkpoint, curve
from buffer.client import BufferClient, BufferError, BufferTimeout
from buffer.curve import CurveKeys
from buffer.process import BufferProcess, overrides
from buffer.server import BufferConfig, BufferServer
from buffer.table import Table, TableConfig
from common.config import ConfigError
from common.wire import encode
from tests.conftest import make_group


def filled_table(**config) -> Table:
    table = Table(TableConfig(max_size=8, max_staleness=3, max_times_sampled=2, **config), seed=3)
    for i in range(10):  # two evicted
        table.insert(make_group(version=i // 3, seed=i, prompt_id=f"p{i}"))
    table.set_learner_version(4)  # version 0 groups are too stale now
    table.sample(2)
    table.insert(make_group(seed=0, prompt_id="p0"))  # a re-sent id: a duplicate
    return table


def test_a_restored_table_continues_exactly_as_the_saved_one(tmp_path):
    saved = filled_table(selector="uniform")
    restored = Table(saved.config, seed=99)
    restored.restore(checkpoint.read(checkpoint.write(tmp_path, saved.state())))
    assert restored.summary() == saved.summary()
    for _ in range(3):  # the same groups in the same order, the RNG included
        a, b = saved.sample(2), restored.sample(2)
        assert [g.id for g in a] == [g.id for g in b]
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x.tokens, y.tokens)
            np.testing.assert_array_equal(x.behaviour_logprobs, y.behaviour_logprobs)
    assert restored.insert(saved.select(1)[0]) is False  # ids seen before the save stay refused


def test_checkpoints_are_numbered_kept_and_a_partial_one_is_ignored(tmp_path):
    table = filled_table()
    paths = [checkpoint.write(tmp_path, table.state(), keep=2) for _ in range(3)]
    assert checkpoint.checkpoints(tmp_path) == paths[1:]
    (tmp_path / "buffer-00000009.ckpt.partial").write_bytes(b"half a file")  # killed while saving
    assert checkpoint.latest(tmp_path) == paths[-1]


def _encoded(table: Table) -> bytes:
    return b"".join(bytes(frame) for frame in encode(table.state()))


def test_a_delta_checkpoint_holds_only_new_groups_and_restores_what_a_whole_one_restores(tmp_path):
    """Checkpoints 2 and 3 are deltas on 1 (buffer.checkpoint_full_every=3): each holds the
    arrays of the groups stored since 1 alone, and a server restored from one is, byte for
    byte, what a server restored from a whole checkpoint written at the same moment is (the
    oracle); checkpoint 4 is whole again, and keep_checkpoints=1 keeps a kept delta's base."""
    config = BufferConfig(timeout_s=5.0, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every_s=0,
                          keep_checkpoints=1, checkpoint_full_every=3,
                          table=TableConfig(max_size=64, max_staleness=3, max_times_sampled=2))
    server = BufferServer(config)
    for i in range(40):
        server.table.insert(make_group(seed=i, prompt_id=f"p{i}"))
    server.table.sample(5)
    whole = server.checkpoint()
    assert whole.name == "buffer-00000001.ckpt"
    server.table.insert(make_group(seed=100, prompt_id="new"))
    server.table.sample(3)                          # counts change for groups the base holds
    server.table.set_learner_version(1)
    delta = server.checkpoint()
    assert delta.name == "buffer-00000002.on-00000001.ckpt" and delta.stat().st_size < whole.stat().st_size / 3
    items = checkpoint.read(delta)["tables"]["rollouts"]["items"]
    assert len(items) == len(server.table) and sum(type(data) is not str for data, *_ in items) == 1
    for i in range(2):
        server.table.insert(make_group(seed=200 + i, prompt_id="newer"))
    delta = server.checkpoint()
    assert delta.name == "buffer-00000003.on-00000001.ckpt"
    assert checkpoint.checkpoints(tmp_path / "ckpt") == [whole, delta]    # the base of the kept one kept
    oracle = checkpoint.write(tmp_path / "oracle", server._state())
    from_delta, from_whole = BufferServer(config), BufferServer(BufferConfig(**{
        **config.__dict__, "checkpoint_dir": str(tmp_path / "oracle")}))
    try:
        assert from_delta.restored_from == delta and from_whole.restored_from == oracle
        assert from_delta.table.summary()["size"] == len(server.table) > 30
        assert _encoded(from_delta.table) == _encoded(from_whole.table) == _encoded(server.table)
    finally:
        for s in (from_delta, from_whole):
            s.close()
    assert server.checkpoint().name == "buffer-00000004.ckpt"            # whole: the third on a base
    assert checkpoint.checkpoints(tmp_path / "ckpt") == [tmp_path / "ckpt" / "buffer-00000004.ckpt"]
    server.close()


def test_a_checkpoint_is_whole_when_half_the_table_is_new_or_the_server_restarted(tmp_path):
    config = BufferConfig(timeout_s=5.0, checkpoint_dir=str(tmp_path), checkpoint_every_s=0,
                          table=TableConfig(max_size=10, max_staleness=3))
    server = BufferServer(config)
    for i in range(10):
        server.table.insert(make_group(seed=i))
    assert ".on-" not in server.checkpoint().name
    for i in range(4):
        server.table.insert(make_group(seed=10 + i))           # 4 of 10 new: a delta
    assert server.checkpoint().name.endswith(".on-00000001.ckpt")
    server.table.insert(make_group(seed=20))                   # 5 of 10 new: whole
    assert server.checkpoint().name == "buffer-00000003.ckpt"
    server.close()
    again = BufferServer(config)                               # restored from 3; its first is whole
    assert again.checkpoint().name == "buffer-00000004.ckpt"
    again.close()


def test_a_delta_whose_base_is_gone_is_refused_at_start_naming_it(tmp_path):
    config = BufferConfig(timeout_s=5.0, checkpoint_dir=str(tmp_path), checkpoint_every_s=0)
    server = BufferServer(config)
    for i in range(4):
        server.table.insert(make_group(seed=i))
    base = server.checkpoint()
    server.table.insert(make_group(seed=4))
    delta = server.checkpoint()
    server.close()
    base.unlink()
    with pytest.raises(checkpoint.CheckpointError, match=rf"{delta.name} is a delta on {base.name}, which is missing"):
        BufferServer(config)
    other = BufferServer(BufferConfig(timeout_s=5.0, checkpoint_dir=str(tmp_path / "other"), checkpoint_every_s=0))
    other.table.insert(make_group(seed=9))
    other.checkpoint().rename(base)   # a whole checkpoint, but not the one the delta was taken on
    other.close()
    with pytest.raises(checkpoint.CheckpointError, match=rf"{delta.name} \(a delta on {base.name}\): table "
                                                         r"'rollouts': 4 group\(s\) named by the checkpoint are not in its base"):
        BufferServer(config)


@pytest.mark.parametrize("damage", ["magic", "truncate"])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, damage):
    path = checkpoint.write(tmp_path, filled_table().state())
    data = path.read_bytes()
    path.write_bytes(b"x" + data[1:] if damage == "magic" else data[:-100])
    with pytest.raises(checkpoint.CheckpointError, match=path.name):
        checkpoint.read(path)


def test_a_server_saves_when_it_stops_and_a_new_one_restores_it(tmp_path):
    config = BufferConfig(timeout_s=5.0, checkpoint_dir=str(tmp_path), checkpoint_every_s=0)
    server = BufferServer(config).start()
    client = BufferClient(server.address, timeout_s=5.0)
    client.insert(*[make_group(seed=i, prompt_id=f"p{i}") for i in range(5)])
    client.set_learner_version(1)
    client.close()
    server.stop()
    again = BufferServer(config).start()
    try:
        assert again.restored_from == checkpoint.latest(tmp_path)
        assert again.table.summary()["size"] == 5 and again.table.learner_version == 1
    finally:
        again.stop()


def test_every_named_table_is_checkpointed_and_restored_and_a_restart_resends_to_the_right_table(tmp_path):
    config = BufferConfig(timeout_s=3.0, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every_s=0,
                          tables={"solved": TableConfig(selector="max_heap", max_size=64)})
    process = BufferProcess(config, tmp_path / "buffer.log").start()
    client = BufferClient(process.address, timeout_s=3.0, retries=5)
    try:
        client.insert(*[make_group(seed=i, prompt_id=f"r{i}") for i in range(3)])
        client.insert(*[make_group(seed=10 + i, prompt_id=f"s{i}") for i in range(2)], table="solved")
        client.checkpoint()
        client.insert(make_group(seed=20, prompt_id="s-late"), table="solved")   # acknowledged, not on disk
        os.kill(process.process.pid, signal.SIGKILL)
        process.process.wait(10)
        process.check()                 # restarted from the checkpoint: 3 + 2 groups
        assert process.info["groups"] == 5
        assert client.stats()["size"] == 3   # the first reply of the new server: the lost group is re-sent
        assert client.resent_groups == 1 and client.stats("solved")["size"] == 3   # into "solved"
    finally:
        client.close()
        process.stop()


def test_a_checkpoint_from_before_named_tables_restores_as_the_rollouts_table(tmp_path):
    table = Table(TableConfig())
    for i in range(2):
        table.insert(make_group(seed=i, prompt_id=f"old{i}"))
    checkpoint.write(tmp_path, table.state())   # one table's state, as older servers wrote it
    server = BufferServer(BufferConfig(timeout_s=5.0, checkpoint_dir=str(tmp_path),
                                       tables={"solved": TableConfig()})).start()
    try:
        assert len(server.table) == 2 and len(server.tables["solved"]) == 0
    finally:
        server.stop()


def test_the_client_keeps_acknowledged_groups_until_a_checkpoint_holds_them(tmp_path):
    server = BufferServer(BufferConfig(timeout_s=5.0, checkpoint_dir=str(tmp_path), checkpoint_every_s=0)).start()
    client = BufferClient(server.address, timeout_s=5.0)
    try:
        client.insert(*[make_group(seed=i, prompt_id=f"a{i}") for i in range(3)])
        assert client.unsaved == 3
        client.checkpoint()
        client.insert(make_group(seed=9, prompt_id="b"))
        assert client.unsaved == 1  # the checkpoint holds the first three
    finally:
        client.close()
        server.stop()
    plain = BufferServer(BufferConfig(timeout_s=5.0)).start()  # no checkpoints: nothing to keep
    client = BufferClient(plain.address, timeout_s=5.0)
    try:
        client.insert(make_group(seed=1))
        assert client.unsaved == 0
    finally:
        client.close()
        plain.stop()


def test_kill_9_and_restart_lose_nothing_acknowledged_and_store_nothing_twice(tmp_path):
    config = BufferConfig(timeout_s=3.0, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every_s=0,
                          table=TableConfig(max_size=4096, max_staleness=100))
    process = BufferProcess(config, tmp_path / "buffer.log").start()
    client = BufferClient(process.address, timeout_s=3.0, retries=5)
    sent = []
    try:
        for i in range(30):
            group = make_group(seed=i, prompt_id=f"g{i}")
            assert client.insert(group)["stored"] == [True]
            sent.append(group.id)
            if i in (7, 11):            # whole, then a delta on it (written by forked children)
                client.checkpoint()     # groups 0-11 are on disk; 12-29 only in the server's memory
        assert client.unsaved == 18
        assert checkpoint.latest(tmp_path / "ckpt").name == "buffer-00000002.on-00000001.ckpt"
        os.kill(process.process.pid, signal.SIGKILL)
        process.process.wait(10)
        process.check()                 # the launcher's check: restarts it from the checkpoint
        assert process.restarts == 1 and process.info["groups"] == 12
        late = make_group(seed=99, prompt_id="late")
        client.insert(late)             # answered by the new server: the 18 are re-sent once
        sent.append(late.id)
        assert client.resent_groups == 18
        stats = client.stats()
        assert stats["size"] == len(sent) == 31
        groups, _, _ = client.sample(31, timeout_s=5.0)
        assert sorted(g.id for g in groups) == sorted(sent)  # each exactly once
    finally:
        client.close()
        process.stop()


def test_pipelined_inserts_in_flight_when_the_server_is_killed_are_resent_to_the_restarted_one(tmp_path):
    config = BufferConfig(timeout_s=10.0, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every_s=0,
                          table=TableConfig(rate_limiter="queue", max_size=4))
    process = BufferProcess(config, tmp_path / "buffer.log").start()
    actor = BufferClient(process.address, timeout_s=10.0, window=8)
    learner = BufferClient(process.address, timeout_s=10.0)
    groups = [make_group(seed=i, prompt_id=f"g{i}") for i in range(6)]
    try:
        for g in groups:
            actor.put(g)              # the queue takes 4; the last 2 wait in the server, unacknowledged
        actor.checkpoint()            # the 4 on disk (their acknowledgements are handed on meanwhile)
        assert actor.in_flight == 2
        os.kill(process.process.pid, signal.SIGKILL)
        process.process.wait(10)
        process.check()               # restarted from the checkpoint: the 4, full; the 2 were lost with it
        assert process.info["groups"] == 4
        first, _, _ = learner.sample(4, timeout_s=10.0)   # room for the 2, once a ping finds the new server
        assert actor.flush() == {"puts": 6, "stored": 6, "duplicates": 0}
        rest, _, _ = learner.sample(2, timeout_s=10.0)
        assert [g.prompt_id for g in first + rest] == [f"g{i}" for i in range(6)]   # each exactly once
        assert learner.stats()["inserts"] == 6
    finally:
        actor.close()
        learner.close()
        process.stop()


def test_a_buffer_process_that_keeps_dying_fails_naming_its_log(tmp_path):
    process = BufferProcess(BufferConfig(max_restarts=0), tmp_path / "buffer.log").start()
    os.kill(process.process.pid, signal.SIGKILL)
    process.process.wait(10)
    with pytest.raises(BufferError, match="max_restarts=0.*buffer.log"):
        process.check()


def test_python_m_buffer_refuses_a_bad_key_naming_it():
    result = subprocess.run([sys.executable, "-m", "buffer", "table.max_size=0"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "table.max_size" in result.stderr


def test_python_m_buffer_serves_until_sigterm_and_saves(tmp_path):
    process = BufferProcess(BufferConfig(checkpoint_dir=str(tmp_path), checkpoint_every_s=0),
                            tmp_path / "log").start()
    client = BufferClient(process.address, timeout_s=5.0)
    client.insert(make_group(seed=1))
    client.close()
    t = time.monotonic()
    process.stop()
    assert time.monotonic() - t < 10 and process.process.returncode == 0
    assert len(checkpoint.read(checkpoint.latest(tmp_path))["tables"]["rollouts"]["items"]) == 1


def test_only_the_token_holder_moves_the_version_and_an_absurd_version_is_refused():
    server = BufferServer(BufferConfig(timeout_s=5.0), version_token="s3cret").start()
    learner = BufferClient(server.address, timeout_s=5.0, version_token="s3cret")
    stranger = BufferClient(server.address, timeout_s=5.0)
    try:
        learner.insert(make_group(version=0, seed=1))
        with pytest.raises(BufferError, match="only the learner may move the version"):
            stranger.set_learner_version(2**63 - 1)
        with pytest.raises(BufferError, match="outside"):
            learner.set_learner_version(2**62)
        assert learner.set_learner_version(1)["learner_version"] == 1
        assert stranger.stats()["size"] == 1  # nothing was dropped as stale by the refused requests
    finally:
        learner.close()
        stranger.close()
        server.stop()


def test_with_curvezmq_only_clients_holding_the_jobs_keys_are_answered(tmp_path, monkeypatch):
    keys = CurveKeys.generate()
    process = BufferProcess(BufferConfig(timeout_s=3.0, curve=True, checkpoint_dir=str(tmp_path)),
                            tmp_path / "buffer.log", curve_keys=keys).start()
    member = BufferClient(process.address, timeout_s=3.0, curve_keys=keys.for_clients())
    other = CurveKeys.generate()   # right protocol, another job's keys
    stranger = BufferClient(process.address, timeout_s=1.0, retries=0,
                            curve_keys=CurveKeys(keys.server_public, b"", other.client_public, other.client_secret))
    plain = BufferClient(process.address, timeout_s=1.0, retries=0, curve_keys=None)
    try:
        assert member.insert(make_group(seed=1))["stored"] == [True]
        with pytest.raises(BufferTimeout, match="CurveZMQ keys"):
            stranger.insert(make_group(seed=2))
        monkeypatch.delenv(curve.ENV, raising=False)
        plain.curve_keys = None
        plain._connect()
        with pytest.raises(BufferTimeout, match="without buffer.curve"):
            plain.stats()
        stats = member.stats()
        assert stats["size"] == 1 and stats["inserts"] == 1   # nothing of theirs got in
        assert keys.server_secret not in (tmp_path / "buffer.log").read_bytes()
    finally:
        for c in (member, stranger, plain):
            c.close()
        process.stop()
    cmdline = " ".join(overrides(BufferConfig(curve=True)))
    assert keys.server_secret.decode() not in cmdline   # keys travel in the environment only


def test_curve_without_keys_or_with_bad_ones_is_refused_naming_the_key(monkeypatch):
    monkeypatch.delenv(curve.ENV, raising=False)
    with pytest.raises(ConfigError) as info:
        BufferServer(BufferConfig(curve=True))
    assert info.value.key == "buffer.curve" and "python -m buffer keys" in info.value.message
    monkeypatch.setenv(curve.ENV, "not,keys")
    with pytest.raises(ConfigError, match="four Z85 keys"):
        BufferServer(BufferConfig(curve=True))
    monkeypatch.setenv(curve.ENV, CurveKeys.generate().for_clients().encode())   # a client's set
    with pytest.raises(ConfigError, match="no server secret"):
        BufferServer(BufferConfig(curve=True))


def test_a_sample_waiting_while_the_server_is_killed_and_restarted_is_met_by_the_new_server(tmp_path):
    config = BufferConfig(timeout_s=5.0, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every_s=0)
    process = BufferProcess(config, tmp_path / "buffer.log").start()
    actor, learner = BufferClient(process.address, timeout_s=5.0), BufferClient(process.address, timeout_s=5.0)
    try:
        actor.insert(*[make_group(seed=i, prompt_id=f"a{i}") for i in range(2)])
        actor.checkpoint()
        learner.stats()
        got = {}
        waiting = threading.Thread(target=lambda: got.update(sample=learner.sample(4, timeout_s=30.0)))
        waiting.start()
        time.sleep(0.5)                    # the sample waits in the server for 4 groups
        os.kill(process.process.pid, signal.SIGKILL)
        process.process.wait(10)
        process.check()                    # restarted from the checkpoint: the 2 groups, not the sample
        actor.insert(*[make_group(seed=10 + i, prompt_id=f"b{i}") for i in range(2)])
        waiting.join(15)
        assert not waiting.is_alive(), "the sample was lost with the old server"
        groups, _, _ = got["sample"]
        assert sorted(g.prompt_id for g in groups) == ["a0", "a1", "b0", "b1"]
    finally:
        actor.close()
        learner.close()
        process.stop()


def test_python_m_buffer_keys_prints_a_server_set_and_a_client_set_that_work_together():
    done = subprocess.run([sys.executable, "-m", "buffer", "keys"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    values = [line.split("=", 1)[1] for line in done.stdout.splitlines() if line.startswith(curve.ENV + "=")]
    server, client = (CurveKeys.decode(v) for v in values)
    assert server.server_secret and not client.server_secret and client == server.for_clients()


def test_a_buffer_whose_launcher_was_killed_outright_stops_and_saves(tmp_path):
    # the launcher: a process that starts the buffer as a run does, then dies by SIGKILL
    launcher = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from buffer.process import BufferProcess\n"
        "from buffer.server import BufferConfig\n"
        f"p = BufferProcess(BufferConfig(checkpoint_dir={str(tmp_path)!r}), {str(tmp_path / 'buffer.log')!r}).start()\n"
        "print(p.process.pid, flush=True)\n"
        "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    buffer_pid = int(launcher.stdout.readline())
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait(10)
    deadline = time.monotonic() + 20
    while Path(f"/proc/{buffer_pid}").exists() and "Z" not in Path(f"/proc/{buffer_pid}/stat").read_text().split()[2]:
        assert time.monotonic() < deadline, "the orphaned buffer is still serving"
        time.sleep(0.1)
    assert checkpoint.latest(tmp_path) is not None   # it saved on the way out


def test_a_resend_the_restored_queue_holds_is_owed_until_the_learner_makes_room_and_then_stored_once(tmp_path):
    # A restored queue can be full: the groups acknowledged after its checkpoint must then wait
    # for room, not be given up by the re-send (nor hold the call that found the restart).
    config = BufferConfig(timeout_s=5.0, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every_s=0,
                          table=TableConfig(rate_limiter="queue", max_size=2))
    process = BufferProcess(config, tmp_path / "buffer.log").start()
    actor, learner = BufferClient(process.address, timeout_s=5.0), BufferClient(process.address, timeout_s=5.0)
    try:
        actor.insert(make_group(seed=0, prompt_id="g0"), make_group(seed=1, prompt_id="g1"))
        actor.checkpoint()                               # g0, g1 on disk
        learner.sample(2, timeout_s=5.0)
        actor.insert(make_group(seed=2, prompt_id="g2"), make_group(seed=3, prompt_id="g3"))
        assert actor.unsaved == 2                        # acknowledged, in no checkpoint
        os.kill(process.process.pid, signal.SIGKILL)
        process.process.wait(10)
        process.check()                                  # restored full: g0, g1
        started = time.monotonic()
        assert actor.stats()["size"] == 2                # the restart is found; the re-send is held
        assert time.monotonic() - started < 4.0 and actor.resent_groups == 0 and actor.unsaved == 2
        first, _, _ = learner.sample(2, timeout_s=5.0)
        actor.stats()                                    # the next reply re-sends them into the room
        assert actor.resent_groups == 2
        rest, _, _ = learner.sample(2, timeout_s=5.0)
        assert [g.prompt_id for g in first + rest] == ["g0", "g1", "g2", "g3"]
        assert learner.stats()["duplicates"] == 0
    finally:
        actor.close()
        learner.close()
        process.stop()


def test_a_forked_writer_saves_the_table_as_it_was_at_the_fork(tmp_path):
    table = filled_table()
    saved = table.state()
    write = checkpoint.ForkedWrite(tmp_path, table.state, keep=2, seq=7)
    for i in range(20):   # the parent goes on changing the table while the child writes
        table.insert(make_group(version=5, seed=100 + i, prompt_id=f"after{i}"))
    path = write.wait(60)
    assert isinstance(path, Path) and path == checkpoint.latest(tmp_path) and write.seq == 7
    restored, expected = Table(table.config, seed=0), Table(table.config, seed=0)
    restored.restore(checkpoint.read(path))
    expected.restore(saved)
    assert restored.summary() == expected.summary() and restored.summary()["inserts"] < table.summary()["inserts"]
    assert [g.id for g in restored.sample(5)] == [g.id for g in expected.sample(5)]
    assert not list(tmp_path.glob("*.partial"))


def test_a_forked_writer_is_followed_where_the_system_reaps_children_itself(tmp_path):
    before = signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # as a host process may have set it
    try:
        path = checkpoint.ForkedWrite(tmp_path, filled_table().state, keep=2).wait(60)
        failed = checkpoint.ForkedWrite(tmp_path / "ckpt" / "x", lambda: 1 / 0, keep=2).wait(60)
    finally:
        signal.signal(signal.SIGCHLD, before)
    assert path == checkpoint.latest(tmp_path)
    assert isinstance(failed, checkpoint.CheckpointError) and "ZeroDivisionError" in str(failed)


def test_a_forked_writer_that_fails_says_why_and_the_caller_goes_on(tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the checkpoint folder should be")
    result = checkpoint.ForkedWrite(blocked, filled_table().state, keep=2).wait(60)
    assert isinstance(result, checkpoint.CheckpointError)
    assert "failed: FileExistsError" in str(result) and str(blocked) in str(result)


def test_a_forked_writer_dies_with_its_server_and_publishes_nothing(tmp_path):
    # the server is killed while its child writes: the child must not rename an old snapshot
    # over what a restarted server writes meanwhile
    folder = tmp_path / "ckpt"
    server = subprocess.Popen([sys.executable, "-c", (
        "import time\n"
        "from buffer import checkpoint\n"
        f"w = checkpoint.ForkedWrite({str(folder)!r}, lambda: (time.sleep(30), {{'tables': {{}}}})[1], keep=2)\n"
        "print(w.pid, flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True, cwd=str(Path(__file__).parent.parent))
    try:
        writer = int(server.stdout.readline())
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
        deadline = time.monotonic() + 10
        while _alive(writer) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(writer), "the checkpoint writer outlived its server"
        assert checkpoint.latest(folder) is None
    finally:
        server.kill()


def _alive(pid: int) -> bool:
    try:   # a zombie (killed, not yet reaped by whoever adopted it) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def owned_server(tmp_path):
    """A server on a thread here that forks its checkpoints, as `python -m buffer` does (it
    freezes the garbage collector's view of this process meanwhile: unfrozen after)."""
    import gc
    servers = []

    def make(**config):
        config = BufferConfig(timeout_s=10.0, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every_s=0,
                              table=TableConfig(max_size=64, max_staleness=100), **config)
        servers.append(BufferServer(config, owns_process=True).start())
        return servers[-1]
    yield make
    for server in servers:
        server.stop(30)
    gc.unfreeze()


def _slow_state(server: BufferServer, seconds: float):
    """The server's state, taken `seconds` late: a slow disk's checkpoint, as the child sees it."""
    state = server._state

    def slow():
        time.sleep(seconds)
        return state()
    return slow


@pytest.mark.parametrize("in_child", [True, False], ids=["forked", "in-loop"])
def test_a_checkpoint_written_by_a_child_leaves_the_server_answering_meanwhile(owned_server, in_child):
    # the in-loop writer is the contrast: it answers nothing until its checkpoint is on disk;
    # a second's delay in taking the state stands for a large table's write
    server = owned_server(checkpoint_in_child=in_child)
    server._state = _slow_state(server, 1.0)
    writer, asker = BufferClient(server.address, timeout_s=30.0), BufferClient(server.address, timeout_s=30.0)
    try:
        writer.insert(*[make_group(seed=i, prompt_id=f"g{i}") for i in range(8)])
        answered, done = [], threading.Event()   # when each stats reply came

        def ask():
            while not done.is_set():
                asker.stats()
                answered.append(time.monotonic())
        thread = threading.Thread(target=ask)
        thread.start()
        time.sleep(0.2)
        asked = time.monotonic()
        path = writer.checkpoint()["path"]
        replied = time.monotonic()
        done.set()
        thread.join(30)
        during = [t for t in answered if asked + 0.1 < t < replied - 0.1]   # replies while it was written
        stats = asker.stats()["checkpoint_writes"]
        assert stats["written"] == 1 and stats["in_child"] is in_child and not stats["writing"]
        assert writer.unsaved == 0 and len(checkpoint.read(path)["tables"]["rollouts"]["items"]) == 8
        assert replied - asked >= 1.0
        if in_child:
            assert len(during) > 10, "the server answered (almost) nothing while its child wrote"
        else:
            assert during == []
    finally:
        del server._state
        writer.close()
        asker.close()


def test_a_forked_writer_holds_none_of_the_servers_sockets(owned_server):
    # a server killed mid-save must leave its ports free for the restarted one at once
    server = owned_server()
    server._state = _slow_state(server, 30)
    client = BufferClient(server.address, timeout_s=10.0)
    try:
        client.insert(make_group(seed=1))
        threading.Thread(target=lambda: BufferClient(server.address, timeout_s=10.0).checkpoint(), daemon=True).start()
        deadline = time.monotonic() + 10
        while server._writing is None and time.monotonic() < deadline:
            time.sleep(0.01)
        child = server._writing.pid
        time.sleep(0.3)   # past its first act
        held = [os.readlink(f"/proc/{child}/fd/{fd}") for fd in os.listdir(f"/proc/{child}/fd")]
        assert not [h for h in held if h.startswith(("socket:", "anon_inode:"))], held
    finally:
        del server._state   # the last, in-loop write at stop is quick again
        client.close()


def test_a_fork_that_fails_is_written_in_the_loop_and_the_server_serves_on(owned_server, monkeypatch):
    def no_fork():
        raise OSError(12, "Cannot allocate memory")
    monkeypatch.setattr(os, "fork", no_fork)   # a fault injected: a full machine refuses the child
    open_before = len(os.listdir("/proc/self/fd"))
    server = owned_server()
    client = BufferClient(server.address, timeout_s=10.0)
    try:
        client.insert(make_group(seed=1))
        path = client.checkpoint()["path"]
        assert len(checkpoint.read(path)["tables"]["rollouts"]["items"]) == 1 and client.unsaved == 0
        stats = client.stats()["checkpoint_writes"]
        assert stats["written"] == 1 and stats["failed"] == 0 and stats["in_child"]
        client.checkpoint()
        assert client.stats()["size"] == 1
    finally:
        client.close()
    server.stop(30)
    assert len(os.listdir("/proc/self/fd")) <= open_before   # the failed forks' pipes were closed


def test_a_forked_write_past_its_deadline_is_killed_counted_and_tried_again(owned_server):
    server = owned_server(checkpoint_timeout_s=1.0)
    server._state = _slow_state(server, 60)
    client = BufferClient(server.address, timeout_s=10.0)
    try:
        client.insert(make_group(seed=1))
        with pytest.raises(BufferError, match="did not finish within buffer.checkpoint_timeout_s"):
            client.checkpoint()
        stats = client.stats()["checkpoint_writes"]
        assert stats["failed"] == 1 and not stats["writing"] and client.unsaved == 1   # not saved: still kept
        del server._state
        assert Path(client.checkpoint()["path"]).exists() and client.unsaved == 0
    finally:
        client.close()


def test_stopping_during_a_forked_write_writes_once_and_answers_who_asked(owned_server, tmp_path):
    server = owned_server()
    server._state = _slow_state(server, 60)   # the child would take a minute
    client = BufferClient(server.address, timeout_s=20.0)
    replies = []
    try:
        client.insert(make_group(seed=1), make_group(seed=2))
        asker = threading.Thread(target=lambda: replies.append(BufferClient(server.address, timeout_s=20.0).checkpoint()))
        asker.start()
        deadline = time.monotonic() + 10
        while server._writing is None and time.monotonic() < deadline:
            time.sleep(0.01)
        child = server._writing.pid
        del server._state   # the last, in-loop write is quick
        t = time.monotonic()
        server.stop(30)
        assert time.monotonic() - t < 10
        asker.join(20)
    finally:
        client.close()
    assert not _alive(child)
    assert replies and Path(replies[0]["path"]) == checkpoint.latest(tmp_path / "ckpt")
    assert len(checkpoint.read(replies[0]["path"])["tables"]["rollouts"]["items"]) == 2
    assert len(checkpoint.checkpoints(tmp_path / "ckpt")) == 1   # written once, by the loop
