"""Evaluation: prompt templates, class names, metrics on features, and evaluators."""
