"""The folder formats on disk and on the Hugging Face Hub: writing, pushing, reading and checking a
gated model's folder (docs/hub.md) and a cascade's (docs/cascades.md), and their model cards.

Imports ``core`` and ``boundaries``; never ``models`` (the models call into it).
"""
