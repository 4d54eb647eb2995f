"""async_grpo: actors generate continuously into the buffer; the learner trains on what it
holds, publishing weights every `trainer.sync_every` steps. Reads top to bottom."""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from functools import partial
from pathlib import Path

import ray

from actors import activity
from buffer import curve
from buffer.client import BufferClient, BufferTimeout
from buffer.curve import CurveKeys
from buffer.process import BufferProcess
from buffer.server import check_bindable
from common.config import ConfigError, to_yaml
from common.metrics import MetricsLogger
from common import wandb_run
from envs import registry
from launch import cluster, models, report
from launch.cluster import PeerError
from launch.config import Config
from launch.evaluate import PeriodicEvaluation
from learner import checkpoint

log = logging.getLogger(__name__)

CONFIG_FILES = ["async_grpo"]  # configs/*.yaml applied over the dataclass defaults, before --config
STOP_WANDB_S = 30.0   # a failed or stopped run waits this long at most for wandb to write its run
# the actors' environment counters, summed into every step's metrics as env/<name> (cumulative)
ENV_COUNTERS = ("episodes_timed_out", "hung_env_calls", "env_workers", "env_worker_crashes", "env_workers_replaced",
                "env_episodes_lost")


def main(config: Config) -> Path:
    run_dir = Path(config.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(config))
    registry.make(config.env)  # a bad environment name or argument fails here, before anything starts
    model_path = models.resolve(config.model, run_dir, config.run.seed)
    resume_from = checkpoint.latest(run_dir / "checkpoints") if config.run.resume else None
    if config.run.resume and resume_from is None:
        raise ConfigError("run.resume", f"no checkpoint under {run_dir / 'checkpoints'} to resume from "
                          "(trainer.checkpoint_every saves them)")

    check_bindable(config.buffer)   # a port in use fails here, not after Ray and wandb have started
    # CurveZMQ for the buffer (buffer.curve): a fresh key set for this job, in the environment
    curve_keys = CurveKeys.generate() if config.buffer.curve else None
    client_keys = curve_keys.for_clients() if curve_keys else None
    cluster.start_ray(config, env={curve.ENV: client_keys.encode()} if client_keys else None)
    buffer = buffer_stats = tracker = None
    actors, actor_runs, ranks, group = [], {}, [], None
    try:
        tracker = wandb_run.start(config.run.wandb, run_dir, config, config.run.wandb_project, config.run.wandb_name,
                                  config.run.wandb_tags, config.run.startup_timeout_s)
        # The buffer runs as a process of its own, checkpointing into the run folder; it is
        # restored only when the run is resumed, and restarted from there if it dies.
        buffer_config = dataclasses.replace(config.buffer, restore=config.run.resume,
                                            checkpoint_dir=config.buffer.checkpoint_dir or str(run_dir / "buffer"))
        buffer = BufferProcess(buffer_config, run_dir / "buffer.log", seed=config.run.seed,
                               startup_timeout_s=config.run.startup_timeout_s, curve_keys=curve_keys).start()
        if buffer.info.get("restored_from"):
            print(f"asyncrl: the buffer resumed with {buffer.info['groups']} groups from "
                  f"{buffer.info['restored_from']}", flush=True)
        config.buffer.host, config.buffer.port = buffer.address.removeprefix("tcp://").rsplit(":", 1)
        config.buffer.port = int(config.buffer.port)
        (run_dir / "config.yaml").write_text(to_yaml(config))   # with the addresses actually used
        buffer_stats = BufferClient(buffer.address, timeout_s=config.buffer.timeout_s, curve_keys=client_keys)
        group, in_bundle = cluster.place_learners(config)
        rendezvous = cluster.start_rendezvous(config, in_bundle[0])   # held to the end: it hosts the store
        weights = cluster.start_weight_channel(config, rendezvous)
        # Learner and actors load their models at the same time, except on one shared GPU, where
        # the engine must find the memory the learner has taken when it sizes its cache.
        together = not config.run.colocate
        ranks = cluster.start_learners(config, model_path, buffer.address, weights, in_bundle, rendezvous,
                                       buffer.version_token, wait=not together)
        actors = cluster.start_actors(config, model_path, buffer.address, weights, in_bundle, wait=not together)
        if together:
            cluster.wait_all_ready(config, ranks, actors)
        first_step = 0
        if resume_from is not None:  # the learner publishes what it resumed with; the actors follow
            first_step = cluster.get([r.restore.remote(str(resume_from)) for r in ranks],
                                     config.run.startup_timeout_s, f"learner restore from {resume_from}")[0]["step"]
            print(f"asyncrl: resumed from {resume_from} at step {first_step}", flush=True)
        actor_runs = {a.run.remote(): i for i, a in enumerate(actors)}
        train(config, run_dir, ranks, actors, actor_runs, buffer, buffer_stats, first_step, tracker)
        if config.trainer.export_final:
            cluster.get([r.export.remote(str(run_dir / "final")) for r in ranks], config.run.step_timeout_s,
                        "learner export")
    finally:
        failure = shut_down(
            ("actors and learner ranks",
             partial(cluster.stop_all, actors, actor_runs, ranks, group, config.run.actor_timeout_s)),
            ("buffer client", buffer_stats.close if buffer_stats else None),
            ("buffer server", buffer.stop if buffer else None),
            ("Ray", ray.shutdown),
            # a failed run's wandb run ends here (a finished one's after its report, below)
            ("wandb", partial(tracker.finish, (), STOP_WANDB_S)
             if tracker is not None and sys.exc_info()[0] is not None else None))
    if failure is not None:  # reached only by a run that succeeded: no error of the run is hidden
        raise failure
    print(f"asyncrl: run finished; metrics in {run_dir / 'metrics.jsonl'}", flush=True)
    images = []
    try:
        path = report.write([run_dir])
        images = sorted(path.parent.glob("*.png"))
        print(f"asyncrl: report in {path}", flush=True)
    except Exception as e:  # the run itself succeeded; say why its report is missing
        log.error("asyncrl: could not write the run's report: %s: %s", type(e).__name__, e)
    if tracker is not None:
        tracker.finish(images)
        print(f"asyncrl: wandb ({config.run.wandb}) in {tracker.folder}", flush=True)
    return run_dir


