"""The edges that read: the metrics file, HF trainer state files, checkpoint folders."""
