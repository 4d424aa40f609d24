"""Sampling: pure functions (CFG mix, top-k/top-p, bit sampling) and the generation loops."""
