"""Interoperability: PyTorch weights, model files, pretrained initialisation."""
