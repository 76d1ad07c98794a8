"""Read-back commands over a monitor's output: ``stats``, ``list``/``show``, ``report``."""
