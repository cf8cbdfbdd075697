"""The mask store: a zarr v3 group holding the mask, the statistics per work unit, the regions
and the store's metadata (``mask_store``), that metadata typed (``meta``), stores built from label
blocks (``blocks``), folders of stores (``catalog``)."""

from pipeline.store.mask_store import (
    COMPLETE,
    INCOMPLETE,
    REGION_TABLE,
    VOLUME_IMAGE,
    VOLUME_MASK,
    VOLUME_REGIONS,
    MaskStore,
    StoreLayout,
    finish_replacement,
    replace_version,
    swap_in,
)
from pipeline.store.meta import FORMAT, VERSION, StoreMeta

__all__ = [
    "COMPLETE",
    "FORMAT",
    "INCOMPLETE",
    "REGION_TABLE",
    "VERSION",
    "VOLUME_IMAGE",
    "VOLUME_MASK",
    "VOLUME_REGIONS",
    "MaskStore",
    "StoreLayout",
    "StoreMeta",
    "finish_replacement",
    "replace_version",
    "swap_in",
]
