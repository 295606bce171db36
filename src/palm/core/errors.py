"""Typed errors: library code raises these, and only the CLI turns them into one line and an exit code."""

from ..model.config import ConfigError


class PalmError(Exception):
    """Base class for every error palm reports to a user."""


class CorpusError(PalmError):
    """A corpus path or file that cannot be used for training."""


class TokenizerError(PalmError):
    """Bad tokenizer settings, or a directory that holds no palm tokenizer."""


class CheckpointError(PalmError):
    """A model directory or checkpoint that is missing, corrupt or does not match."""


class GenerationInputError(PalmError):
    """A prompt or sampling setting that cannot be generated from."""


__all__ = ["PalmError", "CorpusError", "TokenizerError", "CheckpointError", "ConfigError", "GenerationInputError"]
