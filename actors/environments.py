"""Where environment calls run: threads of the actor's process, or a pool of worker processes.

The rollout loop opens one environment per episode (`open`), awaits its `reset` and `step`
calls (`call`, which never raises: it returns (result, error) and enforces
rollout.env_timeout_s), and closes it when the episode ends (`close`).

ThreadEnvironments (rollout.env_workers = 0): the environment lives in the actor's process and
each call runs on a daemon thread. A call past its deadline ends its episode but keeps its
thread until it returns (a thread cannot be stopped); past rollout.max_hung_env_calls at once
the actor fails (EnvironmentsExhausted). A crash of the environment's native code ends the
actor.

ProcessEnvironments (rollout.env_workers = N): N worker processes (spawned) per actor, each
holding the environments of the episodes given to it and running their calls on threads of its
own. Requests and results travel over ZeroMQ (ipc://, pickled); the actor's side never blocks
on a worker. What goes wrong is contained:
  - an exception in the environment ends that episode with the error, as with threads;
  - a call past its deadline ends that episode; its worker takes no new episodes, a
    replacement starts at once, and the old worker is killed as soon as its other episodes
    end (so none of them is lost to another's hang);
  - a worker that dies (a segfault, an OOM kill, os._exit) ends the episodes it held, each
    with an error naming the worker, its pid and exit status; a replacement starts.
Every such event is counted (stats()), and the run goes on. Workers exit when the actor's
process is gone (they watch their parent).
"""
from __future__ import annotations

import asyncio
import itertools
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from actors.engine import settle_from_thread
from common.threads import DaemonThreads

START_FAILURES = 3  # workers dying in a row before they said ready: the environment cannot start


class EnvironmentsExhausted(RuntimeError):
    """Too many environment calls are hung past their deadline; the actor cannot go on."""


def _raised(what: str, e: BaseException) -> str:
    return f"environment {what} raised {type(e).__name__}: {e}"


def _timed_out(what: str, timeout_s: float) -> str:
    return f"environment {what} timed out after {timeout_s}s"


# -- in the actor's process ------------------------------------------------------------------
class ThreadEnvironments:
    def __init__(self, make_env, timeout_s: float, threads: int, max_hung_calls: int):
        self.make_env, self.timeout_s, self.max_hung_calls = make_env, timeout_s, max_hung_calls
        self.env_s = 0.0
        self.hung_env_calls = 0   # hung now (each keeps a thread)
        self._lock = threading.Lock()
        self._threads = DaemonThreads(threads + max_hung_calls, "env")

    def open(self):
        return self.make_env()

    def close(self, env) -> None:
        pass

    async def call(self, env, method: str, *args) -> tuple:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        state = {"abandoned": False}
        fn = getattr(env, method)
        what = f"{type(env).__name__}.{method}"

        def target():
            t, result, error = time.monotonic(), None, None
            try:
                result = fn(*args)
            except Exception as e:  # the environment's own failure ends its episode, not the run
                error = e
            with self._lock:
                self.env_s += time.monotonic() - t
                if state["abandoned"]:
                    self.hung_env_calls -= 1
                    return
            settle_from_thread(loop, future, result, error)

        self._threads.submit(target)
        try:
            result = await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except asyncio.TimeoutError:
            with self._lock:
                state["abandoned"] = True
                self.hung_env_calls += 1
                hung = self.hung_env_calls
            if hung > self.max_hung_calls:
                raise EnvironmentsExhausted(
                    f"{hung} environment calls are hung past rollout.env_timeout_s={self.timeout_s}s "
                    f"(rollout.max_hung_env_calls={self.max_hung_calls}); the environment ({what}) has "
                    f"stopped answering (rollout.env_workers > 0 contains hangs in worker processes)") from None
            return None, _timed_out(what, self.timeout_s)
        except Exception as e:
            return None, _raised(what, e)
        return result, ""

    def stats(self) -> dict:
        return {"env_s": self.env_s, "hung_env_calls": self.hung_env_calls}

    def shutdown(self) -> None:
        pass


