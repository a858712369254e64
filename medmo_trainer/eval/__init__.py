"""Evaluation of trained models on held-out benchmarks: metrics, scoring, the eval stage."""
