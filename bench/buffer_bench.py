"""The replay buffer under many clients, against raw pyzmq and Ray's queue, in one run.

For each group size (4 KiB and 1 MiB encoded: G=8 rows of as many tokens as that takes) and
each number of writer clients (1, 8, 32; --quick: 8), every system gets the same work for
--seconds: W writer processes insert groups as fast as they can while one reader process
takes them out in batches of --batch.

  asyncrl    the buffer server in its own process (`python -m buffer`, as a run starts it);
             writers: BufferClient.put of one group at a time, up to --window (the client's
             default, 4) requests in flight and, while they are, up to --coalesce (128) puts
             waiting to go together as one request; each acknowledged as it lands (validated,
             deduplicated by id; only acknowledged groups count); reader: BufferClient.sample (uniform selector, groups
             kept, so a sample never waits for inserts: its latency is the service time)
  raw pyzmq  the floor: a forwarder process (ROUTER in, PUSH out) passing the same frames
             from DEALER writers (no acknowledgement, no schema, no table) to a PULL reader
  ray queue  ray.util.queue.Queue (an actor; Ray started for this case alone); writers are Ray
             tasks calling put() with the same RolloutGroup objects; the reader calls
             get_nowait_batch

Reported per (system, size, writers): items/s and MB/s inserted (by the writers), items/s
taken by the reader, p50/p99 latency of an insert and of a sample (for asyncrl also the
server's part of a sample's: from reading the request to sending the reply). The last line is one
JSON object: zmq_share_items_4k and zmq_share_mb_1m (asyncrl over raw pyzmq, 8 writers),
ratio_items_4k and ratio_mb_1m (asyncrl over Ray's queue, 8 writers), p99_sample_ms_8clients,
machine and date; given --reverb-python (the interpreter of a venv with dm-reverb, see
bench/reverb_bench.py), DeepMind's Reverb does the same work too, and reverb_share_items_4k
and reverb_share_mb_1m (asyncrl over Reverb, 8 writers; inserts only, each acknowledged, with as
many items per flush as an asyncrl writer's puts of that size may go together, unless
--reverb-flush-every says otherwise) join it. The cases run system by system, Ray's queue
last; a SIGTERM (a deadline's `timeout`) ends the run with the summary of the cases that ran,
its `cut_short` naming where it stopped.

    python -m bench.buffer_bench [--quick] [--seconds 4] [--writers 1 8 32] [--window 4] [--coalesce 128]
                                 [--out FILE]
                                 [--reverb-python /tmp/reverb-venv/bin/python] [--reverb-flush-every N]
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import signal
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from buffer.client import COALESCE, COALESCE_BYTES, WINDOW  # noqa: E402

G = 8
SIZES = {"4k": 4096, "1m": 1 << 20}
START_DELAY_S = 1.0  # every process starts its clock at the same wall-clock time


def make_group(tokens: int):
    from common.rollout import RolloutGroup

    rows = [{"tokens": np.arange(tokens) % 1000, "loss_mask": np.ones(tokens), "behaviour_logprobs": -np.ones(tokens),
             "reward": 1.0, "turn_rewards": [1.0], "error": "", "token_versions": np.zeros(tokens)}] * G
    return RolloutGroup.from_rows(rows)


def encoded_size(group) -> int:
    from common.wire import encode
    return sum(len(f) for f in encode(group.to_wire()))


def coalesced(group, coalesce: int) -> int:
    """How many puts of `group` an asyncrl writer's client sends together at most: `coalesce`,
    or as many as reach COALESCE_BYTES of arrays (buffer/client.py)."""
    from common.rollout import ARRAY_FIELDS
    return min(coalesce, -(-COALESCE_BYTES // sum(getattr(group, name).nbytes for name in ARRAY_FIELDS)))


def group_of(nbytes: int):
    """The group whose encoded size is closest to nbytes from below (bisection on tokens)."""
    low, high = 1, max(2, nbytes)
    while low < high:
        mid = (low + high + 1) // 2
        if encoded_size(make_group(mid)) <= nbytes:
            low = mid
        else:
            high = mid - 1
    return make_group(low)


def fill(client, groups: list, count: int, first: int = 0) -> None:
    """Put `count` groups through `client`: `groups` again and again, under new ids each time
    (fill-<first>, fill-<first + 1>, ...; a put encodes its groups at once, so renaming them
    after is safe)."""
    for start in range(first, first + count, len(groups)):
        for i, g in enumerate(groups):
            g.id = f"fill-{start + i}"
        client.put(*groups)
    client.flush()


def percentiles(latencies) -> dict:
    if len(latencies) == 0:
        return {"p50_ms": None, "p99_ms": None}
    a = np.asarray(latencies) * 1e3
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}


def _wait_until(t: float) -> None:
    time.sleep(max(0.0, t - time.time()))


# -- asyncrl ---------------------------------------------------------------------------------
def _asyncrl_writer(address, tokens, window, coalesce, nice, index, start, seconds, out):
    """Puts each group as it is made, as an actor does with groups as they finish, with up to
    `window` requests unacknowledged and `coalesce` puts waiting meanwhile (window 1 and coalesce 1: each
    insert waits for its acknowledgement). Counts the
    groups acknowledged by the end; latency: from the put to its acknowledgement landing."""
    from collections import deque

    from buffer.client import BufferClient

    os.nice(nice)   # --writer-nice: the reader (the learner) and the server before the writers for a core
    group, client = make_group(tokens), BufferClient(address, timeout_s=60, window=window, coalesce=coalesce)
    latencies, sent, n = [], deque(), 0
    _wait_until(start)
    end = start + seconds
    while time.time() < end:
        group.id = f"w{index}-{n}"
        sent.append(time.perf_counter())
        client.put(group)
        n += 1
        while len(sent) > client.pending_puts:   # acknowledgements land in order
            latencies.append(time.perf_counter() - sent.popleft())
    acknowledged = n - client.pending_puts
    client.flush()
    out.put(("writer", acknowledged, np.asarray(latencies, dtype=np.float32)))


def _asyncrl_reader(address, batch, start, seconds, out):
    from buffer.client import BufferClient

    client = BufferClient(address, timeout_s=60)
    latencies, n = [], 0
    _wait_until(start)
    end = start + seconds
    while time.time() < end:
        t = time.perf_counter()
        groups, _, _ = client.sample(batch, timeout_s=max(0.5, end - time.time()))
        latencies.append(time.perf_counter() - t)
        n += len(groups)
    out.put(("reader", n, np.asarray(latencies, dtype=np.float32)))


def run_asyncrl(tokens: int, nbytes: int, writers: int, seconds: float, batch: int, work: str, window: int = WINDOW,
                coalesce: int = COALESCE, prefill: float = 0.0, writer_nice: int = 0) -> dict:
    from buffer.process import BufferProcess
    from buffer.server import BufferConfig
    from buffer.table import TableConfig

    table = TableConfig(max_size=max(256, (512 << 20) // nbytes), selector="uniform", max_times_sampled=0,
                        min_size_to_sample=batch, max_staleness=1 << 30)
    server = BufferProcess(BufferConfig(table=table, checkpoint_dir=""), os.path.join(work, "buffer.log")).start()
    try:
        # the reader needs `batch` groups to start: put them in before the clock starts
        from buffer.client import BufferClient
        seed, group = BufferClient(server.address), make_group(tokens)
        for i in range(batch):
            group.id = f"seed-{i}"
            seed.insert(group)
        if prefill:   # a long run's steady state: the table full, so that every insert evicts one
            filler = BufferClient(server.address, timeout_s=60, window=16)
            fill(filler, [make_group(tokens) for _ in range(16)], int(prefill * table.max_size))
            filler.close()
        result = _run(_asyncrl_writer, _asyncrl_reader, (server.address, tokens, window, coalesce, writer_nice), (server.address, batch),
                      writers, seconds)
        # the server's own part of a sample's time (reading the request to sending the reply, its
        # last 1024 samples): the rest of the reader's is transport, waiting for a core, decoding
        served = seed.stats()["sample_reply_ms"]
        seed.close()
        return {**result, "server_sample_p50_ms": served["p50"], "server_sample_p99_ms": served["p99"]}
    finally:
        server.stop()


# -- raw pyzmq -------------------------------------------------------------------------------
def _forwarder(ports):
    import zmq

    ctx = zmq.Context()
    router, push = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUSH)
    for s in (router, push):
        s.setsockopt(zmq.RCVHWM, 64)
        s.setsockopt(zmq.SNDHWM, 64)
    ports.put((router.bind_to_random_port("tcp://127.0.0.1"), push.bind_to_random_port("tcp://127.0.0.1")))
    while True:
        frames = router.recv_multipart(copy=False)
        if len(frames) == 2 and frames[1].bytes == b"stop":
            return
        push.send_multipart(frames[1:], copy=False)


def _zmq_writer(ports, tokens, index, start, seconds, out):
    import zmq

    from common.wire import encode

    frames = encode(make_group(tokens).to_wire())
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, 64)
    sock.connect(f"tcp://127.0.0.1:{ports[0]}")
    n = 0
    _wait_until(start)
    end = start + seconds
    while time.time() < end:   # as fast as the forwarder takes them, never blocked past the end
        try:
            sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
            n += 1
        except zmq.Again:
            sock.poll(50, zmq.POLLOUT)
    sock.close(linger=0)
    out.put(("writer", n, np.zeros(0, dtype=np.float32)))


def _zmq_reader(ports, batch, start, seconds, out):
    import zmq

    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 64)
    sock.connect(f"tcp://127.0.0.1:{ports[1]}")
    n = 0
    _wait_until(start)
    end = start + seconds
    while time.time() < end:
        if sock.poll(100):
            sock.recv_multipart(copy=False)
            n += 1
    sock.close(linger=0)
    out.put(("reader", n, np.zeros(0, dtype=np.float32)))


def run_raw_zmq(tokens: int, nbytes: int, writers: int, seconds: float, batch: int, work: str) -> dict:
    import zmq

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    forwarder = ctx.Process(target=_forwarder, args=(q,), daemon=True)
    forwarder.start()
    ports = q.get(timeout=60)
    try:
        r = _run(_zmq_writer, _zmq_reader, (ports, tokens), (ports, batch), writers, seconds)
        r["items_per_s"] = r["taken_per_s"]   # delivered, not merely queued by the writers
        return r
    finally:
        stop = zmq.Context.instance().socket(zmq.DEALER)
        stop.connect(f"tcp://127.0.0.1:{ports[0]}")
        stop.send(b"stop")
        forwarder.join(5)
        if forwarder.is_alive():
            forwarder.kill()
        stop.close(linger=0)


# -- Ray's queue -----------------------------------------------------------------------------
def run_ray_queue(tokens: int, nbytes: int, writers: int, seconds: float, batch: int, work: str) -> dict:
    import ray
    from ray.util.queue import Empty, Queue

    # Ray runs for this case alone: an idle Ray cluster's processes beside the other systems'
    # cases took a share of the two cores
    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}})
    try:
        return _ray_queue(ray, Queue, Empty, tokens, nbytes, writers, seconds, batch)
    finally:
        ray.shutdown()


def _ray_queue(ray, Queue, Empty, tokens: int, nbytes: int, writers: int, seconds: float, batch: int) -> dict:
    queue = Queue(maxsize=max(256, (512 << 20) // nbytes))

    @ray.remote(num_cpus=0)
    class Writer:
        def __init__(self, tokens):
            self.group = make_group(tokens)

        def ready(self):
            return True

        def run(self, queue, start, seconds):
            latencies, n = [], 0
            _wait_until(start)
            end = start + seconds
            while time.time() < end:
                t = time.perf_counter()
                queue.put(self.group)
                latencies.append(time.perf_counter() - t)
                n += 1
            return n, np.asarray(latencies, dtype=np.float32)

    pool = [Writer.remote(tokens) for _ in range(writers)]
    ray.get([w.ready.remote() for w in pool], timeout=300)   # every writer's process is up
    start = time.time() + START_DELAY_S
    futures = [w.run.remote(queue, start, seconds) for w in pool]
    taken, sample_latencies = 0, []
    _wait_until(start)
    end = start + seconds
    while time.time() < end:
        t = time.perf_counter()
        try:
            taken += len(queue.get_nowait_batch(batch))
            sample_latencies.append(time.perf_counter() - t)
        except Empty:
            time.sleep(0.001)
    results = ray.get(futures, timeout=seconds + 120)
    queue.shutdown()
    for w in pool:
        ray.kill(w)
    inserted = sum(n for n, _ in results)
    return _summary(inserted, taken, np.concatenate([l for _, l in results]), sample_latencies, seconds)


# -- the common driver -----------------------------------------------------------------------
def _run(writer, reader, writer_args, reader_args, writers: int, seconds: float) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start = time.time() + START_DELAY_S + 0.3 * writers   # spawned interpreters import first
    procs = [ctx.Process(target=writer, args=(*writer_args, i, start, seconds, out), daemon=True)
             for i in range(writers)]
    procs.append(ctx.Process(target=reader, args=(*reader_args, start, seconds, out), daemon=True))
    for p in procs:
        p.start()
    results = [out.get(timeout=start - time.time() + seconds + 120) for _ in procs]
    for p in procs:
        p.join(10)
    inserted = sum(n for kind, n, _ in results if kind == "writer")
    taken = sum(n for kind, n, _ in results if kind == "reader")
    insert_latencies = np.concatenate([l for kind, _, l in results if kind == "writer"])
    sample_latencies = np.concatenate([l for kind, _, l in results if kind == "reader"])
    return _summary(inserted, taken, insert_latencies, sample_latencies, seconds)


def _summary(inserted, taken, insert_latencies, sample_latencies, seconds) -> dict:
    insert, sample = percentiles(insert_latencies), percentiles(sample_latencies)
    return {"items_per_s": inserted / seconds, "taken_per_s": taken / seconds,
            "insert_p50_ms": insert["p50_ms"], "insert_p99_ms": insert["p99_ms"],
            "sample_p50_ms": sample["p50_ms"], "sample_p99_ms": sample["p99_ms"]}


def run_reverb(python: str, nbytes: int, writers: int, seconds: float, flush_every: int) -> dict:
    """bench/reverb_bench.py under Reverb's interpreter; its JSON line."""
    import subprocess

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reverb_bench.py")
    done = subprocess.run([python, script, "--bytes", str(nbytes), "--writers", str(writers), "--seconds",
                           str(seconds), "--flush-every", str(flush_every)], capture_output=True, text=True, timeout=seconds + 600)
    if done.returncode != 0:
        raise RuntimeError(f"reverb_bench.py failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


SYSTEMS = {"asyncrl": run_asyncrl, "raw pyzmq": run_raw_zmq, "ray queue": run_ray_queue}


class _Stop(Exception):
    pass


def _stopped(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # a second SIGTERM ends it at once
    raise _Stop


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 writers only, 3 s per case (under two minutes)")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--batch", type=int, default=16, help="groups per sample")
    parser.add_argument("--window", type=int, default=WINDOW,
                        help="asyncrl: insert requests in flight per writer (1, with --coalesce 1: each put "
                             "waits for the previous one's acknowledgement)")
    parser.add_argument("--coalesce", type=int, default=COALESCE,
                        help="asyncrl: puts waiting for room in the window that go together as one request, at most")
    parser.add_argument("--prefill", type=float, default=0.0, metavar="SHARE",
                        help="asyncrl: fill its table to this share of max_size before the clock starts "
                             "(1: a long run's steady state, every insert evicting one)")
    parser.add_argument("--writer-nice", type=int, default=0, metavar="N",
                        help="asyncrl: run its writer processes at this niceness (a diagnostic of the sample's "
                             "tail: the reader and the server get a core first, as a learner and a buffer on "
                             "cores of their own would; Linux CFS)")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--out", help="also write every row and the summary here (JSON)")
    parser.add_argument("--reverb-python", help="the python of a venv with dm-reverb: run Reverb on the same work")
    parser.add_argument("--reverb-flush-every", type=int,
                        help="Reverb: items per flush, each flush waiting for all of them (default: as many as "
                             "an asyncrl writer's puts of that size may go together: --coalesce, or fewer where "
                             "they reach the client's COALESCE_BYTES)")
    args = parser.parse_args()
    if args.quick:
        args.writers, args.seconds = [8], 3.0
    work = tempfile.mkdtemp(prefix="buffer-bench-")
    groups = {name: group_of(nbytes) for name, nbytes in SIZES.items()}
    rows = []
    print(f"{'system':<10} {'size':>5} {'writers':>7} {'items/s':>9} {'MB/s':>8} {'taken/s':>9} "
          f"{'insert p50/p99 ms':>18} {'sample p50/p99 ms':>18}", flush=True)
    # Ray's queue last (its start took minutes on a fresh 16-core machine, 2026-12-08), and a
    # SIGTERM (a deadline's `timeout`) ends the bench with the summary of the cases that ran
    systems = ([name for name in args.systems if name != "ray queue"] + (["reverb"] if args.reverb_python else [])
               + [name for name in args.systems if name == "ray queue"])
    cases = [(system, size, writers) for system in systems for size in groups for writers in args.writers]
    signal.signal(signal.SIGTERM, _stopped)
    cut_short = None
    try:
        for system, size, writers in cases:
            group = groups[size]
            tokens, nbytes = int(group.lengths[0]), encoded_size(group)
            if system == "reverb":
                flush = args.reverb_flush_every or coalesced(group, args.coalesce)
                r = run_reverb(args.reverb_python, nbytes, writers, args.seconds, flush)
                r["flush_every"] = flush
            else:
                extra = ({"window": args.window, "coalesce": args.coalesce, "prefill": args.prefill,
                          "writer_nice": args.writer_nice}
                         if system == "asyncrl" else {})
                r = SYSTEMS[system](tokens, nbytes, writers, args.seconds, args.batch, work, **extra)
            r.update(system=system, size=size, bytes=nbytes, writers=writers, mb_per_s=r["items_per_s"] * nbytes / 1e6)
            rows.append(r)
            print(f"{system:<10} {size:>5} {writers:>7} {r['items_per_s']:>9.0f} {r['mb_per_s']:>8.1f} "
                  f"{'-' if r['taken_per_s'] is None else round(r['taken_per_s']):>9} {str(r['insert_p50_ms']) + '/' + str(r['insert_p99_ms']):>18} "
                  f"{str(r['sample_p50_ms']) + '/' + str(r['sample_p99_ms']):>18}"
                  + (f"   server's part {r['server_sample_p50_ms']}/{r['server_sample_p99_ms']}"
                     if r.get("server_sample_p99_ms") is not None else ""), flush=True)
    except _Stop:   # in the case after the last row
        system, size, writers = cases[len(rows)]
        cut_short = (f"stopped by SIGTERM in {system} at {size} with {writers} writers: "
                     f"{len(cases) - len(rows) - 1} case(s) after it did not run")
        print(cut_short, flush=True)

    def get(system, size, writers=8):
        return next((r for r in rows if (r["system"], r["size"], r["writers"]) == (system, size, writers)), None)

    def ratio(a, b, key):
        return round(a[key] / b[key], 3) if a and b and b[key] else None

    summary = {
        "zmq_share_items_4k": ratio(get("asyncrl", "4k"), get("raw pyzmq", "4k"), "items_per_s"),
        "zmq_share_mb_1m": ratio(get("asyncrl", "1m"), get("raw pyzmq", "1m"), "mb_per_s"),
        "ratio_items_4k": ratio(get("asyncrl", "4k"), get("ray queue", "4k"), "items_per_s"),
        "ratio_mb_1m": ratio(get("asyncrl", "1m"), get("ray queue", "1m"), "mb_per_s"),
        "p99_sample_ms_8clients": (get("asyncrl", "4k") or {}).get("sample_p99_ms"),
        "server_p99_sample_ms_8clients": (get("asyncrl", "4k") or {}).get("server_sample_p99_ms"),
        **({"reverb_share_items_4k": ratio(get("asyncrl", "4k"), get("reverb", "4k"), "items_per_s"),
            "reverb_share_mb_1m": ratio(get("asyncrl", "1m"), get("reverb", "1m"), "mb_per_s"),
            "reverb_items_per_s_4k": round(get("reverb", "4k")["items_per_s"]) if get("reverb", "4k") else None,
            "reverb_mb_per_s_1m": round(get("reverb", "1m")["mb_per_s"], 1) if get("reverb", "1m") else None}
           if args.reverb_python else {}),
        "asyncrl_items_per_s_4k": round(get("asyncrl", "4k")["items_per_s"]) if get("asyncrl", "4k") else None,
        "asyncrl_mb_per_s_1m": round(get("asyncrl", "1m")["mb_per_s"], 1) if get("asyncrl", "1m") else None,
        "bytes_4k": encoded_size(groups["4k"]), "bytes_1m": encoded_size(groups["1m"]),
        "machine": f"{platform.node()} ({os.cpu_count()} cores)", "date": datetime.date.today().isoformat(),
        "window": args.window, "coalesce": args.coalesce, "prefill": args.prefill, "writer_nice": args.writer_nice,
        **({"reverb_flush_every": {size: get("reverb", size)["flush_every"] for size in SIZES if get("reverb", size)}}
           if args.reverb_python else {}),
        "command": "python -m bench.buffer_bench " + " ".join(sys.argv[1:]),
        **({"cut_short": cut_short} if cut_short else {}),
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "summary": summary}, f, indent=1)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
