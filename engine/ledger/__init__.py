"""Append-only, hash-chained points ledger."""
