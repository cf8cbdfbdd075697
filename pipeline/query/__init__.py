"""Reading finished stores: ``view`` (``open_store`` -> ``StoreView``: metadata, xarray, regions,
areas in boxes and zones, points) and ``export`` (Cloud-Optimized GeoTIFF)."""

from pipeline.query.view import StoreView, incomplete_warnings, open_store

__all__ = ["StoreView", "incomplete_warnings", "open_store"]
