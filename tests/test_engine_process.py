"""An engine in a process of its own answers as the same engine in the actor's process, and
every way it can fail ends the waits on it in time, naming it."""
import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from actors.engine_process import EngineProcess, EngineProcessError
from actors.engines.hf import HFEngine
from common.rendezvous import RendezvousHost
from common.weights_broadcast import BroadcastChannelSpec
from tests.conftest import generate

PROMPTS = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]


def hf_kwargs(model_path, stop_token_ids=()) -> dict:   # no stop token: a request runs its whole length
    return dict(model_path=model_path, stop_token_ids=list(stop_token_ids), pad_token_id=0, seed=0)


@pytest.fixture(scope="module")
def remote(tiny_model_path):
    engine = EngineProcess("actors.engines.hf:HFEngine", hf_kwargs(tiny_model_path), startup_timeout_s=120)
    yield engine
    engine.close()


def test_an_engine_in_its_own_process_answers_as_in_the_actors_process(remote, tiny_model_path):
    local = HFEngine(**hf_kwargs(tiny_model_path))
    try:
        for temperature in (0.0, 1.0):   # one request at a time: the same draws in both
            ours = [generate(remote, [p], max_new_tokens=6, temperature=temperature)[0] for p in PROMPTS]
            theirs = [generate(local, [p], max_new_tokens=6, temperature=temperature)[0] for p in PROMPTS]
            assert [(s.tokens, s.versions, s.finish_reason) for s in ours] == \
                [(s.tokens, s.versions, s.finish_reason) for s in theirs]
            np.testing.assert_allclose(sum((s.logprobs for s in ours), []), sum((s.logprobs for s in theirs), []),
                                       atol=1e-6)
    finally:
        local.close()
    assert remote.version == 0 and remote.stats()["pending_requests"] == 0
    remote.check()


