"""Evaluation: sample quality now; LDS and counterfactual retraining build on it."""

from diffattr.evaluation._quality import ClassConfidence

__all__ = ["ClassConfidence"]
