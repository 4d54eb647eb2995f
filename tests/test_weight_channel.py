"""The broadcast weight channel over gloo: a learner process and two actor processes, real
TCP, real torch.distributed; a sender killed in the middle of a transfer. The receivers find
the sender at a rendezvous store this test's process hosts, as launch/'s Ray actor does."""
import gc
import io
import os
import queue
import threading
import time

import pytest
import torch
import torch.multiprocessing as mp

from actors.engine import DirectWeights, StagedWeights, WeightUpdateError
from common.rendezvous import Rendezvous, RendezvousHost
from common.weights import WeightSyncError
from common.weights_broadcast import BroadcastChannelSpec, _pack_layout
from tests.conftest import free_port


def version_tensors(version: int) -> dict:
    g = torch.Generator().manual_seed(version)
    return {"embed.weight": torch.randn(300, 16, generator=g),
            "block.0.attn.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),
            "block.0.norm.weight": torch.rand(16, generator=g),
            "counts": torch.randint(0, 1000, (7,), generator=g)}


def _log_to(path) -> None:
    """This process's stderr (Python's and the C++ libraries') into a file the test shows."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)


def _sender(spec, versions, die_after_buckets, log, stray=False, bogus_version=None):
    _log_to(log)
    if die_after_buckets is not None:  # a fault injected on purpose: the process dies mid-transfer
        import common.weights_broadcast as channel
        real, sent = channel._broadcast, []

        def dying(group, tensor, timeout_s):
            if len(sent) == die_after_buckets:
                os._exit(3)
            real(group, tensor, timeout_s)
            sent.append(1)
        channel._broadcast = dying
    sender = spec.sender()
    if stray:   # a process that is not a receiver writes to the control socket: ignored
        import zmq
        other = zmq.Context.instance().socket(zmq.DEALER)
        other.connect(f"tcp://127.0.0.1:{int(sender.store.get('control'))}")
        for message in ([b"hello"], [b"ready", b"x", b"1"], [b"hello", b"99"], [b"nonsense"]):
            other.send_multipart(message)
    for v in versions:
        tensors = version_tensors(v)
        if v == bogus_version:   # a version the receivers' model cannot take: a tensor it does not have
            tensors["bogus.weight"] = torch.ones(3)
        try:
            sender.send(v, tensors)
        except WeightSyncError:
            if v != bogus_version:
                raise
    time.sleep(2)  # let the receivers read the last version before the store goes away


def _receiver(spec, index, versions, results, log, staging):
    _log_to(log)
    served = {n: torch.zeros_like(t) for n, t in version_tensors(0).items()}
    staged = StagedWeights(served) if staging == "full" else DirectWeights(served, threading.Lock())
    receiver = spec.receiver(index)
    try:
        for _ in versions:
            version = None
            while version is None:
                version = receiver.receive(staged, timeout_s=1.0)
            assert staged.swap_if_ready() == version
            results.put((index, version, _by_value(served), ""))
    except (WeightSyncError, WeightUpdateError) as e:
        broken = getattr(staged, "broken", None)
        results.put((index, None, _by_value(served), str(e) + (f" | broken: {broken}" if broken else "")))


def _by_value(tensors: dict) -> bytes:
    """The tensors as bytes: a tensor put in a queue as it is travels as a shared-memory handle
    that its process must still be alive to hand over, and a receiver exits right after its
    last put (the result was then lost at random on a loaded machine)."""
    buffer = io.BytesIO()
    torch.save({n: t.clone() for n, t in tensors.items()}, buffer)
    return buffer.getvalue()


def run_channel(versions, die_after_buckets=None, timeout_s=30.0, stray=False, staging="full", bogus_version=None,
                sender_late_s=0.0):
    """Run a sender and two receivers (the sender `sender_late_s` after them); returns (every
    receiver's results, seconds, and a text with each process's exit code and stderr, for
    assertion messages). Each receiver has a queue of its own: a process that dies while
    writing to a shared one would hold its lock."""
    import tempfile

    host = RendezvousHost("127.0.0.1")
    spec = BroadcastChannelSpec(host.rendezvous("weights"), receivers=2, timeout_s=timeout_s, bucket_mb=0.004)
    ctx = mp.get_context("spawn")
    logs = [os.path.join(tempfile.mkdtemp(prefix="weights-test-"), f"{name}.log")
            for name in ("sender", "receiver0", "receiver1")]
    queues = [ctx.Queue() for _ in range(2)]
    procs = [ctx.Process(target=_receiver, args=(spec, i, versions, queues[i], logs[i + 1], staging))
             for i in range(2)]
    procs += [ctx.Process(target=_sender, args=(spec, versions, die_after_buckets, logs[0], stray, bogus_version))]
    for p in procs:
        if p is procs[-1]:
            time.sleep(sender_late_s)
        p.start()
    out, t = [], time.monotonic()
    expected = 2 * len(versions) if die_after_buckets is None and bogus_version is None else 2 * (len(versions) - 1) + 2
    while len(out) < expected and time.monotonic() - t < 60:
        for q in queues:
            try:
                out.append(q.get(timeout=0.5))
            except queue.Empty:
                pass
    seconds = time.monotonic() - t
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    for q in queues:   # what a receiver that finished late (a loaded machine) put there
        while len(out) < expected:
            try:
                out.append(q.get(timeout=0.5))
            except queue.Empty:
                break
    out = [(i, v, torch.load(io.BytesIO(served)), error) for i, v, served, error in out]
    report = "\n".join(f"-- {os.path.basename(log)} (exit {p.exitcode}):\n{open(log).read()[-3000:]}"
                       for p, log in zip(procs[-1:] + procs[:-1], logs))
    return out, seconds, report


@pytest.mark.parametrize("staging", ["full", "none"])
def test_every_receiver_gets_every_version_exactly_whatever_else_reaches_the_control_socket(staging):
    # The sender comes last, as a learner that loads its model after the engines are up: the
    # receivers wait for its address at the rendezvous store.
    out, _, report = run_channel([1, 2, 3], stray=True, staging=staging, sender_late_s=1.0)
    assert sorted((i, v) for i, v, _, _ in out) == [(i, v) for i in range(2) for v in (1, 2, 3)], report
    for index, version, served, error in out:
        assert error == ""
        for name, tensor in version_tensors(version).items():
            assert served[name].dtype == tensor.dtype and torch.equal(served[name], tensor), (index, version, name)


def test_a_sender_killed_mid_transfer_fails_the_receivers_in_time_and_they_keep_their_weights():
    # Version 1 arrives whole; the sender dies after the first bucket of version 2.
    buckets = len(_pack_layout(version_tensors(1), int(0.004 * 2 ** 20))[1])
    assert buckets >= 2
    out, seconds, report = run_channel([1, 2], die_after_buckets=buckets + 1, timeout_s=5.0)
    failed = [(i, served, error) for i, v, served, error in out if v is None]
    assert len(failed) == 2, f"{[(i, v, error) for i, v, _, error in out]}\n{report}"
    for index, served, error in failed:
        assert "weight sender (learner rank 0) at 127.0.0.1" in error, error
        for name, tensor in version_tensors(1).items():  # still serving version 1
            assert torch.equal(served[name], tensor), (index, name)
    assert seconds < 30


def test_without_staging_a_sender_killed_mid_transfer_stops_the_receivers_engines_loudly():
    """actors.weight_staging=none: the first bucket of version 2 was written into the served
    weights when the sender died, so they are no policy's: the receiver fails in time, naming
    the sender, and its sink refuses every later step."""
    buckets = len(_pack_layout(version_tensors(1), int(0.004 * 2 ** 20))[1])
    out, seconds, report = run_channel([1, 2], die_after_buckets=buckets + 1, timeout_s=5.0, staging="none")
    failed = [error for i, v, served, error in out if v is None]
    assert len(failed) == 2, f"{[(i, v, error) for i, v, _, error in out]}\n{report}"
    for error in failed:
        assert "weight sender (learner rank 0) at 127.0.0.1" in error, error
        assert "broken: version 2 failed after part of it was written" in error, error
    assert seconds < 30


def test_without_staging_a_version_that_does_not_fit_is_refused_whole_before_its_first_write():
    out, _, report = run_channel([1, 2], timeout_s=3.0, staging="none", bogus_version=2)
    failed = [(served, error) for i, v, served, error in out if v is None]
    assert len(failed) == 2, f"{[(i, v, error) for i, v, _, error in out]}\n{report}"
    for served, error in failed:
        assert "'bogus.weight' is not a parameter" in error and "broken" not in error, error
        for name, tensor in version_tensors(1).items():   # still serving version 1, whole
            assert torch.equal(served[name], tensor), name


def test_a_receiver_that_never_comes_is_named_by_the_sender():
    host = RendezvousHost("127.0.0.1")
    spec = BroadcastChannelSpec(host.rendezvous("weights"), receivers=1, timeout_s=1.0)
    sender = spec.sender()
    with pytest.raises(ValueError, match="has 1 receiver"):
        sender.wait_for_receivers(2, 0.1)
    with pytest.raises(WeightSyncError, match="within 0.2s: still waiting"):
        sender.wait_for_receivers(1, 0.2)
    t = time.monotonic()
    with pytest.raises(WeightSyncError, match="did not join the broadcast group"):
        sender.send(1, version_tensors(1))
    assert time.monotonic() - t < 10


def test_a_receiver_whose_sender_never_publishes_fails_at_the_deadline_naming_where_it_looked():
    host = RendezvousHost("127.0.0.1")
    meet = host.rendezvous("weights")
    spec = BroadcastChannelSpec(meet, receivers=1, timeout_s=1.0)
    t = time.monotonic()
    with pytest.raises(WeightSyncError, match=rf"weight receiver 1: the weight sender \(learner rank 0\) did not "
                                              rf"publish its address at the rendezvous store at 127.0.0.1:{meet.port} "
                                              rf"\(prefix 'weights'\) within 1s"):
        spec.receiver(0).receive(StagedWeights(version_tensors(0)), timeout_s=0.1)
    assert time.monotonic() - t < 10


@pytest.mark.parametrize("end", ["sender", "receiver"])
def test_either_end_fails_in_time_naming_a_rendezvous_store_that_does_not_answer(end):
    import socket

    with socket.socket() as taken:   # bound, never listening: every connect is refused, nobody else gets the port
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        spec = BroadcastChannelSpec(Rendezvous("127.0.0.1", port, "weights"), receivers=1, timeout_s=1.0)
        who = "the weight sender \\(learner rank 0\\)" if end == "sender" else "weight receiver 1"
        t = time.monotonic()
        with pytest.raises(WeightSyncError, match=rf"{who} could not reach the rendezvous store at 127.0.0.1:{port} "
                                                  rf"within 1s"):
            if end == "sender":
                spec.sender()
            else:
                spec.receiver(0).receive(StagedWeights(version_tensors(0)), timeout_s=0.1)
        assert time.monotonic() - t < 30


def test_a_cuda_ipc_receiver_finds_a_sender_that_binds_after_it_started_looking_and_one_made_again():
    """The launcher hands out the spec before learner rank 0 has bound anything; a receiver
    that asks first gets nothing (as from a sender with nothing to send), then finds the
    sender's address and greets it; a sender made again is followed to its new address. (The
    CUDA parts need a GPU: tests/test_gpu.py.)"""
    from common.weights_ipc import IpcChannelSpec

    host = RendezvousHost("127.0.0.1")
    spec = IpcChannelSpec(host.rendezvous("weights"), timeout_s=5.0)
    receiver = spec.receiver(0)
    t = time.monotonic()
    assert receiver.receive(sink=None, timeout_s=0.3) is None and receiver.address is None
    assert time.monotonic() - t < 5
    sender = spec.sender()
    try:
        assert receiver.receive(sink=None, timeout_s=0.1) is None   # connected and greeted; no version yet
        assert receiver.address == sender.address and sender.address.startswith("tcp://127.0.0.1:")
        sender.wait_for_receivers(1, 5.0)
        assert sender.receivers == [receiver.name]
        again = spec.sender()   # made again (a learner restarted): a new port, published in its place
        receiver.HELLO_EVERY_S = 0.0   # the next receive greets, and looks the address up first
        assert receiver.receive(sink=None, timeout_s=0.1) is None
        assert receiver.address == again.address != sender.address
        again.wait_for_receivers(1, 5.0)
        assert again.receivers == [receiver.name]
        del host   # the rendezvous store ends (its launcher gone): not the sender's failure
        gc.collect()
        assert receiver.receive(sink=None, timeout_s=0.1) is None   # it keeps the address it has
        assert receiver.address == again.address and receiver._meeting is None
        again.close()
    finally:
        sender.close()
        receiver.close()


def test_a_cuda_ipc_receiver_whose_sender_is_gone_never_blocks_on_its_hellos():
    """The receiver greets its sender every few seconds while idle; with the sender gone they
    pile up in ZeroMQ's queue, and once it is full a blocking send would wait for ever."""
    from common.weights_ipc import IpcChannelSpec

    host = RendezvousHost("127.0.0.1")
    meet = host.rendezvous("weights")
    meet.publish("sender", f"tcp://127.0.0.1:{free_port()}", 5.0, "this test")   # a port nobody listens on
    receiver = IpcChannelSpec(meet, timeout_s=1.0).receiver()
    receiver.HELLO_EVERY_S = 0.0   # a hello on every call
    t = time.monotonic()
    for _ in range(1500):          # past ZeroMQ's default queue of 1000 messages
        receiver._connect()
    assert time.monotonic() - t < 10
    assert receiver.receive(sink=None, timeout_s=0.1) is None   # nothing comes: None at the deadline


