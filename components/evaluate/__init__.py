"""Evaluation: both models on the held-out test split, the paired gate, the hermetic export and the report."""
