"""The client's version: sent in the hello (``clipvisor-python/<version>``) and in pyproject.toml."""

__version__ = "0.1.0"
