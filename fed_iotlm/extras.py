"""Optional dependencies by role, imported where a command first needs them.

The base install is what a site and the server need (torch, flwr, numpy, hydra, ...);
the IoT-LM stage, MMBind's search and the tracking/report tools come with extras
(pyproject.toml).  A command that needs a missing one stops with one line naming the
package and the extra to install, not an ImportError traceback from deep inside."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# the extra that brings each optional top-level module
EXTRA_OF = {
    "transformers": "llm",
    "peft": "llm",
    "gguf": "llm",
    "faiss": "mmbind",
    "mlflow": "study",
    "matplotlib": "study",
    "jinja2": "study",
}


class MissingExtraError(ImportError):
    """A command needs an optional dependency that is not installed."""


def require(module: str, what: str) -> ModuleType:
    """``import module``, or :class:`MissingExtraError` saying what needs it and which
    extra provides it (``what``: the feature, e.g. ``"fed-iotlm report"``)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        top = module.split(".")[0]
        if err.name is None or err.name.split(".")[0] != top:
            raise  # the module is there but something it imports is broken: a real error
        extra = EXTRA_OF.get(top)
        hint = f"pip install 'fed-iotlm[{extra}]'" if extra else f"pip install {top}"
        raise MissingExtraError(f"{what} needs {top}, which is not installed: {hint}") from err


def has(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None
