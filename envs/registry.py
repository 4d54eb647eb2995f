"""Environment registry: a name, a dotted path or an installed entry point -> a class.

Built-ins are listed here explicitly. Users plug their own in by config without touching
asyncrl: `env.name=mypkg.games:Chess` (or `mypkg.games.Chess`), or by publishing an entry
point in the group `asyncrl.envs` and naming it.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from importlib.metadata import entry_points

from common import dotted
from common.config import ConfigError
from envs.base import Environment

BUILTIN = {
    "arithmetic": "envs.arithmetic:ArithmeticEnv",
    "math": "envs.math:MathEnv",
    "math_tools": "envs.tools:MathToolsEnv",
    "token_match": "envs.token_match:TokenMatchEnv",
    "wordle": "envs.wordle:WordleEnv",
}
ENTRY_POINT_GROUP = "asyncrl.envs"


@dataclass
class EnvConfig:
    name: str = "arithmetic"
    """A built-in name, an entry point in group asyncrl.envs, or a dotted path module:Class."""
    args: dict = field(default_factory=dict)
    """Keyword arguments of the environment's constructor."""


def resolve(name: str) -> type[Environment]:
    if name in BUILTIN:
        return dotted.load(BUILTIN[name])
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    try:
        cls = found[0].load() if found else dotted.load(name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError("env.name", f"{name!r} is neither a built-in ({', '.join(BUILTIN)}), "
                          f"an entry point in {ENTRY_POINT_GROUP}, nor an importable module:Class ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise ConfigError("env.name", f"{name!r} is {cls!r}, not a subclass of envs.base.Environment")
    return cls


def available() -> list:
    """(name, where, one line) of every environment a name finds: the built-ins, then the
    entry points of group asyncrl.envs (one that fails to load says why)."""
    found = []
    for name, path in BUILTIN.items():
        found.append((name, path, _summary(dotted.load(path))))
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            found.append((ep.name, ep.value, _summary(ep.load())))
        except Exception as e:  # a broken plug-in is listed with its error, not hidden
            found.append((ep.name, ep.value, f"(fails to load: {type(e).__name__}: {e})"))
    return found


def _summary(cls) -> str:
    doc = (cls.__doc__ or "").strip() or (importlib.import_module(cls.__module__).__doc__ or "").strip()
    first = doc.split("\n\n")[0].replace("\n", " ") if doc else ""
    return re.split(r"(?<=\.)\s", first, maxsplit=1)[0]  # its first sentence


def factory(config: EnvConfig):
    """A callable that builds a new environment of `config`; the name is resolved once (the
    rollout loop builds one environment per episode)."""
    cls, args = resolve(config.name), dict(config.args)

    def build() -> Environment:
        try:
            return cls(**args)
        except (TypeError, ValueError) as e:
            raise ConfigError("env.args", f"{cls.__name__} rejected its arguments {args}: {e}") from None
    return build


def make(config: EnvConfig) -> Environment:
    return factory(config)()
