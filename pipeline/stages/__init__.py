"""The stages of a run, in order: ingest → baseline, teacher → pool → mid → eval."""
