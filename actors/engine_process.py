"""An engine in a process of its own, behind the Engine interface.

Why: vLLM's AsyncLLM decodes the engine core's outputs on an event loop of the process that
made it, and at hundreds of sequences that loop takes a whole core (docs/benchmarks.md, the
actor group on an H100). A rollout loop in the same process takes its CPU from that loop
through the GIL, and the engine's throughput drops by as much. Here the engine (its
frontend, for vLLM) lives in a child process (`python -m actors.engine_process`, a fresh
interpreter), and the actor's process keeps only the rollout loop and this client.

Wire: ZeroMQ over an ipc:// socket in a private folder, msgpack. The client (DEALER) sends
lists of [op, rid, payload]; the engine process (ROUTER) answers with lists of [rid, ok,
payload]. Each message carries whatever was waiting when it was sent: per message, ZeroMQ and
the event loop cost more than the entries (measured: 260 us of the engine process's CPU per
request with one message each way, on the loop that vLLM's frontend keeps busy). Ops: generate
(one Sample per request), abort (an awaiting task was cancelled: the request is cancelled
there too), call (version, check, stats, start_weight_updates, close; `run` runs a function
of the engine there, for benches and tests). Nothing waits forever: the engine process must
say it is ready within startup_timeout_s, every call has call_timeout_s, a generate waits as
long as its caller (the rollout loop's own deadline cancels it), and the client's I/O thread
watches the process: if it dies, every pending request fails at once, naming its pid and exit
code. The engine process watches its parent and exits with it. Its stderr (and that of what
it starts, such as vLLM's engine core) passes through this process's stderr, and its last
lines are kept: a failed start or a death quotes them, since the root cause is often only
there ("Engine core initialization failed. See root cause above."). vLLM logs to stdout
unless VLLM_LOGGING_STREAM says otherwise, so the engine process gets it set to stderr (where
the user has not set it): a worker's "WorkerProc failed to start" and its cause then pass
here too. The root cause comes first and the tracebacks of every process it failed through
after it, more lines than a tail holds, so the exceptions the first tracebacks end in are
kept apart and quoted as well.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from actors.engine import Engine, Sample, settle_from_thread
from common.dotted import load

CALLS = ("version", "check", "stats", "start_weight_updates", "close", "run")
CHECK_EVERY_S = 0.5
STDERR_LINES = 30   # of the engine process's stderr, quoted when it fails
STDERR_EXCEPTIONS = 6   # the first exceptions its tracebacks end in ("ValueError: ..."), quoted too
# what leads a line from another process or rank: colour codes, "(EngineCore pid=8) ", "[rank0]: "
_LINE_PREFIX = re.compile(r"^(?:\x1b\[[0-9;]*m\s?|\([^()]*pid=\d+[^()]*\)\s?|\[rank\d+\]:\s?)*")


class EngineProcessError(RuntimeError):
    """The engine process failed, died or did not answer; the text names it."""


def _error_of(payload: dict) -> BaseException:
    """An error raised in the engine process, as its own type where both sides know it."""
    from common.weights import WeightSyncError
    from actors.engine import WeightUpdateError

    known = {"WeightSyncError": WeightSyncError, "WeightUpdateError": WeightUpdateError,
             "TimeoutError": TimeoutError, "ValueError": ValueError, "NotImplementedError": NotImplementedError}
    return known.get(payload["type"], EngineProcessError)(f"{payload['message']} (in the engine process)")


class EngineProcess(Engine):
    """Client: `build` ('module:callable') called with `kwargs` in the engine process makes the engine."""

    def __init__(self, build: str, kwargs: dict, startup_timeout_s: float = 900.0, call_timeout_s: float = 120.0,
                 name: str = "engine"):
        import zmq

        self.name, self.call_timeout_s = name, call_timeout_s
        self._zmq = zmq
        self._folder = tempfile.mkdtemp(prefix="asyncrl-engine-")   # 0700: only this user may connect
        self.address = f"ipc://{os.path.join(self._folder, 'socket')}"
        self._ids = itertools.count(1)
        self._pending: dict = {}            # rid -> (loop or None, future)
        self._outbox_lock = threading.Lock()
        self._died: str | None = None
        self._next_check = 0.0
        ctx = zmq.Context.instance()
        self._wake_address = f"inproc://engine-wake-{id(self)}"
        self._wake_in = ctx.socket(zmq.PULL)
        self._wake_in.bind(self._wake_address)
        self._wake_out = ctx.socket(zmq.PUSH)
        self._wake_out.connect(self._wake_address)
        self._outbox: list = []
        self.proc = subprocess.Popen([sys.executable, "-m", "actors.engine_process"], stdin=subprocess.PIPE,
                                     stderr=subprocess.PIPE,
                                     env={"VLLM_LOGGING_STREAM": "ext://sys.stderr",   # see the docstring
                                          **os.environ, "ASYNCRL_ENGINE_PARENT": str(os.getpid()),
                                          # what this process imports, the engine process imports too
                                          "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
        self._stderr_tail: collections.deque = collections.deque(maxlen=STDERR_LINES)
        self._stderr_exceptions: list = []
        self._in_traceback: set = set()      # the prefixes (processes) whose traceback is being printed
        self._stderr_thread = threading.Thread(target=self._pass_stderr, name=f"{name}-stderr", daemon=True)
        self._stderr_thread.start()
        self.proc.stdin.write(pickle.dumps({"build": build, "kwargs": kwargs, "address": self.address}))
        self.proc.stdin.close()
        self._socket = ctx.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(self.address)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._io, name=f"{name}-io", daemon=True)
        self._thread.start()
        try:
            self._call("version", timeout_s=startup_timeout_s, what="starting")   # answered once it is built
        except Exception as e:
            self.close()
            raise _with_text(e, self.stderr_tail()) from e
        except BaseException:
            self.close()
            raise

    # -- the Engine interface ---------------------------------------------------------------
    @property
    def version(self) -> int:
        return self._call("version")

    async def generate(self, prompt: list, max_new_tokens: int, temperature: float) -> Sample:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        rid = self._submit("generate", {"prompt": [int(t) for t in prompt], "max_new_tokens": int(max_new_tokens),
                                        "temperature": float(temperature)}, loop, future)
        try:
            tokens, logprobs, versions, finish = await future
        except asyncio.CancelledError:
            if self._died is None:
                self._post(["abort", rid, None])
            raise
        return Sample(tokens, logprobs, versions, finish)

    def start_weight_updates(self, receiver):
        return self._call("start_weight_updates", pickle.dumps(receiver), timeout_s=max(self.call_timeout_s, 300.0))

    def check(self) -> None:
        """Raises if the engine process died (known at once) or its engine failed (asked at
        most every CHECK_EVERY_S: the actor's loop checks between groups, and each ask is a
        round trip to a process whose loop is vLLM's busy frontend)."""
        if self._died:
            raise EngineProcessError(self._died)
        if time.monotonic() >= self._next_check:
            self._call("check")
            self._next_check = time.monotonic() + CHECK_EVERY_S

    def stats(self) -> dict:
        return self._call("stats")

    def run(self, function: str, *args, timeout_s: float | None = None):
        """`function` ('module:callable') called as function(engine, *args) in the engine process
        (a coroutine function on its event loop, any other on a thread); its result, which must
        travel as msgpack. For benches and tests (vLLM alone, in the engine's own process)."""
        return self._call("run", pickle.dumps((function, args)), timeout_s=timeout_s)

    def close(self) -> None:
        if self.proc.poll() is None and self._died is None and self._thread.is_alive():
            try:
                self._call("close", timeout_s=60.0)
            except Exception:
                pass
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(5.0)
        if not self._died:   # a request made after this would wait for an answer that never comes
            self._fail_all(f"the {self.name} process was closed")
        shutil.rmtree(self._folder, ignore_errors=True)   # the socket file
        try:
            self.proc.wait(60.0)   # the engine closes after answering close
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10.0)

    def stderr_tail(self) -> str:
        """The engine process's last lines of stderr, quoted for an error ('' if none yet)."""
        if self._stderr_thread.is_alive() and self.proc.poll() is not None:
            self._stderr_thread.join(2.0)   # a process that died: its last lines are still in the pipe
        lines, named = list(self._stderr_tail), [e for e in self._stderr_exceptions if e not in self._stderr_tail]
        first = (f"\nthe first exceptions its stderr named:\n" + "".join(named)) if named else ""
        return first + (f"\nthe last {len(lines)} lines of its stderr:\n" + "".join(lines) if lines else "")

    def _pass_stderr(self) -> None:
        """The engine process's stderr, line by line, to this process's own, its tail kept."""
        out = getattr(sys.stderr, "buffer", None)
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode(errors="replace")
            self._stderr_tail.append(line)
            self._note_exception(line)
            try:
                if out is not None:
                    out.write(raw)
                    out.flush()
                else:
                    sys.stderr.write(raw.decode(errors="replace"))
            except (OSError, ValueError):
                pass   # this process's stderr is gone: the tail is still kept
        self.proc.stderr.close()

    def _note_exception(self, line: str) -> None:
        """Keep the line a traceback ends in (its exception), the first STDERR_EXCEPTIONS of
        them: the first unindented line after "Traceback (most recent call last):" from the
        same process (the same prefix), whatever the exception's name; log lines are not kept."""
        prefix = _LINE_PREFIX.match(line).group()
        body = line[len(prefix):].rstrip()
        if body.startswith("Traceback (most recent call last)"):
            self._in_traceback.add(prefix)
        elif prefix in self._in_traceback and body and not body[0].isspace():
            self._in_traceback.discard(prefix)
            if len(self._stderr_exceptions) < STDERR_EXCEPTIONS and line not in self._stderr_exceptions:
                self._stderr_exceptions.append(line)

    # -- plumbing -----------------------------------------------------------------------------
    def _submit(self, op: str, payload, loop, future) -> int:
        if self._died:
            raise EngineProcessError(self._died)
        rid = next(self._ids)
        self._pending[rid] = (loop, future)
        if self._died:   # it died between the check and the entry: nobody would answer
            self._pending.pop(rid, None)
            raise EngineProcessError(self._died)
        self._post([op, rid, payload])
        return rid

    def _post(self, message: list) -> None:
        with self._outbox_lock:   # callers come from any thread; only the I/O thread touches the socket
            self._outbox.append(message)
            try:
                self._wake_out.send(b"", self._zmq.NOBLOCK)
            except self._zmq.Again:   # wakes are queued already: the I/O thread will take the outbox
                pass

    def _call(self, op: str, payload=None, timeout_s: float | None = None, what: str | None = None):
        future = concurrent.futures.Future()
        self._submit("call", [op, payload], None, future)
        timeout_s = self.call_timeout_s if timeout_s is None else timeout_s
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            raise EngineProcessError(f"the {self.name} process (pid {self.proc.pid}) did not answer "
                                     f"{what or op} within {timeout_s:g}s") from None

    def _io(self) -> None:
        import msgpack

        zmq = self._zmq
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_in, zmq.POLLIN)
        next_check, unsent = 0.0, False
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(20 if unsent else 200))
                if self._wake_in in events:
                    while True:
                        try:
                            self._wake_in.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                if self._wake_in in events or unsent:
                    with self._outbox_lock:
                        outbox, self._outbox = self._outbox, []
                    if outbox:   # one message of every entry waiting
                        try:   # never blocks: an engine process not reading must not stop the death check below
                            self._socket.send(msgpack.packb(outbox, use_bin_type=True), zmq.NOBLOCK)
                            unsent = False
                        except zmq.Again:   # its queue is full: these go first at the next turn
                            with self._outbox_lock:
                                self._outbox[:0] = outbox
                            unsent = True
                if self._socket in events:
                    while True:
                        try:
                            frame = self._socket.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        for reply in msgpack.unpackb(frame, raw=False):
                            self._settle(*reply)
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + 0.5
                    code = self.proc.poll()
                    if code is not None:
                        self._fail_all(f"the {self.name} process (pid {self.proc.pid}) exited with code {code}"
                                       + self.stderr_tail())
                        return
        except Exception as e:   # the client can no longer reach the engine: say so to every waiter
            self._fail_all(f"the {self.name} process's client failed: {type(e).__name__}: {e}")
        finally:
            for socket in (self._socket, self._wake_in, self._wake_out):
                socket.close(0)

    def _settle(self, rid: int, ok: bool, payload) -> None:
        entry = self._pending.pop(rid, None)
        if entry is None:
            return   # an aborted request's late answer
        loop, future = entry
        result, error = (payload, None) if ok else (None, _error_of(payload))
        if loop is None:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
        else:
            settle_from_thread(loop, future, result, error)

    def _fail_all(self, reason: str) -> None:
        self._died = reason
        pending, self._pending = self._pending, {}
        for loop, future in pending.values():
            if loop is None:
                future.set_exception(EngineProcessError(reason))
            else:
                settle_from_thread(loop, future, error=EngineProcessError(reason))


