"""The driver: config models, stages and their keys, the CLI (``mid``, ``python -m pipeline``)."""
