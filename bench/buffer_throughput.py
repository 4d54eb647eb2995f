"""Buffer throughput against raw pyzmq and Ray's queue, on loopback, in one run.

For each payload size: a rollout group of G=8 rows and T tokens (tokens, mask, log-probs:
9 bytes a token) goes from one client to a server in another process and back out to another
client, as in a run (the buffer, actors and learner in processes of their own):
  raw pyzmq     DEALER -> ROUTER -> DEALER, the bytes alone, pipelined, no reply, no schema and
                no table: the floor
  asyncrl       BufferClient.insert of one group per request (acknowledged, validated,
                deduplicated), then sample(64)
  asyncrl x8    the same with 8 groups per insert request (an actor inserts a batch at once)
  asyncrl w16   BufferClient.put of one group at a time, 16 requests in flight (puts made while
                they are go together, up to the client's coalesce), then flush
  ray queue     ray.util.queue.Queue put / get_nowait_batch(64) of the same RolloutGroup objects
Prints one table row per (system, size): messages/s and GB/s of the round trip, and the ratio
to raw pyzmq. Usage: python bench/buffer_throughput.py [--seconds 3]
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import sys
import time

import numpy as np
import zmq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from buffer.client import BufferClient  # noqa: E402
from buffer.server import BufferConfig, BufferServer  # noqa: E402
from buffer.table import TableConfig  # noqa: E402
from common.rollout import RolloutGroup  # noqa: E402
from common.wire import encode  # noqa: E402

G = 8


def group(tokens: int) -> RolloutGroup:
    rows = [{"tokens": np.arange(tokens) % 1000, "loss_mask": np.ones(tokens), "behaviour_logprobs": -np.ones(tokens),
             "reward": 1.0, "turn_rewards": [1.0], "error": "", "token_versions": np.zeros(tokens)}] * G
    return RolloutGroup.from_rows(rows)


def _forward(port_queue):
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    port_queue.put(router.bind_to_random_port("tcp://127.0.0.1"))
    while True:
        msg = router.recv_multipart(copy=False)
        if len(msg) == 2 and msg[1].bytes == b"stop":
            return
        router.send_multipart([b"c", *msg[1:]], copy=False)


def raw_pyzmq(tokens: int, seconds: float) -> tuple:
    """Round trip of the same frames through a ROUTER (another process) to a consumer."""
    ports = mp.get_context("spawn").Queue()
    child = mp.get_context("spawn").Process(target=_forward, args=(ports,), daemon=True)
    child.start()
    port = ports.get(timeout=60)
    ctx = zmq.Context.instance()
    producer, consumer = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    producer.setsockopt(zmq.IDENTITY, b"p")
    consumer.setsockopt(zmq.IDENTITY, b"c")
    for sock in (producer, consumer):
        sock.connect(f"tcp://127.0.0.1:{port}")
    time.sleep(0.3)
    frames = encode(group(tokens).to_wire())
    size = sum(len(f) for f in frames)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(64):
            producer.send_multipart(frames, copy=False)
        for _ in range(64):
            consumer.recv_multipart(copy=False)
        n += 64
    dt = time.perf_counter() - t0
    producer.send(b"stop")
    child.join(10)
    for sock in (producer, consumer):
        sock.close(linger=0)
    return n / dt, n * size / dt / 1e9, size


def _serve(port_queue):
    server = BufferServer(BufferConfig(table=TableConfig(max_size=100_000)))
    port_queue.put(server.address)
    server.serve()


def asyncrl_buffer(tokens: int, seconds: float, per_insert: int = 1, window: int = 1) -> tuple:
    addresses = mp.get_context("spawn").Queue()
    child = mp.get_context("spawn").Process(target=_serve, args=(addresses,), daemon=True)
    child.start()
    address = addresses.get(timeout=60)
    actor, learner = BufferClient(address, window=window), BufferClient(address)
    templates = [group(tokens) for _ in range(per_insert)]
    size = sum(len(f) for f in encode(templates[0].to_wire()))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        batches = []
        for _ in range(64 // per_insert):
            batch = []
            for t in templates:
                batch.append(dataclasses.replace(t, id=f"{n}"))   # one RolloutGroup for each insert
                n += 1
            batches.append(batch)
        if window > 1:
            for batch in batches:
                actor.put(*batch)
            actor.flush()
        else:
            for batch in batches:
                actor.insert(*batch)
        got, _, _ = learner.sample(64)
        assert len(got) == 64
    dt = time.perf_counter() - t0
    child.kill()
    return n / dt, n * size / dt / 1e9, size


def ray_queue(tokens: int, seconds: float) -> tuple:
    from ray.util.queue import Queue
    queue = Queue(maxsize=100_000)
    template = group(tokens)
    size = sum(len(f) for f in encode(template.to_wire()))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(64):
            queue.put(template)
            n += 1
        got = queue.get_nowait_batch(64)
        assert len(got) == 64
    dt = time.perf_counter() - t0
    queue.shutdown()
    return n / dt, n * size / dt / 1e9, size


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--tokens", type=int, nargs="*", default=[64, 1024, 16384])
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    if not args.no_ray:
        import ray
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"{'system':<12} {'tokens/row':>10} {'bytes/group':>12} {'groups/s':>10} {'GB/s':>7} {'vs raw':>7}")
    for tokens in args.tokens:
        base = raw_pyzmq(tokens, args.seconds)
        rows = [("raw pyzmq", base), ("asyncrl", asyncrl_buffer(tokens, args.seconds)),
                ("asyncrl x8", asyncrl_buffer(tokens, args.seconds, per_insert=8)),
                ("asyncrl w16", asyncrl_buffer(tokens, args.seconds, window=16))]
        if not args.no_ray:
            rows.append(("ray queue", ray_queue(tokens, args.seconds)))
        for name, (rate, gbps, size) in rows:
            print(f"{name:<12} {tokens:>10} {size:>12} {rate:>10.0f} {gbps:>7.3f} {rate / base[0]:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
