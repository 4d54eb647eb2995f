"""The buffer server as a child process of the launcher (`python -m buffer`), restarted from
its newest checkpoint when it dies.

The launcher's process holds no table. A restarted server binds the same address, so clients
find it again by retrying; they re-send the acknowledged groups its checkpoint lacks
(buffer/client.py), so a restart loses nothing acknowledged.
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import select
import subprocess
import sys
import time
from pathlib import Path

from buffer import curve
from buffer.client import BufferError
from buffer.curve import CurveKeys
from buffer.server import BufferConfig
from common.config import ConfigError


def overrides(config: BufferConfig, prefix: str = "") -> list:
    """key=value arguments that rebuild `config` (for python -m buffer)."""
    out = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out += overrides(value, f"{prefix}{f.name}.")
        elif isinstance(value, dict) and all(dataclasses.is_dataclass(v) for v in value.values()):
            for name, item in value.items():   # named tables
                out += overrides(item, f"{prefix}{f.name}.{name}.")
        else:
            out.append(f"{prefix}{f.name}={json.dumps(value) if isinstance(value, str) else value}")
    return out


class BufferProcess:
    def __init__(self, config: BufferConfig, log_path, seed: int = 0, startup_timeout_s: float = 60.0,
                 curve_keys: CurveKeys | None = None):
        """`curve_keys`: the full CurveZMQ set for a server with buffer.curve=true (handed over
        in its environment, never on its command line)."""
        self.config = dataclasses.replace(config)
        self.curve_keys = curve_keys
        self.version_token = secrets.token_hex(16)  # the learner's alone: nobody else moves the version
        self.log_path, self.seed, self.startup_timeout_s = Path(log_path), seed, startup_timeout_s
        self.process: subprocess.Popen | None = None
        self.address = ""
        self.restarts = 0
        self.info: dict = {}

    def start(self) -> "BufferProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "a")
        env = dict(os.environ, ASYNCRL_BUFFER_SEED=str(self.seed), PYTHONUNBUFFERED="1",
                   ASYNCRL_BUFFER_TOKEN=self.version_token, ASYNCRL_BUFFER_PARENT=str(os.getpid()))
        if self.curve_keys is not None:
            env[curve.ENV] = self.curve_keys.encode()
        self.process = subprocess.Popen([sys.executable, "-m", "buffer", *overrides(self.config)],
                                        stdout=subprocess.PIPE, stderr=log, env=env, text=True)
        log.close()
        deadline, line = time.monotonic() + self.startup_timeout_s, ""
        while not line:
            left = deadline - time.monotonic()
            if self.process.poll() is not None:
                line = self.process.stdout.readline()  # what it said before it exited, if anything
                if not line:
                    raise BufferError(f"the buffer process exited with code {self.process.poll()} before serving; "
                                      f"its log: {self.log_path}: {self._tail()}")
            elif left <= 0:
                self.process.kill()
                raise BufferError(f"the buffer process did not start within {self.startup_timeout_s:.0f}s; "
                                  f"its log: {self.log_path}: {self._tail()}")
            elif select.select([self.process.stdout], [], [], min(left, 0.5))[0]:
                line = self.process.stdout.readline()
        self.info = json.loads(line)
        if "config_error" in self.info:  # a setting it refused: fails at start, naming the key
            self.process.wait(10)
            raise ConfigError(self.info["config_error"]["key"], self.info["config_error"]["message"])
        self.address = self.info["address"]
        # A restart must come back where the clients look: the same host and ports.
        self.config.port = int(self.address.rsplit(":", 1)[1])
        self.config.control_port = int(self.info["control_port"])
        return self

    def check(self) -> None:
        """Restart the server if it died (up to buffer.max_restarts times, from its newest
        checkpoint); raise BufferError naming its exit code and log when no restart is left."""
        code = self.process.poll() if self.process is not None else None
        if code is None:
            return
        if self.restarts >= self.config.max_restarts:
            raise BufferError(f"the buffer process (pid {self.process.pid}) exited with code {code} and "
                              f"buffer.max_restarts={self.config.max_restarts} restarts are used up; "
                              f"its log: {self.log_path}: {self._tail()}")
        self.restarts += 1
        print(f"asyncrl: the buffer process exited with code {code}; restarting it "
              f"({self.restarts}/{self.config.max_restarts}) from its newest checkpoint", file=sys.stderr, flush=True)
        self.config.restore = True
        self.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (the server saves a last checkpoint and exits), then kill past the deadline."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise BufferError(f"the buffer process did not stop within {timeout_s:.0f}s; killed") from None
        if code != 0:
            raise BufferError(f"the buffer process exited with code {code} while stopping; "
                              f"its log: {self.log_path}: {self._tail()}")

    def _tail(self) -> str:
        try:
            return self.log_path.read_text()[-800:]
        except OSError:
            return ""
