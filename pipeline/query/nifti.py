"""A volume store's label mask as NIfTI-1 (``.nii.gz`` or ``.nii``), with a JSON side file of its classes.

NIfTI indexes voxels ``(i, j, k)`` = (column, row, slice) and maps them to RAS millimetres; the store
indexes ``(z, y, x)`` and its affine maps them to DICOM's LPS. So the array is transposed and the
affine is ``diag(-1, -1, 1, 1) @ A @ P``, with ``A`` the store's voxel-to-LPS affine and ``P`` the
permutation ``(i, j, k) -> (k, j, i)``; written as both the qform and the sform (code 1, scanner
anatomical). Labels are the store's class ids unchanged (255 = nodata); ``OUT.json`` beside it names
them, with colours and the codes a DICOM SEG would carry (``pipeline.query.seg.class_code``), and says
where they came from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import QueryError, StoreError
from pipeline.query.seg import class_code
from pipeline.store import COMPLETE, MaskStore

SUFFIXES = (".nii.gz", ".nii")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
ZYX_FROM_IJK = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)


def nifti_suffix(out: str | Path) -> bool:
    return str(out).lower().endswith(SUFFIXES)


def side_file(out: Path) -> Path:
    """``ct.nii.gz`` -> ``ct.json`` (the BIDS convention)."""
    name = out.name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return out.with_name(f"{name}.json")


def ras_affine(store_affine: np.ndarray) -> np.ndarray:
    """The NIfTI affine (i, j, k) -> RAS mm from the store's (z, y, x) -> LPS mm affine."""
    return LPS_TO_RAS @ np.asarray(store_affine, dtype=float) @ ZYX_FROM_IJK


def export_nifti(store: MaskStore, out: Path) -> dict[str, Any]:
    import nibabel as nib

    info = store.info
    if info.volume is None:
        raise QueryError(f"{store.path}: a 2-D store; NIfTI export is for volumes (use .tif or .parquet)")
    if info.status != COMPLETE:
        raise StoreError(f"{store.path}: the store is {info.status}; finish the job before exporting it")
    affine = ras_affine(np.asarray(info.volume.affine))
    data = np.ascontiguousarray(np.asarray(store.mask[:]).transpose(2, 1, 0))
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.header.set_intent("label")
    image.header["descrip"] = b"raymask labels; 255 = nodata"
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    side = side_file(out)
    labels = [
        {"value": c.id, "name": c.name, "color": c.color, "code": class_code(c.name, c.code)[0]} for c in info.classes
    ]
    meta = {
        "labels": labels,
        "nodata": info.nodata,
        "space": "RAS (NIfTI); the store's own affine is LPS (DICOM)",
        "store": str(store.path),
        "series": info.source.series if info.source else None,
        "spacing_mm": info.volume.spacing_mm,
    }
    suffix = ".nii.gz" if out.name.lower().endswith(".nii.gz") else ".nii"
    staging = out.with_name(f".{out.name}.writing-{os.getpid()}{suffix}")
    staging_side = side.with_name(f".{side.name}.writing-{os.getpid()}")
    try:
        nib.save(image, str(staging))
        staging_side.write_text(json.dumps(meta, indent=2))
        os.replace(staging_side, side)
        os.replace(staging, out)
    finally:
        for path in (staging, staging_side):
            path.unlink(missing_ok=True)
    return {"path": str(out), "format": "NIfTI-1", "labels": str(side), "shape": list(data.shape)}