def shut_down(*steps) -> Exception | None:
    """Take every (name, step) in order, even after one fails (a step of None is skipped).
    Failures are logged, never raised, so they cannot hide the error that ended the run;
    returns the first, for the caller to raise if the run itself succeeded."""
    first = None
    for name, step in steps:
        try:
            if step is not None:
                step()
        except Exception as e:
            log.error("asyncrl: stopping the %s failed: %s: %s", name, type(e).__name__, e)
            first = first or e
    return first


def actor_time(actor_stats: list, before: dict) -> dict:
    """Where the actors' time went since the last step (actors/activity.py): the share of
    each kind, averaged over the actor groups and, per group, as a list; and the seconds that
    generation stood still while new weights were swapped in."""
    per_actor = [activity.shares(before.get(s["actor_id"], {}).get("activity_s", {}), s["activity_s"])
                 for s in actor_stats]
    metrics = {}
    for kind in activity.SHARES:
        values = [share.get(kind, 0.0) for share in per_actor]
        metrics[f"actor/time/{kind}"] = sum(values) / len(values)
        metrics[f"actor/time/{kind}_by_actor"] = values
    swap_s = [s.get("weight_swap_s", 0.0) - before.get(s["actor_id"], {}).get("weight_swap_s", 0.0)
              for s in actor_stats]
    metrics["actor/weight_swap_s"] = sum(swap_s) / len(swap_s)
    # the share of prompt tokens vLLM's prefix cache served (engines that count them); the
    # cache is salted by weight version, so a swap starts it afresh
    prompt, cached = ([s[key] - before.get(s["actor_id"], {}).get(key, 0) for s in actor_stats if key in s]
                      for key in ("prompt_tokens", "prompt_tokens_cached"))
    if sum(prompt) > 0:
        metrics["actor/prefix_cache_hit"] = sum(cached) / sum(prompt)
    return metrics


