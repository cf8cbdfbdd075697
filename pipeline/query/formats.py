"""The export formats by name, for ``raymask batch``'s ``output.exports``: what each writes, beside
the store, and which stores it fits (polygons and COGs for maps and images, DICOM SEG and NIfTI for
volumes).

Each export is written next to its store with the store's name (``ROOT/a/b.tif.zarr`` ->
``ROOT/a/b.tif.parquet``), through the same functions as ``raymask export``, so it appears only once
complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.store import MaskStore

# name -> (suffix, for volumes?)
EXPORTS: dict[str, tuple[str, bool]] = {
    "parquet": (".parquet", False),
    "fgb": (".fgb", False),
    "gpkg": (".gpkg", False),
    "geojson": (".geojson", False),
    "cog": (".tif", False),
    "seg": (".dcm", True),
    "nifti": (".nii.gz", True),
}


def export_path(store_path: Path, name: str) -> Path:
    """Where export ``name`` of the store at ``store_path`` goes: beside it, named after it."""
    suffix, _ = EXPORTS[name]
    stem = store_path.name.removesuffix(".zarr")
    return store_path.with_name(stem + suffix)


def unfit(store: MaskStore, name: str) -> str | None:
    """Why export ``name`` does not apply to ``store`` (None: it does)."""
    _, for_volumes = EXPORTS[name]
    volume = store.info.volume is not None
    if for_volumes and not volume:
        return "a 2-D store (DICOM SEG and NIfTI are for volumes)"
    if not for_volumes and volume:
        return "a volume (polygons and COGs are for 2-D stores)"
    return None


def write_export(store: MaskStore, name: str, out: Path, *, address: str | None = None) -> dict[str, Any]:
    """Write export ``name`` of ``store`` to ``out`` (replacing it)."""
    if name == "cog":
        from pipeline.query.export import export_geotiff

        return {"path": str(export_geotiff(store, out)), "format": "COG"}
    if name == "seg":
        from pipeline.query.seg import export_seg

        return export_seg(store, out)
    if name == "nifti":
        from pipeline.query.nifti import export_nifti

        return export_nifti(store, out)
    from pipeline.query.polygons import export_polygons

    return export_polygons(store, out, address=address, progress=False)
