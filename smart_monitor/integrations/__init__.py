"""Trainer callbacks that write the metrics file the daemon follows.

Each framework has its own module, imported only by the user who runs that framework:
``smart_monitor`` itself never imports transformers, lightning or torch.

- ``smart_monitor.integrations.transformers.MetricsCallback`` (HF ``Trainer``)
- ``smart_monitor.integrations.lightning.MetricsCallback`` (Lightning ``Trainer``)
- ``smart_monitor.integrations.writer.MetricsWriter`` for a hand-written loop
"""
