"""The package version: the one source pyproject.toml, the Hub files and ``timm_dgate.__version__`` read."""

__version__ = "0.1.0"
