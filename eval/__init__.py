"""Evaluation: anomaly maps, scores, thresholds, metrics, plots and reports."""
