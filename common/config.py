"""Config loading: dataclass defaults, then YAML files, then `key=value` overrides.

Defaults live in dataclasses next to the code that uses them; YAML only overrides them.
Every error names the key (and the file it came from), and is raised before anything starts.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key is unknown, mistyped or out of range; `key` is its dotted path."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"config key {key!r}: {message}" if key else message)


def check(condition: bool, key: str, message: str) -> None:
    """Raise ConfigError(key, message) unless condition holds. Keys are relative to the
    dataclass whose `validate()` calls this; `load_config` prefixes the path."""
    if not condition:
        raise ConfigError(key, message)


def _merge(base, data, source: str):
    try:
        return OmegaConf.merge(base, data)
    except OmegaConfBaseException as e:
        reason = str(e.msg).splitlines()[0] if getattr(e, "msg", None) else str(e)
        raise ConfigError(str(e.full_key or ""), f"{reason} (from {source})") from None


def load_config(schema: type[T], yaml_paths: list[Path] = (), overrides: list[str] = ()) -> T:
    """Build `schema` from its defaults, the YAML files in order, then `key=value` overrides."""
    merged = OmegaConf.structured(schema)
    for path in yaml_paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("", f"config file {str(path)!r} does not exist")
        try:
            data = OmegaConf.load(path)
        except Exception as e:  # YAML syntax errors come in several types
            raise ConfigError("", f"config file {str(path)!r} is not valid YAML: {e}") from None
        merged = _merge(merged, data, str(path))
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ConfigError(key, f"override {item!r} is not of the form key=value")
        merged = _merge(merged, OmegaConf.from_dotlist([item]), f"override {item!r}")
    try:
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(str(e.full_key or ""), str(e.msg).splitlines()[0]) from None
    validate(config)
    return config


def validate(config: Any, prefix: str = "") -> None:
    """Call `validate()` on every nested dataclass, naming failures by their full key. A float
    that is nan or inf is refused first, everywhere: no deadline, rate or bound means that."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(prefix + f.name, f"must be a finite number, got {value}")
        if dataclasses.is_dataclass(value):
            validate(value, f"{prefix}{f.name}.")
        elif isinstance(value, dict):   # a map of named parts (buffer.tables)
            for name, item in value.items():
                if dataclasses.is_dataclass(item):
                    validate(item, f"{prefix}{f.name}.{name}.")
    if hasattr(config, "validate"):
        try:
            config.validate()
        except ConfigError as e:
            raise ConfigError(prefix + e.key, e.message) from None


def to_yaml(config: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))
