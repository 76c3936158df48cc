"""Evaluation: pure metric functions (`eval.metrics`), feature extractors, and a CLI
(`python -m eval --checkpoint RUN_DIR`) that scores any checkpoint."""
