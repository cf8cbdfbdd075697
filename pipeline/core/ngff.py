"""OME-Zarr (NGFF) 0.5 metadata for volumetric stores, as plain dicts (no I/O).

NGFF 0.5 is the version that lives in zarr v3: its metadata sits under the ``ome`` key of a
group's attributes. A volume store's root group is a multiscale image (the CT in HU) and
``labels/mask`` a multiscale label image with class colours and names. NGFF's coordinate
transformations hold only scale and translation, so the full patient-space affine (direction
cosines included) goes into raymask's own attributes beside it.
"""

from __future__ import annotations

from typing import Any

from pipeline.core.colors import rgb
from pipeline.core.volume import VolumeGeometry

NGFF_VERSION = "0.5"
AXES = ("z", "y", "x")


def multiscales(name: str, geometry: VolumeGeometry, paths: tuple[str, ...] = ("0",)) -> list[dict[str, Any]]:
    """One multiscale with physical scale in millimetres; level k is downsampled 2**k in y and x."""
    datasets = []
    for level, path in enumerate(paths):
        factor = 2**level
        scale = [geometry.spacing[0], geometry.spacing[1] * factor, geometry.spacing[2] * factor]
        datasets.append({"path": path, "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    return [
        {
            "name": name,
            "axes": [{"name": a, "type": "space", "unit": "millimeter"} for a in AXES],
            "datasets": datasets,
        }
    ]


def image_attrs(geometry: VolumeGeometry) -> dict[str, Any]:
    return {"ome": {"version": NGFF_VERSION, "multiscales": multiscales("image", geometry)}}


def labels_group_attrs(names: list[str]) -> dict[str, Any]:
    return {"ome": {"version": NGFF_VERSION, "labels": names}}


def label_image_attrs(geometry: VolumeGeometry, classes: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    colors = [{"label-value": i, "rgba": [*rgb(color), 255]} for i, (_, color) in enumerate(classes)]
    properties = [{"label-value": i, "class": name} for i, (name, _) in enumerate(classes)]
    return {
        "ome": {
            "version": NGFF_VERSION,
            "multiscales": multiscales("mask", geometry),
            "image-label": {"colors": colors, "properties": properties, "source": {"image": "../../"}},
        }
    }


def regions_image_attrs(volume: dict[str, Any]) -> dict[str, Any]:
    """The ``labels/regions`` label image: region ids (too many for colours), on the image's grid."""
    spacing = [float(v) for v in volume["spacing_mm"]]
    return {
        "ome": {
            "version": NGFF_VERSION,
            "multiscales": [
                {
                    "name": "regions",
                    "axes": [{"name": a, "type": "space", "unit": "millimeter"} for a in AXES],
                    "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": spacing}]}],
                }
            ],
            "image-label": {
                "colors": [{"label-value": 0, "rgba": [0, 0, 0, 0]}],  # 0: no region, transparent
                "source": {"image": "../../"},
            },
        }
    }


def geometry_attrs(geometry: VolumeGeometry) -> dict[str, Any]:
    """The volume's patient-space geometry, which NGFF cannot express (direction cosines)."""
    return {
        "shape": list(geometry.shape),
        "spacing_mm": list(geometry.spacing),
        "origin_mm": list(geometry.origin),
        "direction": [list(axis) for axis in geometry.direction],
        "affine": geometry.affine().tolist(),
        "axes": list(AXES),
        "space": "DICOM patient coordinates (LPS), mm; affine maps voxel (z, y, x, 1)",
    }