def _with_text(error: Exception, text: str) -> Exception:
    """The same error with `text` added to its message, where its type allows; else itself."""
    if not text:
        return error
    try:
        return type(error)(f"{error}{text}")
    except Exception:
        return error


# -- the engine process ---------------------------------------------------------------------
class _Server:
    """Serves `engine` (or, when its build failed, answers every request with the build's
    error, so the client's first call reports it). It runs on the engine's own event loop
    where the engine has one (vLLM's AsyncLLM: the loop its frontend already keeps busy; a
    second loop on a thread of its own would take that frontend's CPU through the GIL and hand
    every request across threads twice), else on the main thread's."""

    def __init__(self, address: str, engine=None, failed: BaseException | None = None):
        self.address, self.engine, self.failed = address, engine, failed
        self.tasks: dict = {}       # rid -> task of a generate under way
        self.closing = False

    async def serve(self) -> None:
        import msgpack
        import zmq
        import zmq.asyncio

        # made here: an asyncio socket belongs to the loop that uses it. Reads drain through a
        # plain socket over the same one (no future each); waits and sends stay asyncio's, which
        # re-checks the socket after each send (ZeroMQ's descriptor signals edges, and a send
        # may take the edge of input that arrived meanwhile)
        self.socket = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 1000)   # the reply to close still leaves
        self.socket.setsockopt(zmq.SNDHWM, 0)      # a reply is never dropped for a full queue
        self.socket.bind(self.address)
        self.plain = zmq.Socket.shadow(self.socket.underlying)
        self.outbox: dict = {}                      # identity -> replies not yet sent
        parent = int(os.environ.get("ASYNCRL_ENGINE_PARENT", "0"))
        try:
            while not self.closing:
                if parent and os.getppid() != parent:   # the actor died: nobody waits for this engine
                    return
                if not await self.socket.poll(1000):
                    continue
                while True:
                    try:
                        identity, frame = self.plain.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    for op, rid, payload in msgpack.unpackb(frame, raw=False):
                        self._take(identity, op, rid, payload)
        finally:
            for task in list(self.tasks.values()):
                task.cancel()
            self._flush()
            self.socket.close()

    def _take(self, identity: bytes, op: str, rid: int, payload) -> None:
        if op == "generate":
            self.tasks[rid] = asyncio.ensure_future(self._generate(identity, rid, payload))
        elif op == "abort":
            task = self.tasks.pop(rid, None)
            if task is not None:
                task.cancel()
        elif op == "call":
            asyncio.ensure_future(self._call(identity, rid, *payload))

    def _reply(self, identity: bytes, rid: int, ok: bool, payload) -> None:
        """Queue a reply; those queued in one turn of the loop leave as one message."""
        if not self.outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self.outbox.setdefault(identity, []).append([rid, ok, payload])

    def _flush(self) -> None:
        import msgpack

        outbox, self.outbox = self.outbox, {}
        for identity, replies in outbox.items():   # not awaited: with no high-water mark it never waits
            self.socket.send_multipart([identity, msgpack.packb(replies, use_bin_type=True)])

    @staticmethod
    def _error(e: BaseException) -> dict:
        return {"type": type(e).__name__, "message": f"{type(e).__name__}: {e}"}

    def _ready(self):
        if self.failed is not None:
            raise self.failed
        return self.engine

    async def _generate(self, identity: bytes, rid: int, request: dict) -> None:
        try:
            s = await self._ready().generate(request["prompt"], request["max_new_tokens"], request["temperature"])
            reply = (True, [list(s.tokens), [float(x) for x in s.logprobs], list(s.versions), s.finish_reason])
        except asyncio.CancelledError:
            return   # aborted: the client no longer waits
        except Exception as e:
            reply = (False, self._error(e))
        finally:
            self.tasks.pop(rid, None)
        self._reply(identity, rid, *reply)

    async def _call(self, identity: bytes, rid: int, op: str, payload) -> None:
        try:
            if op not in CALLS:
                raise ValueError(f"unknown engine call {op!r}; one of {CALLS}")
            if op == "close":   # answered first; the engine closes once this loop has stopped serving
                for task in list(self.tasks.values()):
                    task.cancel()
                self.closing = True
                self._reply(identity, rid, True, None)
                return
            engine = self._ready()
            if op == "version":
                result = engine.version
            elif op == "check":
                result = engine.check()
            elif op == "stats":
                result = {**engine.stats(), "pending_requests": len(self.tasks)}
            elif op == "start_weight_updates":   # may wait for the engine (vLLM: a collective_rpc)
                result = await asyncio.to_thread(engine.start_weight_updates, pickle.loads(payload))
            else:   # run: a coroutine function on this loop, any other on a thread of its own
                function, args = pickle.loads(payload)
                function = load(function)
                result = await (function(engine, *args) if asyncio.iscoroutinefunction(function)
                                else asyncio.to_thread(function, engine, *args))
            self._reply(identity, rid, True, result)
        except Exception as e:
            self._reply(identity, rid, False, self._error(e))


def main() -> None:
    spec = pickle.loads(sys.stdin.buffer.read())
    engine = failed = None
    try:   # the client's requests wait in its socket meanwhile (it connects before this binds)
        engine = load(spec["build"])(**spec["kwargs"])
    except Exception as e:
        failed = e
    server = _Server(spec["address"], engine, failed)
    loop = getattr(engine, "loop", None)
    try:
        if isinstance(loop, asyncio.AbstractEventLoop) and loop.is_running():
            asyncio.run_coroutine_threadsafe(server.serve(), loop).result()
        else:
            asyncio.run(server.serve())
    finally:
        if engine is not None:
            engine.close()


if __name__ == "__main__":
    main()