def test_the_weight_push_bench_delivers_every_version_exactly_over_gloo():
    """bench/weight_push_bench.py (the two-GPU issue's channel-against-floor figure) on the CPU:
    a sender and a receiver process; the receiver's served tensors end with the sender's checksums."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "bench.weight_push_bench", "--backend", "gloo", "--models", "tiny",
                           "--versions", "3", "--repeats", "2", "--pause-s", "0"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["exact_tiny"] is True and summary["backend"] == "gloo"
    assert summary["transfer_ms_tiny"] > 0 and summary["floor_ms_tiny"] > 0
    assert summary["transfer_over_floor_tiny"] == summary["transfer_ms_tiny"] / summary["floor_ms_tiny"]


def test_the_two_gpu_figures_take_the_highest_target_both_runs_reach_and_name_missing_parts():
    """bench/two_gpu.py merges the parts of a two-GPU session; here with parts shaped as the
    benches write them (made up numbers: the merge's arithmetic is what is checked)."""
    from bench.two_gpu import figures
    push = {"results": {}, "summary": {"transfer_ms_1p5b": 30.0, "floor_ms_1p5b": 20.0, "device": "2 GPUs"}}
    actor = {"summary": {"update_ms_1p5b": 12.0, "stall_ms": 2.0, "native_update_ms_1p5b": 900.0}}
    job = {"metric": "eval/reward", "to_0.3_s_sync": 50.0, "to_0.3_s_async": 20.0,
           "to_0.6_s_sync": 200.0, "to_0.6_s_async": 80.0, "to_0.7_s_sync": 300.0, "to_0.7_s_async": None}
    metrics = [{"buffer/inserts": 10, "buffer/dropped_stale": 0},
               {"buffer/inserts": 40, "buffer/dropped_stale": 2, "buffer/staleness_histogram": {"0": 30, "1": 8}}]
    out = figures(push, actor, job, metrics)
    assert out["transfer_over_floor_1p5b"] == 1.5 and out["serving_ms_1p5b"] == 12.0
    assert (out["target"], out["async_over_sync"]) == (0.6, 2.5)   # 0.7: async never reached it
    assert out["dropped_share"] == 0.05 and out["staleness_histogram"] == {"0": 30, "1": 8}
    assert out["missing"] == [] and out["device"] == "2 GPUs"
    nothing = figures(None, actor, None, None)
    assert nothing["async_over_sync"] is None and nothing["missing"] == ["push", "job", "async metrics"]


def test_the_two_gpu_merge_reads_the_async_metrics_from_the_bundle_a_device_call_brings_back(tmp_path):
    """gpu_session.sh brings a job's run folders back as runs2.tgz (a call returns at most 8
    files); the merge reads the async run's metrics rows out of it, or out of a plain folder."""
    import json
    import tarfile

    from bench.two_gpu import _async_metrics
    rows = [{"step": 1}, {"buffer/inserts": 4, "buffer/dropped_stale": 1}]
    run = tmp_path / "made" / "runs2" / "async_grpo"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    call = tmp_path / "call"
    call.mkdir()
    with tarfile.open(call / "runs2.tgz", "w:gz") as tar:
        tar.add(tmp_path / "made" / "runs2", arcname="runs2")
    assert _async_metrics(str(call)) == rows[1:]
    assert _async_metrics(str(tmp_path / "made")) == rows[1:]
    assert _async_metrics(str(tmp_path)) is None
