"""DICOM series: discovery, grouping, geometry from headers, and decoding frames to HU.

Headers are read without pixel data on the driver; pixels are decoded once, by Ray tasks that
ingest the series into the store's ``image`` array (see ``pipeline.jobs.ingest``), and tiles are read
from there. A series is grouped by SeriesInstanceUID; when that is empty (as in files whose UIDs
live only in the file meta), by FrameOfReferenceUID plus orientation and frame size. Enhanced
multi-frame objects contribute one plane per frame, with position and rescale taken from the
per-frame functional groups.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from pipeline.core.geometry import Box
from pipeline.core.volume import GeometryError, PlaneGeometry, VolumeGeometry, order_planes
from pipeline.errors import SourceError, SourceNotFound, one_line
from pipeline.sources.remote import list_prefix, object_identity, read_object
from pipeline.store.location import split_s3

# Values that break their VR's rules ("CT" as a UID, "nan" as a decimal string) would make pydicom
# print a UserWarning per element read; raymask checks every value it uses itself and names the
# file and the attribute in one line (_numbers), so pydicom's own reading validation stays quiet.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

# Objects that carry no image to segment: skipped with a note.
_NON_IMAGE_PREFIXES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "segmentation (SEG)",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT structure set (RTSTRUCT)",
    "1.2.840.10008.5.1.4.1.1.88.": "structured report (SR)",
    "1.2.840.10008.5.1.4.1.1.11.": "presentation state",
    "1.2.840.10008.5.1.4.1.1.104.": "encapsulated document",
}
_DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pyjpegls (or pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.4.81": "pyjpegls (or pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg-rle",
}


@dataclass(frozen=True)
class Frame:
    """One 2-D plane: a single-frame file, or frame ``index`` of a multi-frame object."""

    path: str
    index: int | None
    slope: float
    intercept: float
    plane: PlaneGeometry
    spacing_stated: bool = True  # False: the file gives no PixelSpacing (1 mm is assumed)


@dataclass(frozen=True)
class Series:
    key: str
    modality: str
    frames: tuple[Frame, ...]  # ordered along the slice normal
    geometry: VolumeGeometry
    description: str
    positioned: bool = True  # False: no patient positions; frames stacked in file order, 1 mm apart

    @property
    def paths(self) -> list[str]:
        return sorted({f.path for f in self.frames})

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for path in self.paths:
            if split_s3(path) is not None:  # an object's identity from its metadata, not a download
                digest.update(object_identity(path).encode())
            else:
                digest.update(Path(path).read_bytes())
        return digest.hexdigest()[:16]


def discover(inputs: Sequence[str]) -> tuple[list[Series], list[str]]:
    """Find the image series under folders (recursively) or in listed files; returns (series, notes)."""
    files, notes = _candidate_files(inputs)
    groups: dict[str, list[tuple[pydicom.Dataset, str]]] = defaultdict(list)
    for path in files:
        header = _read_header(path, explicit=path in inputs)
        if header is None:
            notes.append(f"{path}: not DICOM, skipped")
            continue
        kind = _non_image_kind(header)
        if kind:
            notes.append(f"{path}: {kind}, skipped (no image to segment)")
            continue
        groups[_series_key(header)].append((header, path))
    if not groups:
        raise SourceError(f"{', '.join(inputs)}: no DICOM images found ({len(files)} files looked at)")
    _refuse_odd_size(groups)
    split = [part for key, members in sorted(groups.items()) for part in _by_orientation(key, members)]
    return [_series(key, members) for key, members in split], notes


def read_dataset(path: str, *, stop_before_pixels: bool = False) -> pydicom.Dataset:
    """A DICOM file from disk, or an object from S3 (``s3://bucket/key``, fetched whole)."""
    if split_s3(path) is not None:
        return pydicom.dcmread(io.BytesIO(read_object(path)), stop_before_pixels=stop_before_pixels)
    return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)