# -- in worker processes (envs/worker.py) ----------------------------------------------------
class _Worker:
    def __init__(self, index: int, process, address: str, push):
        self.index, self.process, self.address, self.push = index, process, address, push
        self.lock = threading.Lock()      # the push socket: calls come from any event loop's thread
        self.live: set = set()            # keys of the episodes held here
        self.ready = False                # said ready (its environment imported and built)
        self.retiring = False             # a call hung: no new episodes; ended once live is empty
        self.dead: str | None = None      # why its episodes cannot go on

    @property
    def name(self) -> str:
        return f"environment worker {self.index} (pid {self.process.pid})"


class ProcessEnvironments:
    def __init__(self, env_config, workers: int, timeout_s: float, threads_per_worker: int = 8):
        import zmq

        from envs import registry

        registry.resolve(env_config.name)  # an unknown environment fails here, at start, naming env.name
        self._zmq, self.env_config, self.timeout_s = zmq, env_config, timeout_s
        self.threads_per_worker = threads_per_worker
        self.env_s = 0.0
        self.hung_env_calls = self.worker_crashes = self.workers_replaced = self.episodes_lost = 0
        self.broken: str | None = None    # set when workers cannot start: every call raises it
        self._start_failures = 0
        self._ctx = zmq.Context.instance()
        self._tag = os.path.join(tempfile.gettempdir(), f"asyncrl-env-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self._results_address = f"ipc://{self._tag}-results"
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(self._results_address)
        self._lock = threading.Lock()     # the worker lists, pending calls and counters
        self._pending: dict = {}          # call id -> (worker, loop, future)
        self._ids, self._keys, self._indices = itertools.count(), itertools.count(), itertools.count()
        self._stopping = False
        self.workers = [self._start_worker() for _ in range(workers)]   # serving
        self.draining: list = []          # retiring, still holding episodes
        self._reader = threading.Thread(target=self._read, name="env-results", daemon=True)
        self._reader.start()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Return once every worker has started (imported and built its environment factory);
        raise naming the workers that have not, or why they cannot."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if self.broken:
                    raise EnvironmentsExhausted(self.broken)
                waiting = [w.name for w in self.workers if not w.ready]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise EnvironmentsExhausted(f"{', '.join(waiting)} did not start within {timeout_s}s "
                                            f"(env.name={self.env_config.name!r})")
            time.sleep(0.02)

    # -- episodes ---------------------------------------------------------------------------
    def open(self):
        with self._lock:
            if self.broken:
                raise EnvironmentsExhausted(self.broken)
            worker = min(self.workers, key=lambda w: len(w.live))
            key = next(self._keys)
            worker.live.add(key)
        return worker, key

    def close(self, handle) -> None:
        worker, key = handle
        with self._lock:
            worker.live.discard(key)
            drained = worker in self.draining and not worker.live
            if drained:
                self._end(worker)
        if not drained and worker.dead is None:
            self._send(worker, (-1, key, "close", ()))

    async def call(self, handle, method: str, *args) -> tuple:
        worker, key = handle
        what = f"{self.env_config.name}.{method}"
        if self.broken:
            raise EnvironmentsExhausted(self.broken)
        if worker.dead is not None:
            return None, worker.dead
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        call_id = next(self._ids)
        try:
            data = pickle.dumps((call_id, key, method, args))
        except Exception as e:
            return None, f"the arguments of environment {what} could not be sent to its worker: {type(e).__name__}: {e}"
        with self._lock:
            self._pending[call_id] = (worker, loop, future)
        if not self._send(worker, data):
            with self._lock:
                self._pending.pop(call_id, None)
            return None, f"{worker.name} takes no requests (gone, or its queue is full); environment {what} not called"
        try:
            ok, payload = await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except asyncio.TimeoutError:
            with self._lock:
                self.hung_env_calls += 1
                if worker in self.workers:   # contained: no new episodes there, a new worker serves them
                    worker.retiring = True
                    self.workers.remove(worker)
                    self.draining.append(worker)
                    self._add_worker()
            return None, f"{_timed_out(what, self.timeout_s)}; {worker.name} is replaced"
        finally:
            with self._lock:
                self._pending.pop(call_id, None)   # cancelled (the episode's deadline) or done
        if ok:
            return payload, ""
        if isinstance(payload, str):   # the worker died; payload names it
            return None, payload
        kind, message = payload
        return None, f"environment {what} raised {kind}: {message}"

    # -- the pool (under the lock) ------------------------------------------------------------
    def _start_worker(self) -> _Worker:
        index = next(self._indices)
        address = f"ipc://{self._tag}-w{index}"
        # a fresh interpreter (never a fork of a process that runs engine threads), seeing the
        # modules this process sees
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        process = subprocess.Popen(
            [sys.executable, "-m", "envs.worker", address, self._results_address, str(os.getpid()),
             str(self.threads_per_worker), pickle.dumps(self.env_config).hex()], env=env, stdin=subprocess.DEVNULL)
        push = self._ctx.socket(self._zmq.PUSH)
        push.setsockopt(self._zmq.LINGER, 0)
        push.connect(address)   # requests wait in the socket until the worker binds
        return _Worker(index, process, address, push)

    def _add_worker(self) -> None:
        if not self._stopping and not self.broken:
            self.workers.append(self._start_worker())
            self.workers_replaced += 1

    def _end(self, worker: _Worker) -> None:
        """Kill and forget a worker."""
        for group in (self.workers, self.draining):
            if worker in group:
                group.remove(worker)
        worker.dead = worker.dead or f"{worker.name} was ended"
        if worker.process.poll() is None:
            worker.process.kill()
        try:
            worker.process.wait(5)
        except subprocess.TimeoutExpired:   # stuck in the kernel; it is killed and goes when it can
            pass
        with worker.lock:
            worker.push.close(0)
        try:
            os.unlink(worker.address[len("ipc://"):])
        except OSError:
            pass

    def _died(self, worker: _Worker) -> None:
        """A worker died on its own: its episodes end with an error naming it; it is replaced."""
        code = worker.process.returncode
        status = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        worker.dead = f"{worker.name} died ({status}); the episode's environment was lost with it"
        self.worker_crashes += 1
        self.episodes_lost += len(worker.live)
        for call_id, (w, loop, future) in list(self._pending.items()):
            if w is worker:
                del self._pending[call_id]
                settle_from_thread(loop, future, (False, worker.dead))
        if worker.ready:
            self._start_failures = 0
        else:
            self._start_failures += 1
            if self._start_failures >= START_FAILURES:
                self.broken = (f"{START_FAILURES} environment workers in a row died before they were ready "
                               f"(the last: {status}); env.name={self.env_config.name!r} cannot start in a "
                               f"worker process: its error is above in this actor's log")
        serving = worker in self.workers
        self._end(worker)
        if serving:
            self._add_worker()

    # -- results and liveness: one thread -----------------------------------------------------
    def _read(self) -> None:
        zmq = self._zmq
        while not self._stopping:
            try:
                message = pickle.loads(self._pull.recv(zmq.NOBLOCK)) if self._pull.poll(100) else None
            except zmq.ZMQError:
                if self._stopping:
                    return
                raise
            with self._lock:
                if message is not None and message[0] == "ready":
                    for w in self.workers + self.draining:
                        if w.process.pid == message[1]:
                            w.ready = True
                elif message is not None:
                    call_id, ok, payload, seconds = message
                    self.env_s += seconds
                    entry = self._pending.pop(call_id, None)
                    if entry is not None:
                        settle_from_thread(entry[1], entry[2], (ok, payload))
                for worker in self.workers + self.draining:
                    if worker.process.poll() is not None and not self._stopping:
                        self._died(worker)

    def _send(self, worker: _Worker, message) -> bool:
        data = message if isinstance(message, bytes) else pickle.dumps(message)
        with worker.lock:
            if worker.push.closed:
                return False
            try:
                worker.push.send(data, self._zmq.NOBLOCK)
                return True
            except self._zmq.Again:
                return False

    # -- the rest -----------------------------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            return {"env_s": self.env_s, "hung_env_calls": self.hung_env_calls, "env_workers": len(self.workers),
                    "env_worker_crashes": self.worker_crashes, "env_workers_replaced": self.workers_replaced,
                    "env_episodes_lost": self.episodes_lost, "env_workers_draining": len(self.draining)}

    def pids(self) -> list:
        """The serving workers' pids."""
        with self._lock:
            return [w.process.pid for w in self.workers]

    def shutdown(self) -> None:
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        self._reader.join(2)
        with self._lock:
            for worker in self.workers + self.draining:
                self._end(worker)
        self._pull.close(0)
        try:
            os.unlink(self._results_address[len("ipc://"):])
        except OSError:
            pass
