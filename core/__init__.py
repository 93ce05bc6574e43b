"""Refit's core: what both training and serving need, with neither torch nor BentoML (contract, decoding,
dataset checks, the store, datasets, drift references, settings). import-linter keeps it that way."""
