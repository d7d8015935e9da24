"""Measuring a gated model on a split that chose nothing: ``evaluate``, throughput per batch size, the
side-by-side timing harness, tables and plots of the results.

Imports ``core`` and ``calibration``; types against the exit-model contract.
"""
