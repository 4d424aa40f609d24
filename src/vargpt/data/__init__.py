"""Datasets: ShapesWorld (procedural scenes), JSONL chat records, collation."""
