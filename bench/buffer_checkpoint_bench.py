"""What a checkpoint of a full table costs the serving loop: written by the loop itself against
written by a forked child (buffer.checkpoint_in_child), in one run.

The server is `python -m buffer` (as a run starts it), its rollouts table filled to --mb of
groups of --size bytes (4 KiB: 133k groups in 512 MB, as a long run's table would be). For
each way of writing, one client asks for a checkpoint while another asks for the server's
stats back to back on the control socket, as the learner's requests come: reported are the
checkpoint's wall time (until its reply), the longest and the p99 wait of those stats requests
while it was written, the loop's own hold (`last_held_loop_ms`: the fork, or the whole
write), the checkpoint's size, and the peak memory of the server and of its writer child (its
RSS, which counts the pages it shares with the server, and its private memory alone).

Each way writes two checkpoints: the first whole, then, after --new-share of the table more
groups were stored (evicting as many), a delta on it (buffer.checkpoint_full_every: the arrays
of the new groups alone, every other group by its id).

    python -m bench.buffer_checkpoint_bench [--mb 512] [--size 4096] [--new-share 0.01] [--out FILE]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.buffer_bench import fill, group_of   # noqa: E402


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _private_mb(pid: int) -> float:
    """The memory only this process holds (smaps_rollup's Private_*): a forked child's own,
    without the pages it still shares with its parent."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0.0
    return sum(int(line.split()[1]) for line in lines if line.startswith(("Private_Clean:", "Private_Dirty:"))) / 1024


def _children(pid: int) -> list:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def run(in_child: bool, groups: int, nbytes: int, new_share: float, work: str) -> dict:
    from buffer.client import BufferClient
    from buffer.process import BufferProcess
    from buffer.server import BufferConfig
    from buffer.table import TableConfig

    table = TableConfig(max_size=groups, selector="uniform", max_times_sampled=0, max_staleness=1 << 30)
    folder = os.path.join(work, f"ckpt-{'child' if in_child else 'loop'}")
    server = BufferProcess(BufferConfig(table=table, checkpoint_dir=folder, checkpoint_every_s=0, timeout_s=120,
                                        checkpoint_in_child=in_child), os.path.join(work, "buffer.log")).start()
    pid = server.process.pid
    try:
        filler, asker = BufferClient(server.address, timeout_s=120, window=16), BufferClient(server.address, timeout_s=120)
        sample = [group_of(nbytes) for _ in range(16)]
        fill(filler, sample, groups)
        whole = measure(filler, asker, pid)
        fill(filler, sample, int(groups * new_share), first=groups)
        delta = measure(filler, asker, pid)
        filler.close()
        asker.close()
        return {"in_child": in_child, "groups": groups, "new_groups": int(groups * new_share),
                "whole": whole, "delta": delta}
    finally:
        server.stop()


def measure(filler, asker, pid: int) -> dict:
    """One checkpoint asked by `filler` while `asker` asks for stats back to back."""
    waits, done, peak = [], threading.Event(), {"server": _rss_mb(pid), "child": 0.0, "child_private": 0.0}

    def ask():
        while not done.is_set():
            t = time.perf_counter()
            asker.stats()
            waits.append((t, time.perf_counter() - t))

    def watch():
        while not done.is_set():
            peak["server"] = max(peak["server"], _rss_mb(pid))
            for child in _children(pid):
                peak["child"] = max(peak["child"], _rss_mb(child))
                peak["child_private"] = max(peak["child_private"], _private_mb(child))
            time.sleep(0.02)
    before_mb = _rss_mb(pid)
    threads = [threading.Thread(target=ask), threading.Thread(target=watch)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    t0 = time.perf_counter()
    path = filler.checkpoint()["path"]
    wall = time.perf_counter() - t0
    time.sleep(0.2)
    done.set()
    for t in threads:
        t.join(150)
    during = [d for s, d in waits if s + d >= t0 and s <= t0 + wall]   # requests the checkpoint overlapped
    stats = asker.stats()["checkpoint_writes"]
    return {"checkpoint": Path(path).name, "checkpoint_s": round(wall, 3),
            "checkpoint_mb": round(os.path.getsize(path) / 1e6, 1),
            "stats_requests_during": len(during),
            "longest_wait_ms": round(max(during, default=wall) * 1000, 2),
            "p99_wait_ms": round(float(np.percentile(during, 99)) * 1000, 2) if during else None,
            "loop_held_ms": stats["last_held_loop_ms"], "server_rss_mb": round(before_mb),
            "server_peak_rss_mb": round(peak["server"]), "writer_peak_rss_mb": round(peak["child"]),
            "writer_peak_private_mb": round(peak["child_private"])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=512, help="the table's groups, encoded, in MB")
    parser.add_argument("--size", type=int, default=4096, help="one group's encoded bytes")
    parser.add_argument("--new-share", type=float, default=0.01,
                        help="groups stored between the whole checkpoint and the delta, as a share of the table")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    groups = int(args.mb * (1 << 20) // args.size)
    results = []
    with tempfile.TemporaryDirectory(prefix="buffer-ckpt-bench-") as work:
        for in_child in (False, True):
            results.append(run(in_child, groups, args.size, args.new_share, work))
            print(json.dumps(results[-1]), flush=True)
    loop, child = results
    final = {"bench": "buffer_checkpoint", "groups": groups, "group_bytes": args.size,
             "longest_wait_ms_in_loop": loop["whole"]["longest_wait_ms"],
             "longest_wait_ms_in_child": child["whole"]["longest_wait_ms"],
             "delta_over_whole_s_in_child": round(child["delta"]["checkpoint_s"] / child["whole"]["checkpoint_s"], 3),
             "runs": results, "machine": f"{platform.node()} ({os.cpu_count()} cpus)",
             "date": datetime.date.today().isoformat()}
    if args.out:
        Path(args.out).write_text(json.dumps(final, indent=1) + "\n")
    print(json.dumps(final))


if __name__ == "__main__":
    main()
