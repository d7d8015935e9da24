"""Training gates on a frozen backbone: ``fit`` on a feature cache, mini-batches that do not depend on
how the data is sharded, sums across Accelerate processes, and the named gate kinds.

Imports ``core`` only: it types against the exit-model contract (``core.contract``), not the models.
"""
