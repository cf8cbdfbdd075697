"""Pure volume geometry: slices ordered along their normal, spacing from positions, the patient affine.

DICOM conventions (PS3.3 C.7.6.2): ImageOrientationPatient holds the direction of increasing
column index (along a row) and then of increasing row index, both in patient space (LPS, mm);
ImagePositionPatient is the centre of the first transmitted pixel; PixelSpacing is
(distance between rows, distance between columns). Voxel ``(k, j, i)`` (slice, row, column) is at

    position(k, j, i) = origin + i * dc * row_dir + j * dr * col_dir + k * ds * normal

with ``normal = row_dir x col_dir``. Slices are ordered by their position projected on the
normal, never by InstanceNumber, and ``ds`` is the measured step between positions, never
SliceThickness (overlapping reconstructions have thickness > spacing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Orientation cosines agree to this much when slices are "parallel"; positions to this many mm.
ORIENTATION_TOLERANCE = 1e-4
POSITION_TOLERANCE_MM = 0.01


class GeometryError(ValueError):
    """The slices do not form a regular volume; the message says where and why."""


@dataclass(frozen=True)
class PlaneGeometry:
    """One 2-D frame in patient space."""

    position: tuple[float, float, float] | None  # None: the object states no patient position
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]  # (between rows, between columns) in mm
    rows: int
    columns: int


@dataclass(frozen=True)
class VolumeGeometry:
    """A regular grid of voxels in patient space; axes are (slice, row, column)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # (ds, dr, dc) mm
    origin: tuple[float, float, float]  # patient position of voxel (0, 0, 0)
    direction: tuple[tuple[float, float, float], ...]  # unit vectors of the slice, row, column axes

    def affine(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous voxel ``(k, j, i, 1)`` to patient ``(x, y, z, 1)`` in mm."""
        matrix = np.eye(4)
        for axis in range(3):
            matrix[:3, axis] = np.asarray(self.direction[axis]) * self.spacing[axis]
        matrix[:3, 3] = self.origin
        return matrix

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))


def normal_of(orientation: Sequence[float]) -> np.ndarray:
    row_dir = np.asarray(orientation[:3], dtype=np.float64)
    col_dir = np.asarray(orientation[3:], dtype=np.float64)
    normal = np.cross(row_dir, col_dir)
    return normal / np.linalg.norm(normal)


def order_planes(planes: Sequence[PlaneGeometry]) -> tuple[list[int], VolumeGeometry]:
    """Sort frames along the slice normal and describe the volume they form.

    Returns the frame indices in order and the geometry. Raises ``GeometryError`` for frames of
    different size or orientation (non-parallel slices), positions that do not lie along the
    normal (gantry tilt), two frames at one position, and a missing slice (a step larger than the
    others; resampling across gaps is not done).
    """
    if not planes:
        raise GeometryError("no image frames")
    first = planes[0]
    for plane in planes[1:]:
        if (plane.rows, plane.columns) != (first.rows, first.columns):
            raise GeometryError(
                f"frames of different size: {first.rows}x{first.columns} and {plane.rows}x{plane.columns}"
            )
        if np.abs(np.subtract(plane.orientation, first.orientation)).max() > ORIENTATION_TOLERANCE:
            raise GeometryError(f"non-parallel slices: orientation {first.orientation} vs {plane.orientation}")
        if np.abs(np.subtract(plane.pixel_spacing, first.pixel_spacing)).max() > 1e-6:
            raise GeometryError(f"pixel spacing differs: {first.pixel_spacing} vs {plane.pixel_spacing}")
    normal = normal_of(first.orientation)
    positions = np.asarray([p.position for p in planes], dtype=np.float64)
    along = positions @ normal
    order = [int(i) for i in np.argsort(along, kind="stable")]
    ordered = positions[order]
    offsets = ordered - ordered[0]
    across = offsets - np.outer(offsets @ normal, normal)
    if len(planes) > 1 and np.linalg.norm(across, axis=1).max() > POSITION_TOLERANCE_MM * 10:
        raise GeometryError(
            "slice positions do not lie along the slice normal (gantry tilt or a sheared series): "
            f"up to {np.linalg.norm(across, axis=1).max():.3f} mm off the normal"
        )
    steps = np.diff(along[order])
    spacing = _slice_spacing(steps, along[order])
    dr, dc = first.pixel_spacing
    direction = (tuple(normal), tuple(first.orientation[3:]), tuple(first.orientation[:3]))
    geometry = VolumeGeometry(
        shape=(len(planes), first.rows, first.columns),
        spacing=(spacing, float(dr), float(dc)),
        origin=tuple(float(v) for v in ordered[0]),  # type: ignore[arg-type]
        direction=tuple(tuple(float(c) for c in axis) for axis in direction),  # type: ignore[misc]
    )
    return order, geometry


def _slice_spacing(steps: np.ndarray, along: np.ndarray) -> float:
    if steps.size == 0:
        return 1.0  # a single slice: no measurable spacing; 1 mm keeps volumes in voxel units x 1 mm
    if steps.min() < POSITION_TOLERANCE_MM:
        k = int(np.argmin(steps))
        raise GeometryError(f"two frames at the same position {along[k]:.3f} mm along the normal")
    spacing = float(np.median(steps))
    irregular = np.abs(steps - spacing) > max(POSITION_TOLERANCE_MM, 0.01 * spacing)
    if irregular.any():
        k = int(np.argmax(irregular))
        kind = "missing slice" if steps[k] > spacing else "irregular spacing"
        raise GeometryError(
            f"{kind}: step of {steps[k]:.3f} mm between positions {along[k]:.3f} and {along[k + 1]:.3f} mm "
            f"along the normal, where the series steps {spacing:.3f} mm"
        )
    return spacing


def axis_mapping(
    target: np.ndarray, target_shape: Sequence[int], source: np.ndarray, source_shape: Sequence[int],
    tolerance: float = 1e-3,
) -> list[tuple[int, bool]] | None:  # fmt: skip
    """How a labels array on another voxel grid lines up with a volume, if it is the same grid.

    ``target`` and ``source`` are 4x4 affines from voxel indices to the same patient space (mm).
    Returns, for each target axis, the source axis it runs along and whether it runs backwards, when
    the two grids are the same voxels in another axis order or direction (a NIfTI's (i, j, k) against
    a series' (z, y, x), a SEG stored bottom-up); None when they are not (other spacing, a shift, a
    rotation, another extent). ``tolerance`` is in voxels.
    """
    mapping = np.linalg.solve(np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64))
    axes: list[tuple[int, bool]] = []
    for column in range(3):
        vector = mapping[:3, column]
        axis = int(np.argmax(np.abs(vector)))
        sign = vector[axis]
        unit = np.zeros(3)
        unit[axis] = np.sign(sign)
        if abs(abs(sign) - 1) > tolerance or np.abs(vector - unit).max() > tolerance:
            return None
        axes.append((axis, bool(sign < 0)))
    if sorted(a for a, _ in axes) != [0, 1, 2]:
        return None
    for column, (axis, backwards) in enumerate(axes):
        if int(target_shape[column]) != int(source_shape[axis]):
            return None
        expected = int(source_shape[axis]) - 1 if backwards else 0
        if abs(mapping[axis, 3] - expected) > tolerance:
            return None
    return axes


def remap_axes(array: np.ndarray, axes: Sequence[tuple[int, bool]]) -> np.ndarray:
    """``array`` (on the source grid) in the target's axis order and direction (``axis_mapping``)."""
    out = np.transpose(array, [axis for axis, _ in axes])
    flips = tuple(k for k, (_, backwards) in enumerate(axes) if backwards)
    return np.ascontiguousarray(np.flip(out, flips) if flips else out)
