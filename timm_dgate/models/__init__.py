"""The user-facing models: ``GatedModel`` and ``wrap``, ``Cascade`` and ``cascade``, and the one
``from_pretrained`` that loads either.

Imports every folder below it; only ``cli`` and ``demo`` import it.
"""
