"""Scoring against references, statistics, provenance, tables and the benchmark orchestration."""