def ask_buffer(buffer: BufferProcess, call, deadline_s: float, slice_s: float = 2.0):
    """call(timeout_s=...) to the buffer in short slices, checking its process between them: the
    launcher is what restarts a dead buffer, so a call that waited out its whole deadline on one
    would leave nobody to restart it (a run stalled for minutes after a buffer was killed)."""
    deadline = time.monotonic() + deadline_s
    while True:
        buffer.check()   # restarts a dead buffer process, or fails the run naming its log
        try:
            return call(timeout_s=slice_s)
        except BufferTimeout:
            if time.monotonic() >= deadline:
                raise


def train(config: Config, run_dir: Path, ranks, actors, actor_runs, buffer: BufferProcess, buffer_stats,
          first_step: int = 0, tracker=None) -> None:
    t = config.trainer
    logger = MetricsLogger(run_dir, t.max_steps, sinks=[tracker] if tracker is not None else [])
    tokens_before, time_before = 0, time.monotonic()
    actors_before: dict = {}   # actor id -> its stats at the last step, for the time shares since
    held_out = PeriodicEvaluation(config.eval, actors[0], logger, t.max_steps) if config.eval.every else None
    if held_out is not None:  # the weights the run starts from (the initial ones, or a checkpoint's)
        held_out.request(first_step, version=0)
    try:
        for step in range(first_step + 1, t.max_steps + 1):
            buffer.check()  # a dead buffer process is restarted (or fails the run, naming its log)
            try:
                metrics = cluster.learner_step(ranks, actor_runs, config.run.step_timeout_s, on_wait=buffer.check)
            except PeerError:
                buffer.check()  # a learner that failed waiting on a dead buffer: name the buffer's cause
                raise
            actor_stats = cluster.get([a.stats.remote() for a in actors], config.run.actor_timeout_s, "actor stats")
            tokens, now = sum(s["generated_tokens"] for s in actor_stats), time.monotonic()
            table = ask_buffer(buffer, buffer_stats.stats, config.buffer.timeout_s)
            metrics.update({
                "buffer/size": table["size"], "buffer/inserts": table["inserts"],
                "buffer/dropped_stale": table["dropped_stale"], "buffer/evicted": table["evicted"],
                # so far in the run: staleness -> groups handed to the learner, and dropped
                "buffer/staleness_histogram": table["staleness_histogram"],
                "buffer/dropped_staleness_histogram": table["dropped_staleness_histogram"],
                "actor/tokens_per_s": (tokens - tokens_before) / max(now - time_before, 1e-9),
                "actor/versions": [s["version"] for s in actor_stats],
                "actor/flat_groups_dropped": sum(s["flat_groups_dropped"] for s in actor_stats),
                # groups in which no episode generated a token (every reset failed, say): made again
                "actor/groups_unusable": sum(s["groups_unusable"] for s in actor_stats),
                **{f"env/{key}": sum(s.get(key, 0) for s in actor_stats) for key in ENV_COUNTERS},
            })
            metrics.update(actor_time(actor_stats, actors_before))
            for s in actor_stats:   # GPU telemetry of each actor group (none on CPU)
                metrics.update(s.get("telemetry", {}))
            tokens_before, time_before = tokens, now
            actors_before = {s["actor_id"]: s for s in actor_stats}
            logger.log(metrics)
            if held_out is not None and step == t.max_steps:
                if t.publish_lag:   # score the weights the learner made, not the lagged ones the actors have
                    cluster.get([r.publish_unlagged.remote() for r in ranks], config.run.step_timeout_s,
                                "the final weights past trainer.publish_lag")
                held_out.finish(step, metrics["weights/version"])
            elif held_out is not None:
                held_out.poll()
                if held_out.due(step):   # the version the actors can have (behind by trainer.publish_lag)
                    held_out.request(step, metrics["weights/published"])
            if t.checkpoint_every and (step % t.checkpoint_every == 0 or step == t.max_steps):
                cluster.get([r.checkpoint.remote(str(run_dir / "checkpoints")) for r in ranks],
                            config.run.step_timeout_s, f"learner checkpoint at step {step}")
                # the buffer beside it: a resumed run finds both
                ask_buffer(buffer, buffer_stats.checkpoint, config.buffer.timeout_s)
    finally:
        logger.close()
