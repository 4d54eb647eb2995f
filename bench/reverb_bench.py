"""DeepMind's Reverb on bench/buffer_bench.py's work, run under Reverb's own interpreter (it
needs TensorFlow 2.15 and numpy < 2, so a venv of its own):

    python3 -m venv /tmp/reverb-venv
    /tmp/reverb-venv/bin/pip install dm-reverb==0.14.0 'tensorflow==2.15.*' 'numpy<2'
    /tmp/reverb-venv/bin/python bench/reverb_bench.py --bytes 4096 --writers 8 --seconds 3

The same work as the others: a server (here in this process, Reverb's C++ threads), W writer
processes each inserting one item of --bytes (a uint8 array) per acknowledged insert (append,
create_item, flush: flush returns once the server confirmed the item; --flush-every N
pipelines N items per flush) into a uniform table that keeps its items (max_times_sampled 0,
FIFO removal at max_size). Inserts only: a reader through Reverb's Python sampler took 1.7 s
and more per batch of 16 here (its fast path is a tf.data dataset), which would not measure
the server. Prints one JSON line: items_per_s, insert p50/p99 ms (sample fields None).
buffer_bench.py --reverb-python runs it.
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


def _ready_then_start(ready, go, start) -> float:
    """Say this process has imported Reverb (TensorFlow: seconds), wait for every other, and
    return the common start time."""
    ready.put(1)
    go.wait()
    while time.time() < start.value:
        time.sleep(0.001)
    return start.value


def _writer(port, nbytes, flush_every, ready, go, start, seconds, out):
    import reverb

    client = reverb.Client(f"localhost:{port}")
    data = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    latencies, n = [], 0
    with client.trajectory_writer(num_keep_alive_refs=1) as writer:
        end = _ready_then_start(ready, go, start) + seconds
        while time.time() < end:
            t = time.perf_counter()
            writer.append({"x": data})
            writer.create_item(TABLE, priority=1.0, trajectory={"x": writer.history["x"][-1]})
            n += 1
            if n % flush_every == 0:
                writer.flush()   # returns once the server has the items
                latencies.append(time.perf_counter() - t)
        writer.flush()
    out.put(("writer", n, latencies))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", type=int, default=4096)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--flush-every", type=int, default=1,
                        help="items per flush (1: every insert acknowledged, as asyncrl's writers; more: pipelined)")
    args = parser.parse_args()
    import reverb

    max_size = max(256, (512 << 20) // args.bytes)
    server = reverb.Server(tables=[reverb.Table(
        name=TABLE, sampler=reverb.selectors.Uniform(), remover=reverb.selectors.Fifo(), max_size=max_size,
        max_times_sampled=0, rate_limiter=reverb.rate_limiters.MinSize(1))])
    ctx = mp.get_context("spawn")
    out, ready, go, start = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    procs = [ctx.Process(target=_writer, args=(server.port, args.bytes, args.flush_every, ready, go, start,
                                               args.seconds, out),
                         daemon=True) for _ in range(args.writers)]
    for p in procs:
        p.start()
    for _ in procs:   # every interpreter has imported TensorFlow and connected
        ready.get(timeout=600)
    start.value = time.time() + 0.5
    go.set()
    results = [out.get(timeout=args.seconds + 120) for _ in procs]
    for p in procs:
        p.join(10)
    inserted = sum(n for kind, n, _ in results if kind == "writer")
    insert = _percentiles([x for kind, _, l in results if kind == "writer" for x in l])
    print(json.dumps({"system": "reverb", "flush_every": args.flush_every, "items_per_s": inserted / args.seconds,
                      "taken_per_s": None, "insert_p50_ms": insert["p50_ms"], "insert_p99_ms": insert["p99_ms"],
                      "sample_p50_ms": None, "sample_p99_ms": None}), flush=True)
    server.stop()


if __name__ == "__main__":
    main()
