"""Rasters through rasterio/GDAL: one file of any band count, or single-band files stacked as bands.

A ``RasterSource`` is a small picklable description (paths and band numbers). Ray read tasks
receive it and open the files themselves, so pixels are read where they are used and never
pass through the driver. Validity comes from GDAL's per-band masks, which already merge nodata
values, internal masks and alpha bands; a pixel is valid only if every band the model takes is.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.errors import NodataShadowWarning, NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from pipeline.config import SourceConfig
from pipeline.core.geometry import Box
from pipeline.core.georef import Georef
from pipeline.errors import SourceError, SourceNotFound, object_store_problem, one_line

# GDAL's block cache defaults to 5 % of RAM per process; a long tiled read then grows to
# gigabytes. 64 MB holds the blocks that neighbouring windows share (work units are visited in
# small squares, plan.square_order), so each block is decoded about once. It is set through the
# environment, once per process, before GDAL's first read: ``rasterio.Env(GDAL_CACHEMAX=...)``
# around each read measured 20x slower here (every read decoded its blocks again).
GDAL_CACHEMAX_MB = 64
os.environ.setdefault("GDAL_CACHEMAX", str(GDAL_CACHEMAX_MB))
_REMOTE_PREFIXES = ("/vsi", "s3://", "gs://", "http://", "https://", "az://")


def is_remote(path: str) -> bool:
    return path.startswith(_REMOTE_PREFIXES)


@dataclass(frozen=True)
class RasterInfo:
    shape: tuple[int, int]
    bands: int
    dtypes: tuple[str, ...]
    georef: Georef
    nodata: tuple[float | None, ...]


@dataclass(frozen=True)
class RasterSource:
    """Selected bands of one raster, or of a stack of single-band rasters on one grid."""

    paths: tuple[str, ...]
    bands: tuple[int, ...]  # 1-based numbers in the file (or positions in the stack)

    @property
    def label(self) -> str:
        return self.paths[0] if len(self.paths) == 1 else f"{self.paths[0]} (+{len(self.paths) - 1} band files)"

    def read(self, box: Box, *, cache: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pixels of ``box`` (inside the image) as ``(bands, h, w)`` in the file's dtype (float32 when
        band files differ) and validity ``(h, w)``.

        ``cache`` keeps datasets open between calls (one dict per thread: a GDAL dataset handle
        must not be shared by threads); without it each call opens and closes the files.
        """
        (row0, col0), (rows, cols) = box.start, box.shape
        window = Window(col0, row0, cols, rows)  # type: ignore[call-arg]
        if len(self.paths) == 1:
            data, valid = _read(self.paths[0], list(self.bands), window, cache)
        else:
            parts = [_read(self.paths[b - 1], [1], window, cache) for b in self.bands]
            data = np.concatenate([p[0] for p in parts])
            valid = np.concatenate([p[1] for p in parts])
        return data, np.asarray(np.all(valid, axis=0))

    def fingerprint(self) -> str:
        """Content hash of local files (path-independent); of S3 objects, their ETag and size (read
        from the object's metadata, never by downloading it); other remote paths by name."""
        from pipeline.sources.remote import object_identity, split_s3

        digest = hashlib.sha256()
        for path in self.paths:
            if split_s3(path) is not None and importlib.util.find_spec("obstore") is not None:
                digest.update(object_identity(path).encode())
                continue
            if is_remote(path):
                digest.update(path.encode())
                continue
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        digest.update(repr(self.bands).encode())
        return digest.hexdigest()[:16]


