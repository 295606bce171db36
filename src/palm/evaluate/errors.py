"""The errors evaluation raises, and the one way it asks for an optional package."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..core.errors import PalmError

# ROUGE, chrF/BLEU and lm-eval are the `eval` extra, so that a plain install stays small.
EXTRAS_HINT = "pip install 'palm[eval]'"


class EvaluationError(PalmError):
    """An evaluation setting or model that cannot be evaluated as asked."""


class TaskError(EvaluationError):
    """A task file that is missing, empty or malformed."""


def require(module: str, purpose: str, package: str | None = None) -> ModuleType:
    """`module`, imported; an EvaluationError saying how to install it where it is missing.

    Imported on first use rather than with palm, so that evaluating without these extras works.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise EvaluationError(f"{purpose} needs {package or module.split('.')[0]}: {EXTRAS_HINT}") from None
