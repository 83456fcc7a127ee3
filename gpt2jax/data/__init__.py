"""Corpus -> normalized documents -> cached token ids -> deterministic batches."""
