"""Evaluation: pure metric functions on tensors (eval.metrics)."""
