"""Open a job's input, whatever it is: a raster (or band files) or a DICOM series.

Either way the result is a picklable source that Ray read tasks call with a box, and an
``InputInfo`` that says what the driver needs: the shape, the band count, and the georeference
(images) or the patient-space geometry (volumes). A DICOM series is read from the store's
``image`` array after it has been ingested, so its source points into the output store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.config import SourceConfig
from pipeline.core.geometry import Box
from pipeline.core.georef import Georef
from pipeline.core.volume import VolumeGeometry
from pipeline.errors import SourceError
from pipeline.sources.dicom import DicomFrameSource, Series, discover
from pipeline.sources.geotiff import is_remote, open_source, shadowed_alpha
from pipeline.sources.store_array import StoreArraySource
from pipeline.store import VOLUME_IMAGE


class Source(Protocol):
    @property
    def paths(self) -> tuple[str, ...]: ...

    @property
    def bands(self) -> tuple[int, ...]: ...

    def read(self, box: Box, *, cache: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(bands, *box.shape)`` values (the source's dtype) and ``box.shape`` validity.

        ``cache``: a dict private to the calling thread where the source may keep files open.
        """
        ...


@dataclass(frozen=True)
class InputInfo:
    shape: tuple[int, ...]
    bands: int
    dtypes: tuple[str, ...]
    georef: Georef
    volume: VolumeGeometry | None = None
    series: Series | None = None  # a DICOM series to ingest (volumes only)
    pixel_area_mm2: float | None = None  # 2-D DICOM images whose PixelSpacing is stated
    modality: str | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class OpenedInput:
    source: Source
    info: InputInfo
    fingerprint: str


def open_input(config: SourceConfig, *, store_path: Any) -> OpenedInput:
    if _is_dicom(config):
        return _open_dicom(config, store_path)
    source, info = open_source(config)
    notes = tuple(
        f"{path}: its nodata value shadows its alpha band; validity comes from the nodata value (GDAL's rule)"
        for path in dict.fromkeys(source.paths)
        if not is_remote(path) and shadowed_alpha(path)
    )
    opened = InputInfo(shape=info.shape, bands=info.bands, dtypes=info.dtypes, georef=info.georef, notes=notes)
    return OpenedInput(source=source, info=opened, fingerprint=source.fingerprint())


def _open_dicom(config: SourceConfig, store_path: Any) -> OpenedInput:
    if config.bands not in (None, [1]):
        raise SourceError(f"{config.paths[0]}: a DICOM series has one band; source.bands {config.bands} does not apply")
    found, notes = discover(list(config.paths))
    if len(found) > 1:
        listed = "; ".join(f"{s.key} ({s.modality}, {len(s.frames)} frames)" for s in found)
        raise SourceError(f"{config.paths[0]}: {len(found)} series found, give one (its folder or files): {listed}")
    series = found[0]
    if len(series.frames) == 1:
        return _open_dicom_image(series, notes)
    if not series.positioned:
        notes.append("no patient positions in the files: frames are stacked in file order, 1 mm apart")
    info = InputInfo(
        shape=series.geometry.shape,
        bands=1,
        dtypes=("float32",),
        georef=Georef(None, None),
        volume=series.geometry,
        series=series,
        modality=series.modality,
        notes=tuple(notes),
    )
    source = StoreArraySource(store=str(store_path), array=VOLUME_IMAGE)
    return OpenedInput(source=source, info=info, fingerprint=series.fingerprint())


def _open_dicom_image(series: Series, notes: list[str]) -> OpenedInput:
    """One frame: a 2-D image, with areas in mm² when the file states its pixel spacing."""
    frame = series.frames[0]
    source = DicomFrameSource(frame)
    dr, dc = frame.plane.pixel_spacing
    if not frame.spacing_stated:
        notes.append("the file states no PixelSpacing: statistics are in pixels only")
    info = InputInfo(
        shape=(frame.plane.rows, frame.plane.columns),
        bands=len(source.bands),
        dtypes=("float32",),
        georef=Georef(None, None),
        pixel_area_mm2=dr * dc if frame.spacing_stated else None,
        modality=series.modality,
        notes=tuple(notes),
    )
    return OpenedInput(source=source, info=info, fingerprint=series.fingerprint())


def _is_dicom(config: SourceConfig) -> bool:
    if config.kind != "auto":
        return config.kind == "dicom"
    first = config.paths[0]
    if is_remote(first):  # an s3:// prefix ending in "/" is a DICOM study or series folder
        if first.startswith("s3://") and first.endswith("/"):
            return True
        from pipeline.sources.remote import is_dicom_object

        return first.startswith("s3://") and is_dicom_object(first)
    path = Path(first)
    if path.is_dir():
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False  # the raster path reports a missing or unreadable file in its own words
