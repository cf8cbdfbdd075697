"""The pure core: tiling geometry, georeferencing, volume geometry, class statistics, selections,
connected-region maths, region tables, OME-Zarr metadata and work planning.

Nothing here reads or writes a file or talks to Ray: no zarr, rasterio, pydicom, torch or ray
import, even a lazy one (tests/test_layout.py checks). Every function is a property-tested
statement about arrays and numbers.
"""
