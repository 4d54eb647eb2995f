"""Ray at the edges: start or join Ray, place the learner ranks and the actors, and wait on
them with deadlines. The parts themselves are plain classes; this module wraps them."""
from __future__ import annotations

import dataclasses
import os
import signal
import time

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.actor import RolloutActor
from common.config import ConfigError
from common.progress import Progress
from common.rendezvous import Rendezvous, RendezvousHost
from common.weights_broadcast import BroadcastChannelSpec
from common.weights_ipc import IpcChannelSpec
from launch.config import Config
from launch.weights import RayWeightChannel, WeightStore
from learner.learner import Learner


class PeerError(RuntimeError):
    """A remote part failed or missed its deadline; the text names it."""


class Terminated(BaseException):
    """SIGTERM arrived: raised where the launcher is, so that every part is stopped on the way
    out (the recipes' finally blocks), as for Ctrl-C."""


def _terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # a second SIGTERM ends it at once
    raise Terminated()


def stop_on_sigterm() -> None:
    """SIGTERM raises Terminated in the main thread. Called again after ray.init, whose own
    handler would otherwise abort the process and leave its parts behind."""
    signal.signal(signal.SIGTERM, _terminated)


def start_ray(config: Config, env: dict | None = None) -> None:
    """Start a local Ray, or join the cluster at run.ray_address / RAY_ADDRESS; `env`: variables
    every part of the job sees (the buffer's CurveZMQ client keys)."""
    address = config.run.ray_address or os.environ.get("RAY_ADDRESS", "")
    runtime_env = {"env_vars": dict(env)} if env else None
    if address:
        reach_head(address, config.run.startup_timeout_s)
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
        stop_on_sigterm()
        config.run.ray_address = address   # the saved config.yaml shows the cluster joined
        # Actors on other nodes must reach the buffer, which lives in this process.
        config.buffer.host = config.buffer.host or ray.util.get_node_ip_address()
        return
    # A local Ray can never place more GPUs than this machine has: say so now, not after a wait.
    a = config.actors
    actor_gpus = a.count * a.gpus_per_group - (1 if config.run.colocate else 0)  # colocated: one GPU shared
    gpus, wanted_gpus = torch.cuda.device_count(), config.trainer.gpus + actor_gpus
    if wanted_gpus > gpus:
        key = "trainer.gpus" if config.trainer.gpus > gpus else "actors.gpus_per_group"
        raise ConfigError(key, f"the run asks for {wanted_gpus} GPU(s) (trainer.gpus={config.trainer.gpus}, "
                          f"actors.count x actors.gpus_per_group={a.count * a.gpus_per_group}"
                          f"{', one shared (run.colocate)' if config.run.colocate else ''}); this machine has {gpus}")
    # A local Ray gets at least as many CPUs as the parts reserve, so a small machine still runs
    # every part (oversubscribed: the parts' torch threads are what really shares the cores).
    wanted = (config.actors.count * config.actors.num_cpus
              + (0 if config.trainer.gpus else config.trainer.world_size * config.trainer.torch_threads) + 1)
    ray.init(num_cpus=max(os.cpu_count() or 1, int(wanted + 0.999)), include_dashboard=False,
             log_to_driver=True, configure_logging=False, runtime_env=runtime_env)
    stop_on_sigterm()


def reach_head(address: str, timeout_s: float) -> None:
    """Wait until the Ray head at host:port accepts connections (ray.init would retry an
    unreachable head for ever); past the deadline, fail naming it."""
    from launch.slurm import wait_for_head
    unreachable = wait_for_head(address, timeout_s)
    if unreachable:
        raise PeerError(f"the Ray head at {address} (run.ray_address or RAY_ADDRESS) is not reachable after "
                        f"{timeout_s:.0f}s: {unreachable}; is Ray started there (ray start --head), and is the port "
                        f"open from this node?")


def get(refs, timeout_s: float, what: str):
    """ray.get with a deadline, waited for in slices of a second so that SIGTERM (Terminated)
    is seen meanwhile: one long ray.get would hold the signal until it returns."""
    pending = refs if isinstance(refs, list) else [refs]
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            left = deadline - time.monotonic()
            ready, _ = ray.wait(pending, num_returns=len(pending), timeout=max(0.0, min(1.0, left)))
            if len(ready) == len(pending):
                return ray.get(refs, timeout=max(1.0, left))
            if left <= 0:
                raise ray.exceptions.GetTimeoutError()
    except ray.exceptions.GetTimeoutError:
        raise PeerError(f"{what} did not answer within {timeout_s:.0f}s") from None
    except ray.exceptions.RayError as e:
        raise PeerError(f"{what} failed: {e}") from None


