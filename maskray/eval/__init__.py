"""Evaluation of frozen encoders: weighted k-NN (DINO protocol)."""

from maskray.eval.knn import knn_accuracy, knn_predict

__all__ = ["knn_accuracy", "knn_predict"]