def _candidate_files(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    files: list[str] = []
    for item in inputs:
        if split_s3(item) is not None:  # a prefix (a study or series folder) or one object
            files.extend(list_prefix(item) if item.endswith("/") else [item])
            continue
        path = Path(item)
        if not path.exists():
            raise SourceNotFound(f"{item}: file not found")
        if path.is_dir():
            files.extend(str(p) for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith("."))
        else:
            files.append(item)
    return files, []


def _read_header(path: str, *, explicit: bool) -> pydicom.Dataset | None:
    try:
        return read_dataset(path, stop_before_pixels=True)
    except InvalidDicomError:
        if explicit:
            raise SourceError(f"{path}: not a DICOM file") from None
        return None
    except (OSError, EOFError, ValueError) as exc:
        raise SourceError(f"{path}: truncated or unreadable DICOM header ({exc.__class__.__name__})") from exc


def _non_image_kind(header: pydicom.Dataset) -> str | None:
    sop = str(header.get("SOPClassUID") or header.file_meta.get("MediaStorageSOPClassUID", ""))
    for prefix, kind in _NON_IMAGE_PREFIXES.items():
        if sop.startswith(prefix):
            return kind
    if "Rows" not in header or "Columns" not in header:
        return "no image pixel module"
    return None


def _series_key(header: pydicom.Dataset) -> str:
    uid = str(header.get("SeriesInstanceUID", "") or "")
    if uid:
        return uid
    # The UIDs of some exports exist only in the file meta; one series then shares a frame of
    # reference, an orientation and a frame size (the orientation is added by _by_orientation).
    return f"for:{header.get('FrameOfReferenceUID', '')}|{header.Rows}x{header.Columns}"


def _refuse_odd_size(groups: dict[str, list[tuple[pydicom.Dataset, str]]]) -> None:
    """One file whose Rows or Columns differ from the many others of its series is named as the odd
    one: within a series UID's group, and, without series UIDs (the frame size is then part of the
    series key), among the groups of one frame of reference (not left to look like a one-file series
    and a gap in the rest)."""
    for members in groups.values():  # with series UIDs: one file of another size within its series
        counts: dict[tuple[int, int], list[tuple[pydicom.Dataset, str]]] = defaultdict(list)
        for header, path in members:
            counts[(int(header.Rows), int(header.Columns))].append((header, path))
        if len(counts) > 1:
            size, majority = max(counts.items(), key=lambda item: len(item[1]))
            odd = [m for other, ms in counts.items() if other != size for m in ms]
            if len(odd) == 1 < len(majority):
                header, path = odd[0]
                raise SourceError(
                    f"{path}: Rows × Columns {header.Rows} × {header.Columns} differ from the other "
                    f"{len(majority)} files of its series ({size[0]} × {size[1]}); remove the file or fix its header"
                )
    sizes: dict[str, list[str]] = defaultdict(list)
    for key in groups:
        if key.startswith("for:"):
            sizes[key.rpartition("|")[0]].append(key)
    for keys in sizes.values():
        if len(keys) < 2:
            continue
        common = max(keys, key=lambda k: len(groups[k]))
        for key in keys:
            if key != common and len(groups[key]) == 1 < len(groups[common]):
                header, path = groups[key][0]
                rows, cols = common.rpartition("|")[2].split("x")
                raise SourceError(
                    f"{path}: Rows × Columns {header.Rows} × {header.Columns} differ from the other "
                    f"{len(groups[common])} files of its series ({rows} × {cols}); remove the file or fix its header"
                )


def _header_orientation(header: pydicom.Dataset, path: str) -> str:
    value = _orientation(header, None, _first(header.get("SharedFunctionalGroupsSequence")))
    try:
        orientation = _numbers(value, 6, path, "ImageOrientationPatient")
    except SourceError:
        return "unreadable"  # _frames names the file and the problem
    return ",".join(f"{v:.4f}" for v in orientation) if orientation is not None else "none"


def _by_orientation(
    key: str, members: list[tuple[pydicom.Dataset, str]]
) -> list[tuple[str, list[tuple[pydicom.Dataset, str]]]]:
    """One group's files split by orientation. Without series UIDs, planes of one frame of
    reference in several orientations are several series (reformats), each of 2 files or more;
    a single file whose orientation differs from the rest of its series is named as the odd one."""
    buckets: dict[str, list[tuple[pydicom.Dataset, str]]] = defaultdict(list)
    for header, path in members:
        buckets[_header_orientation(header, path)].append((header, path))
    uid_less = key.startswith("for:")
    if len(buckets) > 1:
        common = max(buckets, key=lambda o: len(buckets[o]))
        odd = [o for o in buckets if o != common]
        if not uid_less or any(len(buckets[o]) == 1 for o in odd):
            smallest = min(odd, key=lambda o: len(buckets[o]))
            _, path = buckets[smallest][0]
            raise SourceError(
                f"{path}: ImageOrientationPatient [{_shown(smallest)}] differs from the other "
                f"{len(buckets[common])} files of its series ([{_shown(common)}]); remove the file or fix its header"
            )
    if not uid_less:
        return [(key, members)]
    head, _, size = key.rpartition("|")
    return [(f"{head}|iop:{o}|{size}", group) for o, group in buckets.items()]


def _shown(orientation: str) -> str:
    if orientation in ("none", "unreadable"):
        return orientation
    return ", ".join(f"{float(v):g}" for v in orientation.split(","))


def _series(key: str, members: list[tuple[pydicom.Dataset, str]]) -> Series:
    modalities = sorted({str(h.get("Modality", "")) for h, _ in members})
    if len(modalities) > 1:
        raise SourceError(f"{members[0][1]}: mixed modalities {', '.join(modalities)} in one series ({key})")
    _refuse_copies(key, members)
    for header, path in members:
        check_decoder(header, path)
    frames = [frame for header, path in members for frame in _frames(header, path)]
    positioned = all(f.plane.position is not None for f in frames)
    if not positioned:
        frames = [_stacked(f, k) for k, f in enumerate(frames)]
    try:
        order, geometry = order_planes([f.plane for f in frames])
    except GeometryError as exc:
        folder = str(Path(members[0][1]).parent)
        raise SourceError(f"{folder}: series {key}: {exc}") from exc
    header = members[0][0]
    description = str(header.get("SeriesDescription", "") or header.get("StudyDescription", "") or "")
    return Series(key, modalities[0], tuple(frames[i] for i in order), geometry, description, positioned)


def _refuse_copies(key: str, members: list[tuple[pydicom.Dataset, str]]) -> None:
    """The same image twice (a copied file: same SOP Instance UID) is named as such, not as two
    frames that happen to share a position."""
    seen: dict[str, str] = {}
    for header, path in members:
        uid = str(header.get("SOPInstanceUID", "") or header.file_meta.get("MediaStorageSOPInstanceUID", "") or "")
        if not uid:
            continue
        if uid in seen:
            raise SourceError(
                f"{path}: the same image as {seen[uid]} (SOP Instance UID {uid}, series {key}); remove the copy"
            )
        seen[uid] = path


def _stacked(frame: Frame, k: int) -> Frame:
    """A frame without patient geometry, placed k mm along z of an identity frame."""
    plane = PlaneGeometry(
        (0.0, 0.0, float(k)),
        (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        frame.plane.pixel_spacing,
        frame.plane.rows,
        frame.plane.columns,
    )
    return Frame(frame.path, frame.index, frame.slope, frame.intercept, plane, frame.spacing_stated)


def check_decoder(header: pydicom.Dataset, path: str) -> None:
    """Fail before any work when a frame's transfer syntax has no decoder installed."""
    from pydicom.pixels import get_decoder

    syntax = header.file_meta.TransferSyntaxUID
    if not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise SourceError(f"{path}: transfer syntax {syntax.name} ({syntax}) is not supported by pydicom") from exc
    if not decoder.is_available:
        package = _DECODER_PACKAGES.get(str(syntax), "a pydicom pixel-data plugin")
        raise SourceError(f"{path}: no decoder installed for {syntax.name} ({syntax}); install {package}")


def _frames(header: pydicom.Dataset, path: str) -> list[Frame]:
    count = int(header.get("NumberOfFrames", 1) or 1)
    shared = _first(header.get("SharedFunctionalGroupsSequence"))
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) != count:
        raise SourceError(f"{path}: NumberOfFrames is {count} but there are {len(per_frame)} per-frame groups")
    frames = []
    for index in range(count):
        group = per_frame[index] if per_frame is not None else None
        position = _numbers(
            _group_value(group, shared, "PlanePositionSequence", "ImagePositionPatient", header),
            3, path, "ImagePositionPatient",
        )  # fmt: skip
        orientation = _numbers(_orientation(header, group, shared), 6, path, "ImageOrientationPatient")
        if orientation is not None and min(math.hypot(*orientation[:3]), math.hypot(*orientation[3:])) < 1e-3:
            raise SourceError(f"{path}: ImageOrientationPatient has a zero direction ({_shown_numbers(orientation)})")
        spacing = _numbers(
            _group_value(group, shared, "PixelMeasuresSequence", "PixelSpacing", header),
            2, path, "PixelSpacing", positive=True,
        )  # fmt: skip
        slope = _group_value(group, shared, "PixelValueTransformationSequence", "RescaleSlope", header)
        intercept = _group_value(group, shared, "PixelValueTransformationSequence", "RescaleIntercept", header)
        plane = PlaneGeometry(
            position=tuple(float(v) for v in position) if position is not None and orientation else None,  # type: ignore[arg-type]
            orientation=tuple(orientation or (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)),  # type: ignore[arg-type]
            pixel_spacing=tuple(float(v) for v in (spacing or (1.0, 1.0))),  # type: ignore[arg-type]
            rows=int(header.Rows),
            columns=int(header.Columns),
        )
        frames.append(
            Frame(
                path=path if split_s3(path) is not None else str(Path(path).absolute()),
                index=index if count > 1 else None,
                slope=_one_number(slope, 1.0, path, "RescaleSlope"),
                intercept=_one_number(intercept, 0.0, path, "RescaleIntercept"),
                plane=plane,
                spacing_stated=spacing is not None,
            )
        )
    return frames


def _orientation(header: pydicom.Dataset, group: Any, shared: Any) -> Any:
    return _group_value(group, shared, "PlaneOrientationSequence", "ImageOrientationPatient", header)


def _numbers(value: Any, count: int, path: str, keyword: str, *, positive: bool = False) -> list[float] | None:
    """A header's multi-valued number (a position, an orientation, a spacing) checked: ``count``
    finite numbers (positive ones for spacings), or one line naming the file and the attribute."""
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    try:
        numbers = [float(v) for v in items]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != count or not all(math.isfinite(v) and (v > 0 or not positive) for v in numbers):
        kind = "positive finite numbers" if positive else "finite numbers"
        raise SourceError(f"{path}: {keyword} must be {count} {kind}, found [{_shown_numbers(items)}]")
    return numbers


def _one_number(value: Any, default: float, path: str, keyword: str) -> float:
    numbers = _numbers(value, 1, path, keyword)
    return numbers[0] if numbers is not None else default


def _shown_numbers(items: Any) -> str:
    text = ", ".join(str(v) for v in list(items)[:8])
    return text if len(text) <= 80 else text[:79] + "…"


def _first(sequence: Any) -> Any:
    return sequence[0] if sequence else None


def _group_value(group: Any, shared: Any, sequence: str, keyword: str, header: pydicom.Dataset) -> Any:
    """A functional-group attribute: per-frame first, then shared, then the top level."""
    for source in (group, shared):
        if source is not None and sequence in source and source[sequence].value:
            item = source[sequence].value[0]
            if keyword in item:
                return item[keyword].value
    return header.get(keyword)


def decode_frames(frames: Iterable[Frame]) -> np.ndarray:
    """Decode frames to rescaled values (HU for CT) as float32 ``(n, rows, cols)``.

    Each file is read once however many of its frames are asked for.
    """
    by_file: dict[str, list[tuple[int, Frame]]] = defaultdict(list)
    frames = list(frames)
    for position, frame in enumerate(frames):
        by_file[frame.path].append((position, frame))
    out = np.empty((len(frames), frames[0].plane.rows, frames[0].plane.columns), dtype=np.float32)
    for path, members in by_file.items():
        pixels = _pixels(path)
        for position, frame in members:
            raw = pixels[frame.index] if frame.index is not None else pixels
            out[position] = raw.astype(np.float64) * frame.slope + frame.intercept
    return out


def _pixels(path: str) -> np.ndarray:
    with warnings.catch_warnings(record=True) as caught:  # pydicom warns, then fails, on a cut file
        warnings.simplefilter("always")
        try:
            dataset = read_dataset(path)
            return np.asarray(dataset.pixel_array)
        except Exception as exc:  # pydicom and its plugins raise many types for broken pixel data
            if any("End of file reached" in str(w.message) for w in caught):
                raise SourceError(f"{path}: cannot decode pixel data: the file is truncated") from exc
            size = _size_mismatch(dataset) if "dataset" in locals() else None
            if size:
                raise SourceError(f"{path}: cannot decode pixel data: {size}") from exc
            message = one_line(exc, 200)
            raise SourceError(f"{path}: cannot decode pixel data ({message})") from exc


def _size_mismatch(ds: pydicom.Dataset) -> str | None:
    """For native (uncompressed) pixel data: the header's arithmetic against the bytes there are."""
    if ds.file_meta.TransferSyntaxUID.is_compressed or "PixelData" not in ds:
        return None
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples, bits = int(ds.get("SamplesPerPixel", 1)), int(ds.BitsAllocated)
        expected = int(ds.Rows) * int(ds.Columns) * samples * frames * bits // 8
    except (AttributeError, TypeError, ValueError):
        return None
    actual = len(ds.PixelData)
    if actual >= expected:
        return None
    return (
        f"PixelData holds {actual} bytes, but Rows × Columns × BitsAllocated/8 "
        f"({ds.Rows} × {ds.Columns} × {bits}/8{f' × {frames} frames' if frames > 1 else ''}) make {expected}; "
        "BitsAllocated or the image size in the header is wrong"
    )


@dataclass(frozen=True)
class DicomFrameSource:
    """A single-frame DICOM image read as a 2-D image: ``(samples, rows, cols)`` rescaled values."""

    frame: Frame

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.frame.path,)

    @property
    def bands(self) -> tuple[int, ...]:
        return tuple(range(1, samples_per_pixel(self.frame.path) + 1))

    def read(self, box: Box, *, cache: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
        pixels = _pixels(self.frame.path)
        raw = pixels[self.frame.index] if self.frame.index is not None else pixels
        planes = raw[None] if raw.ndim == 2 else np.moveaxis(raw, -1, 0)  # colour: (rows, cols, samples)
        values = planes.astype(np.float64) * self.frame.slope + self.frame.intercept
        window = values[(slice(None), *box.slices())].astype(np.float32)
        return window, np.ones(box.shape, dtype=bool)


def samples_per_pixel(path: str) -> int:
    return int(read_dataset(path, stop_before_pixels=True).get("SamplesPerPixel", 1) or 1)
