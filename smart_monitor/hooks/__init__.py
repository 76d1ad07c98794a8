"""What reacts to snapshots beside the log: actions, Prometheus metrics, plots."""
