"""An environment worker process (actors/environments.py, ProcessEnvironments): it holds the
environments of the episodes given to it, by episode key, runs each reset or step on a thread
of its own and pushes the result back. It imports only the environment (no torch), and exits
when the process that started it is gone.

Requests (pickled, PULL bound at `requests_address`): (call id, episode key, method, args),
method "reset" (which builds the episode's environment first), "step" or "close".
Results (pickled, PUSH to `results_address`): ("ready", pid) once, then per call
(call id, True, result, seconds) or (call id, False, (exception type, message), seconds).
"""
from __future__ import annotations

import os
import pickle
import signal
import threading
import time

from common.threads import DaemonThreads


def main(argv: list) -> None:
    """python -m envs.worker REQUESTS RESULTS PARENT_PID THREADS ENV_CONFIG_PICKLE_HEX"""
    requests, results, parent, threads, config = argv
    worker_main(pickle.loads(bytes.fromhex(config)), requests, results, int(parent), int(threads))


def worker_main(env_config, requests_address: str, results_address: str, parent_pid: int, threads: int) -> None:
    import zmq

    from envs import registry

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the actor, which ends its workers
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.bind(requests_address)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(results_address)
    push_lock = threading.Lock()
    make_env = registry.factory(env_config)
    envs: dict = {}
    pool = DaemonThreads(threads, "env")

    def send(message) -> None:
        with push_lock:
            push.send(pickle.dumps(message))

    def run(call_id: int, key: int, method: str, args: tuple) -> None:
        t = time.monotonic()
        try:
            if method == "reset":
                envs[key] = make_env()
            result = getattr(envs[key], method)(*args)
        except Exception as e:  # the environment's own failure: the actor ends that episode with it
            send((call_id, False, (type(e).__name__, str(e)), time.monotonic() - t))
            return
        try:
            data = pickle.dumps((call_id, True, result, time.monotonic() - t))
        except Exception as e:
            send((call_id, False, ("TypeError", f"its result could not be sent back from the worker: "
                                                f"{type(e).__name__}: {e}"), time.monotonic() - t))
            return
        with push_lock:
            push.send(data)

    def watch_parent() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        for address in (requests_address, results_address):   # the orphan tidies the socket files
            try:
                os.unlink(address[len("ipc://"):])
            except OSError:
                pass
        os._exit(0)

    threading.Thread(target=watch_parent, name="watch-parent", daemon=True).start()
    send(("ready", os.getpid()))
    while True:
        call_id, key, method, args = pickle.loads(pull.recv())
        if method == "close":
            envs.pop(key, None)
        else:
            pool.submit(lambda c=call_id, k=key, m=method, a=args: run(c, k, m, a))


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
