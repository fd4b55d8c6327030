"""User-facing errors: raised for bad input, reported by the launchers as one line with exit code 2."""

from __future__ import annotations


class MaskrayError(Exception):
    """Base class of every error caused by user input (a config key, a path, a shard).

    The message must be one line that names the offending file, key or shard.
    """

    exit_code = 2


class ConfigError(MaskrayError):
    """An invalid configuration value or key."""


class DataError(MaskrayError):
    """Missing, empty or unreadable data (shard directory, manifest, source)."""
