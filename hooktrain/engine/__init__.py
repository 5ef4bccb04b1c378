"""The training engine: :class:`~hooktrain.engine.runner.IterRunner` and what it needs to run
the loop on every rank (pre-flight checks, optimizers, logs, signals, the per-iteration
agreement and the collective watchdog).
"""
