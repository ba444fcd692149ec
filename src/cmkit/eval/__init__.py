"""Evaluation: feature extractors, metrics and the evaluation pipeline."""