def check_placeable(bundle: dict, key: str, what: str) -> None:
    """Fail at once, naming `key`, when no live node of the cluster could ever hold `bundle`
    (Ray would otherwise wait for one, here until run.startup_timeout_s)."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if any(all(node.get(r, 0) >= amount for r, amount in bundle.items()) for node in nodes):
        return
    offered = "; ".join(", ".join(f"{r}={v:g}" for r, v in sorted(node.items())
                                  if r in bundle or r in ("CPU", "GPU")) for node in nodes)
    raise ConfigError(key, f"no node of the Ray cluster can hold {what} {bundle}: its nodes offer [{offered}]")


def wait_ready(parts: dict, timeout_s: float, what: str) -> None:
    """Wait until every Ray actor of `parts` ({name: handle}) has started (model loaded, engine
    up), showing progress; past the deadline, fail naming the ones that have not."""
    pending = {handle.__ray_ready__.remote(): name for name, handle in parts.items()}
    deadline = time.monotonic() + timeout_s
    with Progress(what, len(parts)) as progress:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            for ref in done:
                get(ref, 1.0, pending.pop(ref))
                progress.advance()
            if pending and not done and time.monotonic() >= deadline:
                raise PeerError(f"{what}: {', '.join(sorted(pending.values()))} not started within {timeout_s:.0f}s")


def wait_all_ready(config: Config, ranks: list, actors: list) -> None:
    """The learner ranks and the actor groups, started together, ready (see wait_ready)."""
    parts = {**{f"learner rank {i}": r for i, r in enumerate(ranks)}, **{f"actor {i}": a for i, a in enumerate(actors)}}
    wait_ready(parts, config.run.startup_timeout_s, f"starting {len(ranks)} learner rank(s) and "
                                                     f"{len(actors)} actor group(s) ({config.actors.engine} engine)")


def _learner_bundle(config: Config) -> dict:
    """What one learner rank reserves (and one unit of run.learner_resource, if named)."""
    t = config.trainer
    bundle = {"GPU": 1, "CPU": 1} if t.gpus else {"CPU": t.torch_threads}
    if config.run.learner_resource:
        bundle[config.run.learner_resource] = 1
    return bundle


COLOCATED_SHARE = 0.5  # of the shared GPU's Ray resource, for each of learner and actor (memory is split by config)


def place_learners(config: Config) -> tuple:
    """Reserve the learner ranks' resources; returns (placement group, one scheduling strategy
    per rank)."""
    t = config.trainer
    bundle = _learner_bundle(config)
    bundles = [dict(bundle) for _ in range(t.world_size)]
    if config.run.colocate:  # the actor group joins learner rank 0's bundle: the same GPU
        bundles[0]["CPU"] += config.actors.num_cpus
    check_placeable(bundles[0], "trainer.gpus" if t.gpus else "trainer.torch_threads", "a learner rank")
    group = placement_group(bundles, strategy="PACK")
    get(group.ready(), config.run.startup_timeout_s, f"placement of {t.world_size} learner rank(s) {bundle}")
    return group, [PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i) for i in range(t.world_size)]


def start_rendezvous(config: Config, strategy) -> Rendezvous | None:
    """The store where the job's parts meet (common/rendezvous.py): the learner ranks to form
    their group, the weight channel's receivers to find its sender. A Ray actor hosts it on
    learner rank 0's node, for as long as a handle to it lives: keep the one returned (its
    `holder`) for the whole run. None when nothing meets there: one learner rank and weights
    through Ray's object store."""
    if config.trainer.world_size == 1 and config.run.weight_transport not in ("broadcast", "ipc"):
        return None
    holder = ray.remote(RendezvousHost).options(num_cpus=0, scheduling_strategy=strategy) \
        .remote(timeout_s=config.trainer.dist_timeout_s)
    rendezvous = get(holder.rendezvous.remote(), config.run.actor_timeout_s, "the rendezvous store")
    return dataclasses.replace(rendezvous, holder=holder)


def start_weight_channel(config: Config, rendezvous: Rendezvous | None) -> object:
    """The channel spec every part builds its end from (common/weights.py), by
    run.weight_transport: Ray's object store, or a broadcast group or CUDA IPC whose sender
    (learner rank 0) publishes its address at `rendezvous` (start_rendezvous). The spec's
    rendezvous carries no Ray handle: receivers may live in processes outside Ray (a vLLM
    worker)."""
    transport = config.run.weight_transport
    if transport in ("broadcast", "ipc"):
        if rendezvous is None:
            raise ValueError(f"run.weight_transport={transport} needs the job's rendezvous store (start_rendezvous)")
        meet = dataclasses.replace(rendezvous, prefix="weights", holder=None)
        if transport == "ipc":
            return IpcChannelSpec(meet, timeout_s=config.run.weights_timeout_s)
        backend = "nccl" if config.trainer.gpus and config.actors.gpus_per_group else "gloo"
        return BroadcastChannelSpec(meet, receivers=config.actors.count, backend=backend,
                                    timeout_s=config.run.weights_timeout_s)
    store = ray.remote(WeightStore).options(num_cpus=0).remote()
    return RayWeightChannel(store, timeout_s=config.run.weights_timeout_s)


