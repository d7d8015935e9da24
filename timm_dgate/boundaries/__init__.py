"""Where gates can sit: candidate boundaries from ``feature_info`` and the family registry, names that
are no module located by shape, one probe batch that verifies each, and the untrained-head check.
Importing the package registers the built-in family forwards (``adapters``).

Imports ``core`` only.
"""

from . import adapters  # noqa: F401  (registers with the family registry on import)
