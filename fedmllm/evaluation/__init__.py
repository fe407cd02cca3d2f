"""Option scoring, answer parsing and metrics."""
