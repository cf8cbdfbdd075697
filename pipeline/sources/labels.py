"""Reference labels on a volume's voxel grid: a NIfTI label image or a DICOM SEG, for training pairs
and ``raymask evaluate``.

Both are checked against the series' own geometry (``VolumeGeometry``, slices ordered along the
normal): a NIfTI's (i, j, k) -> RAS affine, or a SEG's per-frame plane positions, must land on the
same voxels, in any axis order or direction (``pipeline.core.volume.axis_mapping``); anything else
(another spacing, a shift, a resampled or cropped grid) is refused in one line naming the file. Values
come out as class ids in the series' (z, y, x) order. A SEG's segments become classes by their label
(SegmentLabel equal to a class name, case aside) or else by segment number; a voxel outside every
segment is class 0; where segments overlap, the later one wins. BINARY, FRACTIONAL (above half the
maximum) and LABELMAP (frames of segment numbers) encodings are read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.volume import VolumeGeometry, axis_mapping, remap_axes
from pipeline.errors import SourceError, one_line

NIFTI_SUFFIXES = (".nii", ".nii.gz")
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SEG_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")  # Segmentation, Label Map Segmentation


def is_nifti(path: str) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


@dataclass
class NiftiLabels:
    """A NIfTI label image read box by box (an uncompressed .nii is memory-mapped by nibabel)."""

    path: str
    image: Any
    axes: list[tuple[int, bool]]
    shape: tuple[int, int, int]

    def read(self, start: Sequence[int], stop: Sequence[int]) -> np.ndarray:
        source_shape = self.image.shape
        slices: list[slice] = [slice(None)] * 3
        for target, (axis, backwards) in enumerate(self.axes):
            a, b = int(start[target]), int(stop[target])
            n = int(source_shape[axis])
            slices[axis] = slice(n - b, n - a) if backwards else slice(a, b)
        extra = (0,) * (len(source_shape) - 3)  # a 4-D image with one volume
        block = np.asarray(self.image.dataobj[(*slices, *extra)])
        return remap_axes(block, self.axes)


@dataclass
class ArrayLabels:
    path: str
    array: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def read(self, start: Sequence[int], stop: Sequence[int]) -> np.ndarray:
        return self.array[tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))]


def open_volume_labels(
    path: str, geometry: VolumeGeometry, class_names: Sequence[str], series: str = "the series"
) -> NiftiLabels | ArrayLabels:
    """Labels on ``geometry``'s voxel grid; one-line ``SourceError`` naming ``path`` otherwise."""
    if not Path(path).is_file():
        raise SourceError(f"{path}: no such file")
    if is_nifti(path):
        return _nifti(path, geometry, series)
    return ArrayLabels(path, _seg(path, geometry, class_names, series))


def _nifti(path: str, geometry: VolumeGeometry, series: str) -> NiftiLabels:
    import nibabel as nib

    try:
        image: Any = nib.load(path)
    except Exception as exc:  # nibabel raises several types for a file that is not NIfTI
        raise SourceError(f"{path}: not a readable NIfTI image ({one_line(exc, 160)})") from exc
    shape = tuple(int(n) for n in image.shape)
    if len(shape) < 3 or any(n != 1 for n in shape[3:]):
        raise SourceError(f"{path}: a NIfTI label image must be 3-D (its shape is {' x '.join(map(str, shape))})")
    affine = LPS_FROM_RAS @ np.asarray(image.affine, dtype=np.float64)
    axes = axis_mapping(geometry.affine(), geometry.shape, affine, shape[:3])
    if axes is None:
        raise SourceError(
            f"{path}: not on the voxel grid of {series} (shape {' x '.join(map(str, shape[:3]))}, spacing "
            f"{_spacing(image.affine)} mm vs {' x '.join(map(str, geometry.shape))} voxels of "
            f"{_shown(geometry.spacing)} mm); resample it onto the series first"
        )
    return NiftiLabels(path, image, axes, geometry.shape)


