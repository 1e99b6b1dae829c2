"""Data: benchmark loaders, answer grading, the synthetic task."""
