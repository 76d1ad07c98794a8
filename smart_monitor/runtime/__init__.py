"""The shell that drives the pure pipeline: the engine shared by ``run`` and ``replay``,
the live daemon, the replay of a finished run, systemd notifications."""
