"""Bytes at rest: raw dataset readers, Zarr dataset and pool formats, checkpoints, cache keys.

Nothing here trains or attacks anything; ``workers`` and ``pipeline`` build on this package.
"""
