"""python -m launch RECIPE [--actors N] [--learner-gpus M] [--config NAME] [key=value ...]"""
from __future__ import annotations

import argparse
import importlib
import sys

from common.config import ConfigError

RECIPES = {
    "async_grpo": "actors generate continuously while the learner trains (off-policy, staleness-bounded)",
    "sync_grpo": "the synchronous baseline: generate one batch, train on it, repeat",
}

EPILOG = """\
overrides:
  key=value sets any config key, e.g. trainer.max_steps=20 rollout.group_size=8 model.name=tiny
  (see configs/*.yaml and the dataclasses they override; unknown keys are errors).

examples:
  python -m launch async_grpo                                # the default job: SmolLM2-135M on arithmetic
  python -m launch async_grpo --config tiny --actors 2       # a one-minute smoke run, no download
  python -m launch sync_grpo --config tiny --actors 2        # the same, synchronous, for comparison
  python -m launch async_grpo --actors 4 --learner-gpus 16 model.name=Qwen/Qwen2.5-0.5B-Instruct
  python -m launch export RUN_DIR                            # a checkpoint as a Hugging Face folder
  python -m launch envs                                      # the environments env.name can name
  python -m launch report RUN_DIR [RUN_DIR ...]              # report.html: plots, several runs overlaid
  python -m launch slurm async_grpo --learner-nodes 1 --actor-nodes 2 --gpus-per-node 8   # a Slurm job
"""


def count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch", description="Run an asyncrl recipe.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(p)
    return p


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """RECIPE, --actors, --learner-gpus, --config and key=value (here and in `launch slurm`)."""
    p.add_argument("recipe", choices=sorted(RECIPES), metavar="RECIPE",
                   help="; ".join(f"{name}: {text}" for name, text in RECIPES.items()))
    p.add_argument("--actors", type=count(1), metavar="N",
                   help="actor groups generating rollouts (sets actors.count)")
    p.add_argument("--learner-gpus", type=count(0), metavar="M",
                   help="GPUs for the learner, one rank each; 0 trains on CPU (sets trainer.gpus)")
    p.add_argument("--config", metavar="NAME",
                   help="configs/NAME.yaml (or a path to a YAML file) applied over the recipe's defaults")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied last")


def recipe_overrides(args) -> list:
    """The key=value overrides, with what --actors and --learner-gpus set."""
    overrides = list(args.overrides)
    if args.actors is not None:
        overrides.append(f"actors.count={args.actors}")
    if args.learner_gpus is not None:
        overrides.append(f"trainer.gpus={args.learner_gpus}")
    return overrides


COMMANDS = {"export": "launch.export", "envs": "launch.envs", "report": "launch.report", "slurm": "launch.slurm"}  # commands with arguments of their own


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        try:
            importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
        except ConfigError as e:
            print(f"python -m launch {argv[0]}: error: {e}", file=sys.stderr)
            return 2
        return 0
    args = parser().parse_intermixed_args(argv)
    overrides = recipe_overrides(args)
    from buffer.client import BufferError
    from common.weights import WeightSyncError
    from launch.cluster import PeerError, Terminated, stop_on_sigterm
    from launch.config import build_config
    recipe = importlib.import_module(f"launch.{args.recipe}")
    stop_on_sigterm()   # scancel, kill: stop every part on the way out (again once Ray has started)
    try:
        config = build_config(args.recipe, args.config, overrides, recipe.CONFIG_FILES)
        recipe.main(config)
    except Terminated:
        print("python -m launch: stopped by SIGTERM; the parts were stopped", file=sys.stderr)
        return 143
    except ConfigError as e:
        print(f"python -m launch: error: {e}", file=sys.stderr)
        return 2
    except (PeerError, BufferError, WeightSyncError) as e:
        print(f"python -m launch: run failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
