"""python -m launch export RUN_DIR [--checkpoint PATH] [--out DIR]

Writes a run's checkpoint (the newest under RUN_DIR/checkpoints unless --checkpoint names one)
as a Hugging Face folder: safetensors, config and tokenizer, loadable by transformers and vLLM.
The folder goes to --out, or RUN_DIR/export/step-N.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common.config import ConfigError, load_config
from launch import models
from launch.config import Config
from learner import checkpoint


def export(run_dir: Path, checkpoint_path: Path | None = None, out: Path | None = None) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError("RUN_DIR", f"{str(run_dir)!r} holds no config.yaml: not a run folder")
    path = Path(checkpoint_path) if checkpoint_path else checkpoint.latest(run_dir / "checkpoints")
    if path is None or not path.is_dir():
        raise ConfigError("--checkpoint", f"no checkpoint {'at ' + str(path) if path else 'under ' + str(run_dir / 'checkpoints')}")
    config = load_config(Config, [run_dir / "config.yaml"])
    model_path = models.resolve(config.model, run_dir, config.run.seed)  # the architecture and tokenizer
    out = Path(out) if out else run_dir / "export" / path.name
    checkpoint.export(path, model_path, out)
    return out


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m launch export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint folder (default: the run's newest)")
    parser.add_argument("--out", type=Path, help="where to write (default: RUN_DIR/export/step-N)")
    args = parser.parse_args(argv)
    out = export(args.run_dir, args.checkpoint, args.out)
    print(f"asyncrl: exported {out}", flush=True)
    return out
