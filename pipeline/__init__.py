"""raymask: distributed batch segmentation of aerial and medical imagery into zarr mask stores."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "open_store"]


def __getattr__(name: str) -> Any:
    if name == "open_store":  # imported on first use: the CLI and Ray workers never pay for it
        from pipeline.query import open_store

        return open_store
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