def _seg(path: str, geometry: VolumeGeometry, class_names: Sequence[str], series: str) -> np.ndarray:
    import highdicom as hd
    import pydicom

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise SourceError(f"{path}: neither NIfTI (.nii, .nii.gz) nor DICOM ({one_line(exc, 120)})") from exc
    if str(getattr(header, "SOPClassUID", "")) not in SEG_CLASSES:
        raise SourceError(f"{path}: a DICOM file but not a segmentation (SEG); labels are a SEG or a NIfTI image")
    try:
        seg = hd.seg.segread(path)
        frames = np.asarray(seg.pixel_array)
    except Exception as exc:
        raise SourceError(f"{path}: cannot read the segmentation ({one_line(exc, 160)})") from exc
    if frames.ndim == 2:
        frames = frames[None]
    wanted = {name.lower(): k for k, name in enumerate(class_names)}
    classes: dict[int, int] = {}
    for item in seg.SegmentSequence:
        number = int(item.SegmentNumber)
        classes[number] = wanted.get(str(item.SegmentLabel).lower(), number)
    shared = seg.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in seg else None
    kind = str(getattr(seg, "SegmentationType", "BINARY"))
    fractional = kind == "FRACTIONAL"
    labelmap = kind == "LABELMAP"  # each frame holds segment numbers (0: none), not one segment's mask
    lookup = np.zeros(max([*classes, 0]) + 1, dtype=np.uint8)
    for number, class_id in classes.items():
        lookup[number] = class_id
    threshold = float(getattr(seg, "MaximumFractionalValue", 1)) / 2 if fractional else 0
    inverse = np.linalg.inv(geometry.affine())
    out = np.zeros(geometry.shape, dtype=np.uint8)
    slices, rows, columns = geometry.shape
    if frames.shape[1:] != (rows, columns):
        raise SourceError(
            f"{path}: frames of {frames.shape[1]} x {frames.shape[2]} pixels on {series} of {rows} x {columns}; "
            "resample the segmentation onto the series first"
        )
    for index, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = 0 if labelmap else int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        position = _frame_position(group, shared, path, index)
        orientation = _frame_orientation(group, shared)
        if orientation is not None and not _same_plane(orientation, geometry):
            raise SourceError(f"{path}: frame {index + 1} is not in the plane of {series}'s slices")
        k, j, i = (inverse @ np.append(position, 1.0))[:3]
        if max(abs(j), abs(i)) > 1e-3 or abs(k - round(k)) > 1e-3 or not 0 <= round(k) < slices:
            raise SourceError(
                f"{path}: frame {index + 1} at {_shown(position)} mm is on no slice of {series}; "
                "resample the segmentation onto the series first"
            )
        if labelmap:
            values = frames[index]
            if values.max(initial=0) >= len(lookup):
                raise SourceError(
                    f"{path}: frame {index + 1} holds segment {int(values.max())}, which is not described"
                )
            out[round(k)] = lookup[values]
            continue
        inside = frames[index] > threshold
        out[round(k)][inside] = classes.get(number, number)
    return out


def _frame_position(group: Any, shared: Any, path: str, index: int) -> np.ndarray:
    for holder in (group, shared):
        if holder is not None and "PlanePositionSequence" in holder:
            return np.asarray(holder.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64)
    raise SourceError(f"{path}: frame {index + 1} states no ImagePositionPatient; raymask places frames by position")


def _frame_orientation(group: Any, shared: Any) -> np.ndarray | None:
    for holder in (group, shared):
        if holder is not None and "PlaneOrientationSequence" in holder:
            return np.asarray(holder.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=np.float64)
    return None


def _same_plane(orientation: np.ndarray, geometry: VolumeGeometry) -> bool:
    row, column = np.asarray(geometry.direction[2]), np.asarray(geometry.direction[1])
    return bool(np.abs(orientation[:3] - row).max() < 1e-3 and np.abs(orientation[3:] - column).max() < 1e-3)


def _spacing(affine: np.ndarray) -> str:
    return _shown(np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0)))


def _shown(values: Any) -> str:
    return " x ".join(f"{float(v):.4g}" for v in values)
