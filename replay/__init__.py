"""Replay for researchers: pseudonymised Parquet, what-if, reports."""
