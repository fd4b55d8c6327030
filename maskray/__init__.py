"""maskray: masked self-supervised ViT pretraining on Ray Train + DeepSpeed."""

__version__ = "0.1.0"
