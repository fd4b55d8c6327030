"""Objectives used only by the tests (a plugin package: ``MASKRAY_PLUGINS=objectives,maskray_testing``)."""


def on_a_training_worker() -> bool:
    """Whether this process is a Ray Train worker (a Ray actor in a process group), not a driver that builds the run
    specification: the test process (whose own gloo group of one may be up) or a Tune trial (an actor)."""
    import ray
    import torch.distributed as dist

    return dist.is_initialized() and ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
