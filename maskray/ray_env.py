"""Starting or attaching to Ray, the same way for training, sweeps and evaluation tasks."""

from __future__ import annotations

from maskray.storage import credential_env


def ensure_ray() -> None:
    """Attach to a running Ray (``ray job submit``, ``RAY_ADDRESS``) or start a local one, unless this process
    already did. Workers get unbuffered output and the storage credential / endpoint variables set here
    (:func:`maskray.storage.credential_env`), so they reach the same ``s3://`` / ``gs://`` store as the driver."""
    import ray

    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1", **credential_env()}}, log_to_driver=True)
