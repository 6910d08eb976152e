"""The torch the compiled core was built against, and a clear ImportError under another one.

The extension links the libtorch inside one torch release. Under another release the dynamic
loader refuses it with an undefined-symbol message, or (worse) loads it against a changed ABI.
``load_core`` turns both into an ImportError that names the two versions and how to rebuild.
"""

from __future__ import annotations

import importlib.util
import os
import re
from types import ModuleType

import torch

#: Written into the shared library by src/lib.rs, readable without loading it.
_MARKER = re.compile(rb"wandapp-built-for-torch=([0-9A-Za-z.]+);")
#: The torch releases wandapp builds for (build_backend/torch_build.py's MANIFESTS; a test keeps them equal).
SUPPORTED = ("2.11", "2.13", "2.14", "2.15")
#: Set to 1 to import a core built for another torch anyway (at your own risk).
OVERRIDE = "WANDAPP_ALLOW_TORCH_MISMATCH"


def installed_torch() -> str:
    """The installed torch's version without its local part ("2.13.0", not "2.13.0+cu130")."""
    return torch.__version__.split("+")[0]


def built_for() -> str | None:
    """The torch version recorded in the compiled core's file, or None if it cannot be read."""
    spec = importlib.util.find_spec("wandapp._core")
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None
    with open(spec.origin, "rb") as f:
        found = _MARKER.search(f.read())
    return found.group(1).decode() if found else None


def mismatch(built: str) -> ImportError:
    return ImportError(
        f"wandapp's compiled core was built for torch {built}, but torch {installed_torch()} is installed. "
        f"Install torch=={built}, or rebuild wandapp against this torch: "
        "`pip install --no-build-isolation --force-reinstall <wandapp source or sdist>` (`make build` in a checkout); "
        f"builds exist for torch {', '.join(SUPPORTED)} (README: Supported torch versions)"
    )


def load_core() -> ModuleType:
    """``wandapp._core``, or ImportError naming both versions when it was built for another torch."""
    try:
        from wandapp import _core
    except ImportError as err:
        built = built_for()
        if built is not None and built != installed_torch():
            raise mismatch(built) from err
        raise
    if _core.TORCH_VERSION != installed_torch() and not os.environ.get(OVERRIDE):
        raise mismatch(_core.TORCH_VERSION)
    return _core
