"""Evaluation: the ShapesWorld checker, GenEval-style scoring, reports."""
