"""The ``raymask`` command (``main``)."""

from pipeline.cli.main import main

__all__ = ["main"]
