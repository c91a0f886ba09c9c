"""Inference: evaluation, prediction, GAR calibration, metrics and reports."""
