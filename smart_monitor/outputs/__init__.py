"""What the monitor writes: snapshots and their retention, the saved state, the log."""
