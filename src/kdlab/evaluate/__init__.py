"""Measurements of trained models: accuracy, robustness, explanations, efficiency."""
