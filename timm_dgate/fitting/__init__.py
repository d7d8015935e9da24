"""Training gates on a frozen backbone: ``fit`` and its drivers (``training``), how the gates step on features
(``trainer``), mini-batches that do not depend on how the data is sharded, sums across Accelerate
processes, and the named gate kinds (a head and a loss).

Imports ``core`` only: it types against the exit-model contract (``core.contract``), not the models.
"""
