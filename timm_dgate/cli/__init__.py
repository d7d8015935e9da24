"""The command line: ``timm-dgate`` subcommands, the recipe behind ``recipes/fit.py`` and
``accelerate launch``, its flags and its data (timm's pipeline).

The top of the stack: imports what it runs, lazily where a subcommand needs it.
"""
