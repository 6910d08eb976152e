"""Optional dependencies, imported only by the feature that needs them, with one message that
names the wandapp extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from wandapp.errors import MissingDependencyError

#: import name -> the extra of pyproject.toml that installs it.
EXTRAS = {"peft": "lora", "matplotlib": "demo", "lm_eval": "eval"}


def require(module: str, feature: str) -> ModuleType:
    """``import module``, or MissingDependencyError saying which extra installs it (when the
    module itself is missing; an installed module that fails to import raises its own error)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module:
            raise
        raise MissingDependencyError(
            f'{feature} needs the {module!r} package, which is not installed; run: pip install "wandapp[{EXTRAS[module]}]"'
        ) from None
