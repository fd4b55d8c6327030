"""Training engine: the per-worker DeepSpeed loop and the Ray Train driver."""