def test_requests_from_several_event_loops_and_threads_all_come_back(remote):
    results = []

    def one_loop(seed):
        rng = np.random.default_rng(seed)
        prompts = [rng.integers(3, 19, int(rng.integers(1, 6))).tolist() for _ in range(8)]
        results.append(len(generate(remote, prompts, max_new_tokens=4, temperature=1.0)))

    threads = [threading.Thread(target=one_loop, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [8, 8, 8]


def test_a_request_nobody_waits_for_is_cancelled_in_the_engine_process(remote):
    async def abandon():
        # 500 tokens (the tiny model's 512 positions): longer than the moment it takes to see
        # the request under way and cancel it (a fixed 0.3 s wait once saw 200 tokens finish first)
        task = asyncio.ensure_future(remote.generate([3, 4], 500, 1.0))
        deadline = time.monotonic() + 10
        while not (await asyncio.to_thread(remote.stats))["pending_requests"] and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(abandon())
    deadline = time.monotonic() + 10
    while remote.stats()["pending_requests"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert remote.stats()["pending_requests"] == 0
    assert len(generate(remote, [[3]], max_new_tokens=2, temperature=1.0)[0].tokens) >= 1   # still serving


def test_a_killed_engine_process_fails_every_wait_on_it_in_time_naming_it(tiny_model_path):
    engine = EngineProcess("actors.engines.hf:HFEngine", hf_kwargs(tiny_model_path), startup_timeout_s=120)

    async def wait_then_kill():
        task = asyncio.ensure_future(engine.generate([3, 4], 100000, 1.0))
        await asyncio.sleep(0.5)
        os.kill(engine.proc.pid, signal.SIGKILL)
        t = time.monotonic()
        with pytest.raises(EngineProcessError, match=rf"pid {engine.proc.pid}\) exited with code -9"):
            await asyncio.wait_for(task, 10)
        return time.monotonic() - t
    assert asyncio.run(wait_then_kill()) < 5
    with pytest.raises(EngineProcessError, match="exited"):
        engine.check()
    with pytest.raises(EngineProcessError, match="exited"):
        generate(engine, [[3]], max_new_tokens=2, temperature=1.0)
    engine.close()


def test_an_engine_that_cannot_be_built_fails_the_start_with_the_cause(tmp_path):
    with pytest.raises(EngineProcessError, match="in the engine process"):
        EngineProcess("actors.engines.hf:HFEngine", hf_kwargs(str(tmp_path / "no-model")), startup_timeout_s=120)


def engine_whose_helper_fails(**_):
    """As vLLM's engine start fails: a helper process it started prints the cause to stderr and
    dies, and the error raised here only says to look above."""
    subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('helper: CUDA out of memory, "
                    "tried to allocate 12.0 GiB\\n'); sys.exit(3)"])
    raise RuntimeError("Engine core initialization failed. See root cause above.")


def test_a_failed_start_quotes_the_root_cause_that_only_its_stderr_has(capfd):
    with pytest.raises(EngineProcessError) as info:
        EngineProcess("tests.test_engine_process:engine_whose_helper_fails", {}, startup_timeout_s=60)
    text = str(info.value)
    assert "See root cause above" in text and "helper: CUDA out of memory, tried to allocate 12.0 GiB" in text
    assert "helper: CUDA out of memory" in capfd.readouterr().err   # and it still reached this process's stderr


def engine_whose_worker_logs_its_cause_and_fails_through_two_processes(**_):
    """vLLM's shape of a failed start: a worker logs its exception where VLLM_LOGGING_STREAM
    says (vLLM's default: stdout), then the processes it failed through print tracebacks longer
    than the kept tail, and the error raised here says only to look above."""
    stream = {"ext://sys.stdout": sys.stdout, "ext://sys.stderr": sys.stderr}[os.environ.get("VLLM_LOGGING_STREAM",
                                                                                             "ext://sys.stdout")]
    print("(Worker pid=7) WARNING retrying the download after ConnectionError: timed out", file=stream)   # no cause
    print("(Worker pid=7) ERROR WorkerProc failed to start.\n(Worker pid=7) Traceback (most recent call last):\n"
          "(Worker pid=7)   File \"worker.py\", line 1, in init\n(Worker pid=7) ValueError: Free memory on device "
          "(10.2/79.1 GiB) on startup is less than desired GPU memory utilization (0.15, 11.9 GiB)",
          file=stream, flush=True)
    for _ in range(2):
        print("(EngineCore pid=8) Traceback (most recent call last):", file=sys.stderr)
        for i in range(25):
            print(f"(EngineCore pid=8)   File \"core.py\", line {i}, in __init__", file=sys.stderr)
        print("(EngineCore pid=8) Exception: WorkerProc initialization failed due to an exception in a background "
              "process. See stack trace for root cause.", file=sys.stderr, flush=True)
    raise RuntimeError("Engine core initialization failed. See root cause above.")


def test_a_failed_start_quotes_the_first_exception_however_long_the_tracebacks_after_it():
    with pytest.raises(EngineProcessError) as info:
        EngineProcess("tests.test_engine_process:engine_whose_worker_logs_its_cause_and_fails_through_two_processes",
                      {}, startup_timeout_s=60)
    text = str(info.value)
    named = text[text.index("the first exceptions its stderr named"):text.index("the last")]
    assert "ValueError: Free memory on device (10.2/79.1 GiB)" in named.splitlines()[1]
    assert "ConnectionError" not in text   # a log line naming an exception is not one a traceback ended in
    assert "WorkerProc initialization failed" not in named   # the tail quotes it: not twice
    assert "Exception: WorkerProc initialization failed" in text[text.index("the last"):]
    assert "RuntimeError: Engine core initialization failed" in text


def test_weights_reach_an_engine_process_over_the_broadcast_channel(tiny_model_path):
    host = RendezvousHost("127.0.0.1")   # where the engine process's receiver finds the sender
    spec = BroadcastChannelSpec(host.rendezvous("weights"), receivers=1, timeout_s=60.0)
    engine = EngineProcess("actors.engines.hf:HFEngine", hf_kwargs(tiny_model_path), startup_timeout_s=120)
    try:
        engine.start_weight_updates(spec.receiver(0))
        model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
        zeros = {n: torch.zeros_like(p) for n, p in model.named_parameters()}   # a uniform policy
        sender = spec.sender()
        sender.send(1, zeros)
        deadline = time.monotonic() + 60
        while engine.version < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        sample = generate(engine, [[3, 4]], max_new_tokens=4, temperature=1.0)[0]
        assert engine.version == 1 and set(sample.versions) == {1}
        np.testing.assert_allclose(sample.logprobs, [-np.log(model.config.vocab_size)] * len(sample.tokens), atol=1e-5)
        assert engine.stats()["weight_swaps"] == 1
    finally:
        engine.close()


def engine_facts(engine, extra):
    """Runs in the engine process (EngineProcess.run)."""
    return {"pid": os.getpid(), "class": type(engine).__name__, "extra": extra}


def test_a_function_runs_beside_the_engine_in_its_process(remote):
    facts = remote.run("tests.test_engine_process:engine_facts", [1, 2])
    assert facts == {"pid": remote.proc.pid, "class": "HFEngine", "extra": [1, 2]}
    with pytest.raises(EngineProcessError, match="in the engine process"):
        remote.run("tests.test_engine_process:no_such_function")


def test_a_closed_engine_process_refuses_requests_at_once(tiny_model_path):
    engine = EngineProcess("actors.engines.hf:HFEngine", hf_kwargs(tiny_model_path), startup_timeout_s=120)
    engine.close()
    assert engine.proc.poll() == 0   # it stopped its engine and exited cleanly
    with pytest.raises(EngineProcessError, match="was closed"):
        generate(engine, [[3]], max_new_tokens=2, temperature=1.0)


class LoopedHFEngine(HFEngine):
    """The HF engine on an event loop of its own, in a thread it owns, as the vLLM engine keeps
    AsyncLLM: the engine process then serves on that loop."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="engine-loop", daemon=True)
        self._thread.start()

    async def generate(self, prompt, max_new_tokens, temperature):
        if asyncio.get_running_loop() is self.loop:
            return await super().generate(prompt, max_new_tokens, temperature)
        future = asyncio.run_coroutine_threadsafe(super().generate(prompt, max_new_tokens, temperature), self.loop)
        return await asyncio.wrap_future(future)

    def close(self):
        super().close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


async def serving_loop(engine):
    """Runs in the engine process, on the loop that serves requests."""
    return {"on_the_engines_loop": asyncio.get_running_loop() is engine.loop,
            "thread": threading.current_thread().name}


def test_an_engine_with_its_own_event_loop_is_served_on_that_loop_and_closes_cleanly(tiny_model_path):
    engine = EngineProcess("tests.test_engine_process:LoopedHFEngine", hf_kwargs(tiny_model_path),
                           startup_timeout_s=120)
    try:
        assert engine.run("tests.test_engine_process:serving_loop") == {"on_the_engines_loop": True,
                                                                        "thread": "engine-loop"}
        local = HFEngine(**hf_kwargs(tiny_model_path))
        try:
            ours = [generate(engine, [p], max_new_tokens=6, temperature=0.0)[0].tokens for p in PROMPTS]
            assert ours == [generate(local, [p], max_new_tokens=6, temperature=0.0)[0].tokens for p in PROMPTS]
        finally:
            local.close()
        assert engine.stats()["pending_requests"] == 0
    finally:
        engine.close()
    assert engine.proc.poll() == 0   # the engine closed after the loop stopped serving, and the process exited