def open_raster(path: str) -> rasterio.DatasetReader:
    """Open a raster; plain images (PNG, JPEG) have no georeference, which is fine here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path)


def _read(path: str, bands: list[int], window: Window, cache: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray]:
    """Values and per-band validity ``(bands, h, w)`` of one file.

    With a ``cache`` the caller is a worker thread: it must not touch the warning filters (they
    are process-wide and not thread-safe); the worker set them once for its process (WORKER_QUIET).
    """
    try:
        if cache is None:
            with open_raster(path) as src, warnings.catch_warnings():
                for category in WORKER_QUIET:
                    warnings.simplefilter("ignore", category)
                return _read_open(src, bands, window)
        src = cache.get(path)
        if src is None:
            src = cache[path] = rasterio.open(path)
        return _read_open(src, bands, window)
    except RasterioError as exc:
        rows = f"{window.row_off}-{window.row_off + window.height}"
        cols = f"{window.col_off}-{window.col_off + window.width}"
        raise SourceError(
            f"{path}: cannot read rows {rows}, columns {cols}: the file is truncated or corrupt ({_cause(exc)})"
        ) from exc


def _cause(exc: BaseException) -> str:
    """GDAL's own words: rasterio's "Read failed. See previous exception" wraps them in its cause."""
    while exc.__cause__ is not None or (exc.__context__ is not None and "previous exception" in str(exc)):
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return _short(exc)


# Warnings a read may raise that raymask handles itself: a plain image has no georeference (the
# summary says statistics are in pixels), and a nodata value shadows an alpha band (GDAL's rule;
# open_source notes it once per job instead of once per window).
WORKER_QUIET: tuple[type[Warning], ...] = (NotGeoreferencedWarning, NodataShadowWarning)


def _read_open(src: rasterio.DatasetReader, bands: list[int], window: Window) -> tuple[np.ndarray, np.ndarray]:
    """GDAL's per-band masks, computed here where that is the same thing and cheaper.

    A band whose only mask is "all valid" needs no mask read; an integer band whose only mask
    is its nodata value is valid where the value differs (GDAL's own rule for integer types,
    without decoding the window a second time). Anything else (alpha bands, internal masks,
    float nodata with its NaN rules) is GDAL's ``read_masks``.
    """
    data = src.read(bands, window=window)
    flags = [src.mask_flag_enums[b - 1] for b in bands]
    if all(f == [MaskFlags.all_valid] for f in flags):
        return data, np.ones(data.shape, dtype=bool)
    nodata = [src.nodatavals[b - 1] for b in bands]
    if all(f == [MaskFlags.nodata] for f in flags) and all(_fits(v, data.dtype) for v in nodata):
        return data, data != np.asarray(nodata, dtype=data.dtype).reshape(-1, 1, 1)
    return data, src.read_masks(bands, window=window) > 0


def _fits(value: float | None, dtype: np.dtype) -> bool:
    """Whether ``value`` is an integer that ``dtype`` (an integer type) holds exactly."""
    if value is None or not np.issubdtype(dtype, np.integer) or not float(value).is_integer():
        return False
    info = np.iinfo(dtype)
    return bool(info.min <= value <= info.max)


def shadowed_alpha(path: str) -> bool:
    """Whether GDAL takes validity from the nodata value although the file also has an alpha band."""
    with open_raster(path) as src:
        return src.nodata is not None and ColorInterp.alpha in src.colorinterp


def open_source(config: SourceConfig) -> tuple[RasterSource, RasterInfo]:
    """Check the input and describe it; errors name the file and what is wrong."""
    paths = config.paths
    infos = [_describe(p) for p in paths]
    first = infos[0]
    if len(paths) > 1:
        for path, info in zip(paths, infos):
            if info.bands != 1:
                raise SourceError(f"{path}: a band file must have 1 band, it has {info.bands}")
            if (info.shape, info.georef) != (first.shape, first.georef):
                raise SourceError(
                    f"{path}: not on the grid of {paths[0]} "
                    f"(shape {info.shape} vs {first.shape}, transform {info.georef.transform} vs "
                    f"{first.georef.transform}, same CRS: {info.georef.crs_wkt == first.georef.crs_wkt})"
                )
    available = len(paths) if len(paths) > 1 else first.bands
    bands = tuple(config.bands) if config.bands else tuple(range(1, available + 1))
    for band in bands:
        if band > available:
            raise SourceError(
                f"{paths[0]}: band {band} requested, but the {'stack' if len(paths) > 1 else 'file'} has {available}"
            )
    for path, band in _files_and_bands(paths, bands):
        _check_band_values(path, band, infos[paths.index(path)])
    if len(paths) > 1:
        dtypes = tuple(infos[b - 1].dtypes[0] for b in bands)
        nodata = tuple(infos[b - 1].nodata[0] for b in bands)
    else:
        dtypes = tuple(first.dtypes[b - 1] for b in bands)
        nodata = tuple(first.nodata[b - 1] for b in bands)
    info = RasterInfo(shape=first.shape, bands=len(bands), dtypes=dtypes, georef=first.georef, nodata=nodata)
    # Absolute, because Ray workers do not share the driver's current directory.
    absolute = tuple(p if is_remote(p) else str(Path(p).absolute()) for p in paths)
    return RasterSource(paths=absolute, bands=bands), info


def _files_and_bands(paths: tuple[str, ...], bands: tuple[int, ...]) -> list[tuple[str, int]]:
    """(file, band in that file) for each selected band: a stack of band files has band 1 of each."""
    return [(paths[b - 1], 1) for b in bands] if len(paths) > 1 else [(paths[0], b) for b in bands]


def _check_band_values(path: str, band: int, info: RasterInfo) -> None:
    """Refuse bands whose numbers are not measurements a model can take."""
    dtype = info.dtypes[band - 1]
    if dtype.startswith("complex"):
        raise SourceError(
            f"{path}: {dtype} values (band {band}); raymask segments real values: take the amplitude first "
            "(e.g. gdal_translate -ot Float32 with a VRT pixel function 'mod')"
        )
    with open_raster(path) as src:
        if src.colorinterp[band - 1] == ColorInterp.palette:
            raise SourceError(
                f"{path}: band {band} holds palette indices (a colour table), not measurements; "
                "expand it to colour bands first: gdal_translate -expand rgb"
            )


ZIP_MAGIC = b"PK\x03\x04"


def _describe(path: str) -> RasterInfo:
    if not is_remote(path):
        if not Path(path).exists():
            raise SourceNotFound(f"{path}: file not found")
        if Path(path).is_dir():
            raise SourceError(f"{path}: is a directory, expected a raster file")
        if not os.access(path, os.R_OK):
            raise SourceError(f"{path}: not readable (permission denied)")
        with open(path, "rb") as head:
            if head.read(4) == ZIP_MAGIC:
                raise SourceError(
                    f"{path}: a zip archive; give a raster inside it as /vsizip/{Path(path).absolute()}/MEMBER.tif, "
                    "or unzip a DICOM study and give its folder"
                )
    try:
        with open_raster(path) as src, warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            for member in src.files[1:]:  # a VRT's sources (GDAL opens them only when read)
                if not is_remote(member) and not Path(member).exists():
                    raise SourceError(f"{path}: member {member} not found")
            gt = src.transform.to_gdal() if not src.transform.is_identity else None
            crs = src.crs.to_wkt() if src.crs else None
            return RasterInfo(
                shape=(src.height, src.width),
                bands=src.count,
                dtypes=tuple(src.dtypes),
                georef=Georef(crs_wkt=crs, transform=gt),
                nodata=tuple(src.nodatavals),
            )
    except RasterioError as exc:
        problem = object_store_problem(exc) if str(path).startswith(("s3://", "/vsis3/")) else None
        if problem is not None:  # the object store refused, not the file
            raise SourceError(f"{path}: {problem} ({_short(exc)})") from exc
        raise SourceError(f"{path}: not a raster GDAL can read ({_short(exc)})") from exc


def _short(exc: BaseException) -> str:
    text = one_line(exc)
    return text if len(text) < 160 else text[:157] + "..."
