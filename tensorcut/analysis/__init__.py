"""Truncation study: metrics, sweeps, recovery."""
