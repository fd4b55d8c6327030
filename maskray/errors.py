"""User-facing errors: raised for bad input, reported by the launchers as one line with exit code 2."""

from __future__ import annotations


class MaskrayError(Exception):
    """Base class of every error caused by user input (a config key, a path, a shard).

    The message must be one line that names the offending file, key or shard.
    """

    exit_code = 2
    label = "error"


class ConfigError(MaskrayError):
    """An invalid configuration value or key."""


class DataError(MaskrayError):
    """Missing, empty or unreadable data (shard directory, manifest, source)."""


class TrainingStopped(MaskrayError):
    """Training stopped before its last step and cannot go on by itself (non-finite losses); exit code 1."""

    exit_code = 1


class Interrupted(MaskrayError):
    """The run was asked to stop (SIGTERM) and checkpointed; re-submitting it resumes. Exit code 143
    (128 + SIGTERM), as schedulers expect of a terminated job."""

    exit_code = 143
    label = "stopped"
