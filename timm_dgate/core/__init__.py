"""The data every other part shares: boundaries, config, gates, the exit engine and policy, profiles,
scores, losses, costs, the feature cache and provenance.

``core`` imports nothing of timm_dgate above it (only ``errors``, ``compat``, ``progress`` and
``version`` beside it), so every folder can build on it. Names are re-exported from the package
root, not from here.
"""
