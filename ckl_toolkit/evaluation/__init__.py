"""Benchmarks: probe scoring, LAMA-ckl and TemporalWiki protocols, methods, reports."""
