"""Objects named by dotted path, as configs and process specs name them."""
from __future__ import annotations

import importlib


def load(path: str):
    """'package.module:attribute' (or 'package.module.attribute') -> the attribute."""
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    return getattr(importlib.import_module(module), attr)
