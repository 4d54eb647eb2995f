"""python -m launch envs: the environments `env.name` can name (built-ins and the entry points
of group asyncrl.envs), one line each."""
from __future__ import annotations

import argparse

from envs import registry


def main(argv=None) -> None:
    argparse.ArgumentParser(prog="python -m launch envs", description=__doc__).parse_args(argv)
    rows = registry.available()
    width = max(len(name) for name, _, _ in rows)
    for name, where, line in rows:
        print(f"{name:<{width}}  {line}  [{where}]")
