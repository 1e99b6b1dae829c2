"""Evaluation: strategies, metrics, result tables and plots."""
