"""Weights & Biases for a run (run.wandb = offline | online | disabled): every row of
metrics.jsonl as it is written, the resolved config, and the report's plots at the end.
metrics.jsonl stays the source of truth; offline (the default) needs no account and writes
<run.dir>/wandb/offline-run-*/, which `wandb sync` uploads later.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from pathlib import Path

log = logging.getLogger(__name__)
MODES = ("offline", "online", "disabled")


class WandbRun:
    """A started wandb run; `log(row)` for each metrics row, `finish(images)` once at the end
    (it stops wandb's service for this process: one run per process, as a job is). A
    failure to log is logged, never raised: it must not stop the training it records.

    wandb's `log` talks to its service process and has no deadline, so rows go through a
    queue of QUEUE_ROWS to a thread of their own: a service that stops answering never holds
    the launcher's loop (which keeps every other deadline of the job); once the queue is full,
    rows are dropped for wandb with an error logged (metrics.jsonl still has them)."""
    QUEUE_ROWS = 1000

    def __init__(self, mode: str, run_dir: Path, config, project: str, name: str, tags: list,
                 timeout_s: float):
        import wandb

        self._wandb = wandb
        self.run = wandb.init(mode=mode, dir=str(run_dir), project=project, name=name or Path(run_dir).name,
                              tags=list(tags) or None, config=_plain(config), reinit="finish_previous",
                              settings=wandb.Settings(init_timeout=timeout_s, console="off"))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")   # every chart against the learner step
        self.folder = Path(self.run.dir).parent   # <run.dir>/wandb/<offline-run-...>
        self.dropped = 0
        self._rows: queue.Queue = queue.Queue(self.QUEUE_ROWS)
        self._logger = threading.Thread(target=self._log_rows, name="wandb-log", daemon=True)
        self._logger.start()

    def log(self, row: dict) -> None:
        """Queue the row's numbers for wandb; never waits."""
        try:
            self._rows.put_nowait({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        except queue.Full:
            self.dropped += 1
            if self.dropped % self.QUEUE_ROWS == 1:
                log.error("asyncrl: wandb has not taken the last %d rows (its service is not answering); "
                          "%d row(s) dropped for wandb so far, metrics.jsonl keeps them", self.QUEUE_ROWS, self.dropped)

    def _log_rows(self) -> None:
        while (row := self._rows.get()) is not None:
            try:
                self.run.log(row)
            except Exception as e:
                log.error("asyncrl: wandb could not log a row: %s: %s", type(e).__name__, e)

    def finish(self, images: list = (), timeout_s: float = 60.0) -> bool:
        """Log the images, finish the run and wait for wandb's service to write it all, for at
        most timeout_s: a stop must not wait on wandb for ever.
        False, with the reason logged, if it failed or is still going (it goes on in a daemon
        thread, which ends with the process)."""
        error = []

        def finish():
            try:
                self._rows.put(None)   # the rows queued before it are logged first
                self._logger.join()
                if images:
                    self.run.log({f"report/{Path(p).stem}": self._wandb.Image(str(p)) for p in images})
                self.run.finish()
                # finish() can return before wandb's service has flushed and closed the run's
                # file (seen on a loaded CI machine: the file held only its header); teardown
                # waits for the service to exit, so the folder is complete when this returns
                self._wandb.teardown()
            except Exception as e:
                error.append(f"{type(e).__name__}: {e}")
        worker = threading.Thread(target=finish, name="wandb-finish", daemon=True)
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            log.error("asyncrl: wandb did not finish within %.0fs; its run folder %s may be incomplete",
                      timeout_s, self.folder)
            return False
        if error:
            log.error("asyncrl: wandb could not finish: %s", error[0])
        return not error


def start(mode: str, run_dir: Path, config, project: str = "asyncrl", name: str = "", tags=(),
          timeout_s: float = 120.0) -> WandbRun | None:
    """The run's wandb run, or None when mode is disabled."""
    if mode == "disabled":
        return None
    return WandbRun(mode, run_dir, config, project, name, tags, timeout_s)


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
