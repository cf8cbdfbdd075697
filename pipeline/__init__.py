"""raymask: distributed batch segmentation of aerial and medical imagery into zarr mask stores."""

__version__ = "0.1.0"
