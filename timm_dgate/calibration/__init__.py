"""Choosing thresholds on validation data: the threshold search, Learn then Test for ``confidence=``,
``calibrate`` and the trade-off curves.

Imports ``core`` only: it types against the exit-model contract (``core.contract``).
"""
