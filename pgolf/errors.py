"""User-facing errors.

Every error a user can cause (bad file, bad key, over-budget artifact, missing compressor) is a
subclass of :class:`UserError`, itself a ``ValueError``. The CLI prints ``error: <message>`` on one
line and exits with code 2, without a traceback. Internal invariants use ``assert`` instead, so a
traceback always means a bug in pgolf, never a mistake by the user.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input. The message names the file or key and the fix."""


class ConfigError(UserError):
    """Unknown preset, profile or key, or a value of the wrong type."""


class DataError(UserError):
    """A shard, manifest, tokenizer or glob that cannot be used."""


class ArtifactError(UserError):
    """An artifact file that is malformed, truncated, tampered with or of an unknown version."""


class BudgetExceededError(UserError):
    """The artifact (code + compressed model) is larger than the byte budget."""


class MissingDependencyError(UserError):
    """A required library (for example a compressor) is not importable. We never fall back."""
