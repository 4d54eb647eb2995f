"""A buffer server as a process of its own:

    python -m buffer [key=value ...]        # keys of BufferConfig (buffer/server.py), e.g.
    python -m buffer port=5555 checkpoint_dir=/data/buffer table.max_size=4096
    python -m buffer tables.solved.selector=max_heap     # one more named table, "solved"

    python -m buffer keys                                # a CurveZMQ key set, for curve=true

With ASYNCRL_BUFFER_TOKEN set, only clients holding that token may move the learner version.
With curve=true, connections are encrypted and only clients holding the client keys are
answered: give the server ASYNCRL_BUFFER_CURVE=<the full set> and each client
ASYNCRL_BUFFER_CURVE=<the client set> (both from `python -m buffer keys`).
It restores the newest checkpoint in checkpoint_dir (restore=true), prints one JSON line
{"address", "pid", "restored_from", "groups"} once it serves, and serves until SIGTERM or
SIGINT, after which it writes a last checkpoint and exits 0 (1 if the serving loop failed).
The launcher starts it this way (buffer/process.py) and restarts it if it dies; with
ASYNCRL_BUFFER_PARENT set to the launcher's pid, it stops (and saves) when that process is
gone, so a launcher killed outright leaves no buffer behind.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time

from buffer.curve import ENV, CurveKeys
from buffer.server import BufferConfig, BufferServer
from common.config import ConfigError, load_config


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    if args[:1] == ["keys"]:
        keys = CurveKeys.generate()
        print(f"# the server's environment\n{ENV}={keys.encode()}\n"
              f"# every client's environment\n{ENV}={keys.for_clients().encode()}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s buffer %(levelname)s %(message)s")
    seed = int(os.environ.get("ASYNCRL_BUFFER_SEED", "0"))
    try:
        config = load_config(BufferConfig, [], args)
        server = BufferServer(config, seed=seed, version_token=os.environ.get("ASYNCRL_BUFFER_TOKEN", ""),
                              owns_process=True)
    except ConfigError as e:
        print(f"python -m buffer: {e}", file=sys.stderr)
        key = e.key if e.key.startswith("buffer.") else f"buffer.{e.key}"
        print(json.dumps({"config_error": {"key": key, "message": e.message}}), flush=True)  # for the launcher
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server._stop.set())
    parent = int(os.environ.get("ASYNCRL_BUFFER_PARENT", "0"))
    if parent:   # started by a launcher: stop (saving a checkpoint) if it dies without stopping us
        threading.Thread(target=_stop_when_orphaned, args=(server, parent), name="watch-parent", daemon=True).start()
    print(json.dumps({"address": server.address, "control_port": server.control_port, "pid": os.getpid(),
                      "restored_from": str(server.restored_from) if server.restored_from else None,
                      "groups": server.size}), flush=True)
    server.serve()
    server.close()
    if server._failure is not None:
        print(f"python -m buffer: the server at {server.address} failed: {server._failure}", file=sys.stderr)
        return 1
    return 0


def _stop_when_orphaned(server: BufferServer, parent: int) -> None:
    while os.getppid() == parent and not server._stop.is_set():
        time.sleep(0.5)
    if not server._stop.is_set():
        logging.getLogger(__name__).warning("buffer: the launcher (pid %d) is gone; stopping", parent)
        server._stop.set()


if __name__ == "__main__":
    sys.exit(main())
