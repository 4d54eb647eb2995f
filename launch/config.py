"""The whole config tree of a run: every part's own config, under the part's name."""
from __future__ import annotations

import importlib.util

import time
from dataclasses import dataclass, field
from pathlib import Path

from actors.actor import ActorsConfig
from actors.evaluation import EvalConfig
from actors.rollout import RolloutConfig
from buffer.server import BufferConfig
from common.config import check, load_config
from common.wandb_run import MODES as WANDB_MODES
from envs.registry import EnvConfig
from launch.models import ModelConfig
from learner.learner import TrainerConfig
from learner.loss import LossConfig

WEIGHT_TRANSPORTS = ("auto", "object_store", "broadcast", "ipc")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class RunConfig:
    dir: str = ""
    """Output folder; empty means runs/<recipe>-<time>."""
    seed: int = 0
    ray_address: str = ""
    """Ray cluster to join; empty means $RAY_ADDRESS if set, else a local Ray."""
    weights_timeout_s: float = 300.0
    """Deadline of each weight publication or fetch."""
    actor_timeout_s: float = 60.0
    """Deadline of each control call to an actor (stats, stop)."""
    step_timeout_s: float = 1800.0
    """Deadline of one learner step, seen from the launcher."""
    weight_transport: str = "auto"
    """How weights reach the actors: object_store (Ray's), broadcast (a gloo group on CPU,
    NCCL when learner and actors are on GPUs), ipc (CUDA IPC, learner and actors sharing a
    GPU: run.colocate), or auto: ipc when colocated, broadcast when both are on GPUs, else
    object_store. The saved config.yaml shows the one chosen."""
    resume: bool = False
    """Continue the run in run.dir from its newest checkpoint (trainer.checkpoint_every
    writes them): the learner's weights, optimizer, schedule, step, version and RNG. The
    buffer starts empty and the actors start again from those weights."""
    colocate: bool = False
    """Put the learner (trainer.gpus=1) and the one actor group (actors.gpus_per_group=1) on
    the same GPU, its memory split by actors.gpu_memory_utilization."""
    startup_timeout_s: float = 600.0
    """Deadline for placing and starting the learner ranks, and for starting the actors."""
    learner_resource: str = ""
    """A custom Ray resource each learner rank takes one unit of, so that only the nodes that
    offer it host the learner (slurm/ offers asyncrl_learner on a heterogeneous job's component
    0); empty: any node."""
    actor_resource: str = ""
    """The same for each actor group (slurm/: asyncrl_actor, on component 1). A colocated actor
    group shares learner rank 0's bundle and takes none."""
    wandb: str = "offline"
    """Weights & Biases: offline (written to run.dir/wandb, `wandb sync` uploads it later; no
    account needed), online, or disabled. Every metrics row, the config and the report's plots."""
    wandb_project: str = "asyncrl"
    wandb_name: str = ""
    """The wandb run's name; empty: the run folder's name."""
    wandb_tags: list[str] = field(default_factory=list)

    def validate(self):
        for key in ("weights_timeout_s", "actor_timeout_s", "step_timeout_s", "startup_timeout_s"):
            check(getattr(self, key) > 0, key, "must be > 0")
        check(self.wandb in WANDB_MODES, "wandb", f"must be one of {WANDB_MODES}, got {self.wandb!r}")
        check(self.wandb == "disabled" or importlib.util.find_spec("wandb") is not None, "wandb",
              f"{self.wandb} needs the wandb package, which is not installed here "
              "(pip install wandb, or run.wandb=disabled)")
        check(self.weight_transport in WEIGHT_TRANSPORTS, "weight_transport",
              f"must be one of {WEIGHT_TRANSPORTS}, got {self.weight_transport!r}")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    actors: ActorsConfig = field(default_factory=ActorsConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self):
        """Checks across parts, run after each part's own (keys are full paths here)."""
        t = self.trainer
        check(self.run.step_timeout_s > t.sample_timeout_s, "run.step_timeout_s",
              f"must be larger than trainer.sample_timeout_s ({t.sample_timeout_s:g}s), got "
              f"{self.run.step_timeout_s:g}s: a step may wait that long for its batch")
        if self.run.colocate:
            for key, value in (("trainer.gpus", t.gpus), ("actors.count", self.actors.count),
                               ("actors.gpus_per_group", self.actors.gpus_per_group)):
                check(value == 1, key, f"must be 1 with run.colocate (one learner GPU shared by one actor "
                                       f"group), got {value}")
        check(self.run.weight_transport != "ipc" or self.run.colocate, "run.weight_transport",
              "ipc needs the learner and the actors on one GPU (run.colocate=true)")
        check(self.actors.max_inflight_episodes >= self.rollout.group_size, "actors.max_inflight_episodes",
              f"must be >= rollout.group_size={self.rollout.group_size} (a group's episodes run together), "
              f"got {self.actors.max_inflight_episodes}")
        if t.publish_lag:   # synchronous actors first: sync_grpo also sets max_staleness to 0
            check(not self.actors.groups_per_version, "trainer.publish_lag",
                  "needs asynchronous actors (actors.groups_per_version=0, async_grpo): synchronous ones wait "
                  "for each version, which a lagged learner sends late")
            check(self.buffer.table.max_staleness >= t.publish_lag, "buffer.table.max_staleness",
                  f"must be >= trainer.publish_lag={t.publish_lag} (every group is that many versions old), "
                  f"got {self.buffer.table.max_staleness}")
            check(not self.run.resume, "trainer.publish_lag",
                  "a lagged run keeps its last versions in memory only, so it cannot resume (run.resume=true)")
        # A learner rank samples its share of the batch at once: a table that can never hold
        # that many (with the queue limiter, one the actors can never fill) waits for ever.
        share, table = t.batch_groups // t.world_size, self.buffer.table
        check(table.max_size >= share, "buffer.table.max_size",
              f"must be >= {share}, got {table.max_size}: each learner rank samples trainer.batch_groups / "
              f"{t.world_size} rank(s) = {share} groups at once")


def build_config(recipe: str, name: str | None = None, overrides: list = (), recipe_files: list = ()) -> Config:
    """Defaults, then the recipe's configs/<file>.yaml, then configs/<name>.yaml (or a path),
    then key=value overrides."""
    files = [CONFIG_DIR / f"{f}.yaml" for f in recipe_files]
    if name:
        path = Path(name)
        files.append(path if path.suffix in (".yaml", ".yml") else CONFIG_DIR / f"{name}.yaml")
    config = load_config(Config, files, list(overrides))
    if not config.run.dir:
        config.run.dir = f"runs/{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    if config.run.weight_transport == "auto":
        config.run.weight_transport = ("ipc" if config.run.colocate else
                                       "broadcast" if config.trainer.gpus and config.actors.gpus_per_group else
                                       "object_store")
    if config.actors.engine_process == "auto":
        config.actors.engine_process = ("own" if config.actors.engine == "vllm"
                                        and config.run.weight_transport != "object_store" else "actor")
    check(config.actors.engine_process != "own" or config.run.weight_transport != "object_store",
          "actors.engine_process", "own needs run.weight_transport broadcast or ipc: the object store's "
          "receiver needs the actor's own Ray connection")
    return config
