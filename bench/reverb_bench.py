"""DeepMind's Reverb on bench/buffer_bench.py's work, run under Reverb's own interpreter (it
needs TensorFlow 2.15 and numpy < 2, so a venv of its own):

    python3 -m venv /tmp/reverb-venv
    /tmp/reverb-venv/bin/pip install dm-reverb==0.14.0 'tensorflow==2.15.*' 'numpy<2'
    /tmp/reverb-venv/bin/python bench/reverb_bench.py --bytes 4096 --writers 8 --seconds 3

The same work as the others: a server (here in this process, Reverb's C++ threads), W writer
processes each inserting one item of --bytes (a uint8 array) per acknowledged insert (append,
create_item, flush: flush returns once the server confirmed the item), and one reader process
sampling --batch items at a time from a uniform table that keeps its items (max_times_sampled
0, FIFO removal at max_size, MinSize(batch) rate limiter). Prints one JSON line: items_per_s,
taken_per_s, insert and sample p50/p99 ms. buffer_bench.py --reverb-python runs it.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

import numpy as np

TABLE = "bench"


def _percentiles(latencies) -> dict:
    if not len(latencies):
        return {"p50_ms": None, "p99_ms": None}
    ms = np.asarray(latencies) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def _writer(port, nbytes, start, seconds, out):
    import reverb

    client = reverb.Client(f"localhost:{port}")
    data = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    latencies, n = [], 0
    with client.trajectory_writer(num_keep_alive_refs=1) as writer:
        while time.time() < start:
            time.sleep(0.001)
        end = start + seconds
        while time.time() < end:
            t = time.perf_counter()
            writer.append({"x": data})
            writer.create_item(TABLE, priority=1.0, trajectory={"x": writer.history["x"][-1]})
            writer.flush()   # returns once the server has the item
            latencies.append(time.perf_counter() - t)
            n += 1
    out.put(("writer", n, latencies))


def _reader(port, batch, start, seconds, out):
    import reverb

    client = reverb.Client(f"localhost:{port}")
    latencies, n = [], 0
    while time.time() < start:
        time.sleep(0.001)
    end = start + seconds
    while time.time() < end:
        t = time.perf_counter()
        got = list(client.sample(TABLE, num_samples=batch))
        latencies.append(time.perf_counter() - t)
        n += len(got)
    out.put(("reader", n, latencies))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", type=int, default=4096)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    import reverb

    max_size = max(256, (512 << 20) // args.bytes)
    server = reverb.Server(tables=[reverb.Table(
        name=TABLE, sampler=reverb.selectors.Uniform(), remover=reverb.selectors.Fifo(), max_size=max_size,
        max_times_sampled=0, rate_limiter=reverb.rate_limiters.MinSize(args.batch))])
    seed = reverb.Client(f"localhost:{server.port}")
    data = np.zeros(args.bytes, dtype=np.uint8)
    for _ in range(args.batch):   # the reader needs `batch` items to start, as for the others
        seed.insert({"x": data}, priorities={TABLE: 1.0})
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start = time.time() + 2.0 + 0.5 * args.writers   # spawned interpreters import TensorFlow first
    procs = [ctx.Process(target=_writer, args=(server.port, args.bytes, start, args.seconds, out), daemon=True)
             for _ in range(args.writers)]
    procs.append(ctx.Process(target=_reader, args=(server.port, args.batch, start, args.seconds, out), daemon=True))
    for p in procs:
        p.start()
    results = [out.get(timeout=start - time.time() + args.seconds + 120) for _ in procs]
    for p in procs:
        p.join(10)
    inserted = sum(n for kind, n, _ in results if kind == "writer")
    taken = sum(n for kind, n, _ in results if kind == "reader")
    insert = _percentiles([x for kind, _, l in results if kind == "writer" for x in l])
    sample = _percentiles([x for kind, _, l in results if kind == "reader" for x in l])
    print(json.dumps({"system": "reverb", "reverb_version": getattr(reverb, "__version__", "?"),
                      "items_per_s": inserted / args.seconds, "taken_per_s": taken / args.seconds,
                      "insert_p50_ms": insert["p50_ms"], "insert_p99_ms": insert["p99_ms"],
                      "sample_p50_ms": sample["p50_ms"], "sample_p99_ms": sample["p99_ms"]}), flush=True)
    server.stop()


if __name__ == "__main__":
    main()
