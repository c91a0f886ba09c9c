"""Inference: evaluation, prediction, GAR calibration and reports (the metrics are arm_jax.metrics)."""