def start_learners(config: Config, model_path: str, buffer_address: str, weights, in_bundle: list,
                   rendezvous: Rendezvous | None, buffer_token: str = "", wait: bool = True) -> list:
    """One Ray actor per learner rank, each in its bundle of the learners' placement group,
    meeting at `rendezvous` (start_rendezvous) when there are several; `buffer_token` lets them
    (alone) move the buffer's version. `wait`: until they have started (else the caller waits,
    with wait_all_ready)."""
    t = config.trainer
    rendezvous = rendezvous if t.world_size > 1 else None
    remote = ray.remote(Learner)
    bundle = _learner_bundle(config)
    gpus = [bundle.get("GPU", 0)] * t.world_size
    if config.run.colocate:
        gpus[0] = COLOCATED_SHARE
    label = {config.run.learner_resource: 1} if config.run.learner_resource else {}
    ranks = [remote.options(num_gpus=gpus[i], num_cpus=bundle["CPU"], resources=label, scheduling_strategy=in_bundle[i])
             .remote(i, model_path, config.model.dtype, t, config.loss, buffer_address, config.buffer.timeout_s,
                     weights, rendezvous, config.run.seed, buffer_token)
             for i in range(t.world_size)]
    if wait:
        wait_ready({f"learner rank {i}": r for i, r in enumerate(ranks)}, config.run.startup_timeout_s,
                   f"starting {t.world_size} learner rank(s)")
    return ranks


def start_actors(config: Config, model_path: str, buffer_address: str, weights, in_bundle: list,
                 wait: bool = True) -> list:
    """One Ray actor per actor group, each on gpus_per_group GPUs of its own (Ray keeps them
    apart from the learner's), or in learner rank 0's bundle when colocated. `wait`: as for
    start_learners."""
    a = config.actors
    remote = ray.remote(RolloutActor)
    label = {config.run.actor_resource: 1} if config.run.actor_resource else {}
    placement = [{"num_gpus": a.gpus_per_group, "resources": label} for _ in range(a.count)]
    if not config.run.colocate or a.count > 1:
        check_placeable({"CPU": a.num_cpus, **({"GPU": a.gpus_per_group} if a.gpus_per_group else {}), **label},
                        "actors.gpus_per_group" if a.gpus_per_group else "actors.num_cpus", "an actor group")
    if config.run.colocate:
        placement[0] = {"num_gpus": COLOCATED_SHARE, "scheduling_strategy": in_bundle[0]}
    # concurrency: run() holds one thread for the whole run; stats, stop and evaluate answer beside it
    actors = [remote.options(num_cpus=a.num_cpus, max_concurrency=4, **placement[i])
              .remote(i, model_path, config.model.dtype, a, config.rollout, config.env, buffer_address,
                      config.buffer.timeout_s, weights, config.run.seed, config.eval)
              for i in range(a.count)]
    if wait:
        wait_ready({f"actor {i}": h for i, h in enumerate(actors)}, config.run.startup_timeout_s,
                   f"starting {a.count} actor group(s) ({a.engine} engine)")
    return actors


def learner_step(ranks: list, actor_runs: dict, timeout_s: float, on_wait=None) -> dict:
    """Run one step on every rank; returns rank 0's metrics. Fails at once, naming the rank or
    actor, when one fails: the other ranks would only report their collective's timeout, later.
    `on_wait` is called about every second while waiting (the buffer's check)."""
    pending = {r.step.remote(): i for i, r in enumerate(ranks)}
    metrics, deadline = {}, time.monotonic() + timeout_s
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        for ref in done:
            rank = pending.pop(ref)
            metrics[rank] = get(ref, 1.0, f"learner rank {rank}")
        check_actors(actor_runs)
        if on_wait is not None:
            on_wait()
        if pending and time.monotonic() > deadline:
            raise PeerError(f"learner step did not finish within {timeout_s:.0f}s "
                            f"(rank(s) {sorted(pending.values())} still running)")
    return metrics[0]


def check_actors(actor_runs: dict) -> None:
    """Raise if any actor's run loop has ended (it only ends on failure or stop)."""
    finished, _ = ray.wait(list(actor_runs), num_returns=len(actor_runs), timeout=0)
    for ref in finished:
        get(ref, 5.0, f"actor {actor_runs[ref]}")
        raise PeerError(f"actor {actor_runs[ref]} stopped generating")


def stop_all(actors: list, actor_runs: dict, ranks: list, group, timeout_s: float) -> None:
    """Stop the actors' loops, let them close what they hold (environment workers, engine,
    connections), and kill them and the learner ranks (whose step may be waiting on a sample:
    nothing of theirs outlives their process); an actor that misses the deadline is killed as
    it is."""
    for a in actors:
        a.stop.remote()
    ray.wait(list(actor_runs), num_returns=len(actor_runs), timeout=timeout_s)
    closing = [a.close.remote() for a in actors]
    ray.wait(closing, num_returns=len(closing), timeout=timeout_s)
    for handle in actors + ranks:
        ray.kill(handle)
    if group is not None:
        remove_placement_group(group)

