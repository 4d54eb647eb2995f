"""Environments that inject faults on purpose, for the end-to-end failure tests."""
import os
import threading
import time

from envs.base import Environment, StepResult, last_reply
from envs.token_match import TokenMatchEnv


class KillsItsActor(TokenMatchEnv):
    """Ends the actor's whole process (as an OOM kill would) at the first step."""

    def step(self, messages):
        os._exit(17)


class Misbehaves(Environment):
    """Does what the policy's reply asks: "hang" (never answers), "crash" (its process exits
    with code 3), "raise", "slow" (answers after 3 s), "pid" (answers with its process id);
    anything else is answered "ok". Two turns, reward 1 a turn."""

    def sample(self, rng):
        return {"id": "m"}

    def reset(self, task):
        self.turns = 0
        return [{"role": "user", "content": "go"}]

    def step(self, messages):
        self.turns += 1
        reply = last_reply(messages)
        if "hang" in reply:
            threading.Event().wait()
        if "crash" in reply:
            os._exit(3)
        if "raise" in reply:
            raise RuntimeError("the board caught fire")
        if "slow" in reply:
            time.sleep(3)
        answer = f"pid {os.getpid()}" if "pid" in reply else "ok"
        return StepResult(observation=[{"role": "user", "content": answer}], reward=1.0, done=self.turns == 2)


class FailsInWorkers(TokenMatchEnv):
    """Imports in the process that names it, but in any other process this module exits at
    import (code 5) while ASYNCRL_FAULT_WORKER_IMPORT holds that first process's pid."""


if os.environ.get("ASYNCRL_FAULT_WORKER_IMPORT", str(os.getpid())) != str(os.getpid()):
    raise SystemExit(5)
