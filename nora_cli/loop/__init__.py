"""The one training loop and what it owns: the Job contract, checkpoints, metrics. It never names a task."""
