"""Batch evaluation: scoring (sums per block), the Ray Data job, the report."""
