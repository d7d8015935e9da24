"""The folder formats on disk and on the Hugging Face Hub: writing, pushing, reading and checking a
gated model's folder (docs/hub.md) and a cascade's (docs/cascades.md), and their model cards.

``folder`` writes and reads a gated model's files, ``cascade_folder`` a cascade's manifest over
member folders, ``card`` the model cards, ``backbone`` builds and checks the backbone the gates
attach to, ``remote`` is all that talks to the Hub; ``names`` and ``weights`` serve them all.
Imports ``core`` and ``boundaries``; never ``models`` (the models call into it).
"""
