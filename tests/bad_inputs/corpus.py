"""The bad-input corpus: every case, how it is made, and what raymask must answer.

Each case builds its inputs in an empty folder ``d`` (inputs under ``d/in``, the job's store at
``d/out.zarr``) and returns the command line it runs; ``tests/test_bad_input_corpus.py`` runs it
through the installed CLI in a subprocess and checks the answer: the exit status, one line on
stderr holding every expected fragment (``{d}`` stands for the case folder), no traceback, no
store left complete that should not be, and every input byte unchanged.

Some "bad" inputs are legitimate imagery a mature tool must simply handle (1 x 1 pixels,
200 bands, complex-free odd dtypes, a VRT mosaic, a zipped GeoTIFF): those expect exit 0 and a
complete store. ``python -m tests.bad_inputs.corpus`` rewrites the table in README.md.
"""

from __future__ import annotations

import functools
import json
import shutil
import struct
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
S2 = ROOT / "data" / "sentinel2" / "sen2_20210527_aber_subset.tif"
CT_SERIES = ROOT / "data" / "dicom" / "ct_series"
EDGE = ROOT / "data" / "dicom" / "edge_cases"

Build = Callable[[Path], list[str]]


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    how: str
    build: Build
    expect: tuple[str, ...]  # fragments of the one error line; for exit 0, of stdout
    exit: int = 1
    complete: bool = False  # exit 0 cases: the store must be complete
    store: str = "out.zarr"  # where the job's store goes, under d
    root_only: bool = False  # needs mount(2): skipped when not root
    env: dict[str, str] = field(default_factory=dict)
    check: Callable[[Path], None] | None = None  # more to check afterwards, given d

    @property
    def expected(self) -> str:
        if self.exit == 0:
            return (
                "runs" + (": complete store" if self.complete else "") + (f"; {self.expect[0]}" if self.expect else "")
            )
        return " … ".join(self.expect)


CASES: list[Case] = []


def case(name: str, group: str, how: str, *expect: str, exit: int = 1, **kw: object) -> Callable[[Build], Build]:
    def register(build: Build) -> Build:
        CASES.append(Case(name, group, how, build, tuple(expect), exit, **kw))  # type: ignore[arg-type]
        return build

    return register


# -- helpers ------------------------------------------------------------------------------------


def inputs(d: Path) -> Path:
    (d / "in").mkdir(parents=True, exist_ok=True)
    return d / "in"


def geotiff(path: Path, data: np.ndarray, *, crs: str | None = "EPSG:32630", transform=None, **profile) -> Path:  # type: ignore[no-untyped-def]
    import rasterio
    from affine import Affine

    bands, rows, cols = data.shape
    kw = {
        "driver": "GTiff",
        "height": rows,
        "width": cols,
        "count": bands,
        "dtype": data.dtype.name,
        "transform": transform or Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5800000.0),
    }
    if crs:
        kw["crs"] = crs
    kw.update(profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **kw) as dst:
        dst.write(data)
    return path


def red_nir(rows: int = 96, cols: int = 96, dtype: str = "uint16", seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 200, (2, rows, cols)).astype(dtype)


def job(d: Path, source: object, *, model: object = None, tiling: object = None, **extra: object) -> list[str]:
    config = {
        "source": source if isinstance(source, dict) else {"path": str(source)},
        "model": model or {"kind": "ndvi", "red": 1, "nir": 2},
        "tiling": tiling or {"chunk": 64, "halo": 0},
        "output": {"path": str(d / "out.zarr"), "preview": False},
        **extra,
    }
    path = d / "job.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return ["run", str(path)]


def raw_job(d: Path, text: str) -> list[str]:
    path = d / "job.yaml"
    path.write_text(text)
    return ["run", str(path)]


def set_tiff_tag(path: Path, tag: int, value: int) -> None:
    """Rewrite one SHORT/LONG tag of the first IFD of a little-endian classic TIFF in place."""
    data = bytearray(path.read_bytes())
    assert data[:4] == b"II*\x00"
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for i in range(count):
        entry = ifd + 2 + 12 * i
        t, kind = struct.unpack_from("<HH", data, entry)
        if t == tag:
            struct.pack_into("<H" if kind == 3 else "<I", data, entry + 8, value)
            path.write_bytes(bytes(data))
            return
    raise KeyError(tag)


def series(d: Path) -> Path:
    folder = inputs(d) / "series"
    shutil.copytree(CT_SERIES, folder)
    return folder


def slices(folder: Path) -> list[Path]:
    """The series' files ordered along the slice normal (z here)."""
    import pydicom

    return sorted(
        folder.iterdir(), key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
    )


def edit(path: Path, **values: object) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def ct_job(d: Path, source: object) -> list[str]:
    chunk = [10, 256, 256] if Path(str(source)).is_dir() else 256  # one file: a 2-D image
    return job(d, source, model={"kind": "hu-tissue"}, tiling={"chunk": chunk})


def scripted(d: Path, module: object, name: str = "model.pt") -> Path:
    import torch

    path = inputs(d) / name
    torch.jit.save(torch.jit.script(module), str(path))
    return path


def torch_job(d: Path, model: Path, classes: int = 2, *, tiling: object = None, **model_keys: object) -> list[str]:
    image = geotiff(inputs(d) / "scene.tif", red_nir(128, 128, "float32"))
    spec = {"kind": "torchscript", "path": str(model), "classes": [f"c{i}" for i in range(classes)], "stride": 1}
    return job(
        d, {"path": str(image), "bands": [1, 2]}, model={**spec, **model_keys}, tiling=tiling,
        runtime={"batch_size": 1},
    )  # fmt: skip


def made_store(d: Path) -> Path:
    """A copy, under d/in, of one small complete store of real Sentinel-2 data made through the CLI."""
    store = inputs(d) / "aber.zarr"
    shutil.copytree(_template_store(), store)
    return store


@functools.cache
def _template_store() -> Path:
    import subprocess
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="raymask-corpus-store-"))
    argv = job(d, {"path": str(S2), "bands": [3, 8]})
    subprocess.run([sys.executable, "-m", "pipeline.cli", *argv, "--no-progress", "--set", "runtime.engine=process"],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)  # fmt: skip
    return d / "out.zarr"


# -- rasters ------------------------------------------------------------------------------------


@case("raster-zero-bytes", "raster", "an empty file named scene.tif", "scene.tif: not a raster GDAL can read")
def _(d: Path) -> list[str]:
    (inputs(d) / "scene.tif").write_bytes(b"")
    return job(d, inputs(d) / "scene.tif")


@case("raster-text", "raster", "a text file named scene.tif", "scene.tif: not a raster GDAL can read")
def _(d: Path) -> list[str]:
    (inputs(d) / "scene.tif").write_text("band1,band2\n1,2\n")
    return job(d, inputs(d) / "scene.tif")


@case(
    "raster-wrong-magic",
    "raster",
    "a GeoTIFF whose first four bytes are overwritten",
    "scene.tif: not a raster GDAL can read",
)
def _(d: Path) -> list[str]:
    path = geotiff(inputs(d) / "scene.tif", red_nir())
    path.write_bytes(b"XX\x2a\x00" + path.read_bytes()[4:])
    return job(d, path)


@case(
    "raster-truncated-header", "raster", "a GeoTIFF cut to its first 100 bytes", "scene.tif: not a raster GDAL can read"
)
def _(d: Path) -> list[str]:
    path = geotiff(inputs(d) / "scene.tif", red_nir())
    path.write_bytes(path.read_bytes()[:100])
    return job(d, path)


@case("raster-truncated-mid-tile", "raster", "a tiled 512² DEFLATE GeoTIFF cut in the middle of its tiles",
      "scene.tif: cannot read", "truncated or corrupt")  # fmt: skip
def _(d: Path) -> list[str]:
    path = geotiff(
        inputs(d) / "scene.tif", red_nir(512, 512), tiled=True, blockxsize=128, blockysize=128, compress="deflate"
    )
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 6 // 10])
    return job(d, path)


@case("raster-corrupt-tile", "raster", "a tiled DEFLATE GeoTIFF with one tile's bytes overwritten by noise",
      "scene.tif: cannot read", "truncated or corrupt")  # fmt: skip
def _(d: Path) -> list[str]:
    path = geotiff(
        inputs(d) / "scene.tif", red_nir(256, 256), tiled=True, blockxsize=128, blockysize=128, compress="deflate"
    )
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return job(d, path)


@case("raster-zero-width", "raster", "a 0 × 64 GeoTIFF (ImageWidth tag patched to 0)", "scene.tif:")
def _(d: Path) -> list[str]:
    path = geotiff(inputs(d) / "scene.tif", red_nir(64, 8))
    set_tiff_tag(path, 256, 0)
    return job(d, path)


@case("raster-zero-height", "raster", "a 64 × 0 GeoTIFF (ImageLength tag patched to 0)", "scene.tif:")
def _(d: Path) -> list[str]:
    path = geotiff(inputs(d) / "scene.tif", red_nir(8, 64))
    set_tiff_tag(path, 257, 0)
    return job(d, path)


@case("raster-1x1", "raster", "a 1 × 1 two-band GeoTIFF", exit=0, complete=True)
def _(d: Path) -> list[str]:
    return job(d, geotiff(inputs(d) / "scene.tif", red_nir(1, 1)))


@case("raster-1x100000", "raster", "a 1 × 100000 strip", exit=0, complete=True)
def _(d: Path) -> list[str]:
    return job(d, geotiff(inputs(d) / "scene.tif", red_nir(1, 100_000)), tiling={"chunk": 1024, "halo": 0})


@case("raster-100000x1", "raster", "a 100000 × 1 column", exit=0, complete=True)
def _(d: Path) -> list[str]:
    return job(d, geotiff(inputs(d) / "scene.tif", red_nir(100_000, 1)), tiling={"chunk": 1024, "halo": 0})


@case("raster-200-bands", "raster", "a 200-band GeoTIFF; bands 3 and 150 selected", exit=0, complete=True)
def _(d: Path) -> list[str]:
    data = np.random.default_rng(0).integers(1, 200, (200, 32, 32)).astype("uint8")
    path = geotiff(inputs(d) / "scene.tif", data, interleave="band")
    return job(d, {"path": str(path), "bands": [3, 150]})


@case("raster-200-bands-band-201", "raster", "the 200-band GeoTIFF with band 201 selected",
      "scene.tif: band 201 requested, but the file has 200")  # fmt: skip
def _(d: Path) -> list[str]:
    data = np.zeros((200, 8, 8), "uint8")
    return job(d, {"path": str(geotiff(inputs(d) / "scene.tif", data, interleave="band")), "bands": [3, 201]})


for _dtype in ("int8", "int16", "uint16", "int32", "uint32", "float32", "float64"):

    @case(f"raster-{_dtype}", "raster", f"a two-band {_dtype} GeoTIFF", exit=0, complete=True)
    def _(d: Path, dtype: str = _dtype) -> list[str]:
        return job(d, geotiff(inputs(d) / "scene.tif", red_nir(64, 64, dtype)))


@case("raster-complex64", "raster", "a two-band complex64 GeoTIFF (SAR-style)",
      "scene.tif: complex64 values", "take the amplitude first")  # fmt: skip
def _(d: Path) -> list[str]:
    data = (red_nir(32, 32, "float32") + 1j).astype("complex64")
    return job(d, geotiff(inputs(d) / "scene.tif", data))


@case("raster-palette", "raster", "a one-band palette (colour-table) GeoTIFF given to NDVI as red and NIR",
      "scene.tif: band 1 holds palette indices", "gdal_translate -expand rgb")  # fmt: skip
def _(d: Path) -> list[str]:
    import rasterio

    path = geotiff(inputs(d) / "scene.tif", np.random.default_rng(0).integers(0, 4, (1, 32, 32)).astype("uint8"))
    with rasterio.open(path, "r+") as dst:
        dst.write_colormap(1, {0: (0, 0, 0, 255), 1: (255, 0, 0, 255), 2: (0, 255, 0, 255), 3: (0, 0, 255, 255)})
    return job(d, {"path": str(path), "bands": [1, 1]})


def mosaic_vrt(path: Path, members: list[Path]) -> Path:
    """A VRT mosaic of GeoTIFFs on one grid, written as gdalbuildvrt would (relative member paths)."""
    import rasterio

    with rasterio.open(members[0]) as first:
        crs, transform, count, dtype = first.crs, first.transform, first.count, first.dtypes[0]
    boxes = []
    for member in members:
        with rasterio.open(member) as src:
            col, row = ~transform * (src.transform.c, src.transform.f)
            boxes.append((member, round(col), round(row), src.width, src.height))
    width = max(c + w for _, c, _, w, _ in boxes)
    height = max(r + h for _, _, r, _, h in boxes)
    gdal_type = {"uint8": "Byte", "uint16": "UInt16", "float32": "Float32"}[dtype]
    bands = []
    for b in range(1, count + 1):
        sources = "".join(
            f'<SimpleSource><SourceFilename relativeToVRT="1">{m.name}</SourceFilename><SourceBand>{b}</SourceBand>'
            f'<SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
            f'<DstRect xOff="{c}" yOff="{r}" xSize="{w}" ySize="{h}"/></SimpleSource>'
            for m, c, r, w, h in boxes
        )
        bands.append(f'<VRTRasterBand dataType="{gdal_type}" band="{b}">{sources}</VRTRasterBand>')
    geo = ", ".join(repr(float(v)) for v in transform.to_gdal())
    path.write_text(
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>{crs.to_wkt()}</SRS>'
        f"<GeoTransform>{geo}</GeoTransform>{''.join(bands)}</VRTDataset>\n"
    )
    return path


def _vrt(d: Path, *, drop: bool = False) -> Path:
    from affine import Affine

    data = red_nir(64, 128)
    left = geotiff(inputs(d) / "left.tif", data[:, :, :64])
    right = geotiff(
        inputs(d) / "right.tif", data[:, :, 64:], transform=Affine(10.0, 0.0, 500640.0, 0.0, -10.0, 5800000.0)
    )
    vrt = mosaic_vrt(inputs(d) / "mosaic.vrt", [left, right])
    if drop:
        right.unlink()
    return vrt


@case("raster-vrt-mosaic", "raster", "a VRT mosaic of two GeoTIFF halves", exit=0, complete=True)
def _(d: Path) -> list[str]:
    return job(d, _vrt(d))


@case("raster-vrt-missing-member", "raster", "the VRT mosaic with one member file deleted",
      "mosaic.vrt: member", "right.tif not found")  # fmt: skip
def _(d: Path) -> list[str]:
    return job(d, _vrt(d, drop=True))


@case("raster-vsizip", "raster", "a GeoTIFF inside a zip, read as /vsizip/scenes.zip/scene.tif", exit=0, complete=True)
def _(d: Path) -> list[str]:
    tif = geotiff(d / "scene.tif", red_nir())
    with zipfile.ZipFile(inputs(d) / "scenes.zip", "w") as z:
        z.write(tif, "scene.tif")
    tif.unlink()
    return job(d, f"/vsizip/{inputs(d)}/scenes.zip/scene.tif")


@case("raster-vsizip-missing-member", "raster", "/vsizip/ naming a member the zip does not hold",
      "scenes.zip/nothing.tif: not a raster GDAL can read", "does not exist")  # fmt: skip
def _(d: Path) -> list[str]:
    tif = geotiff(d / "scene.tif", red_nir())
    with zipfile.ZipFile(inputs(d) / "scenes.zip", "w") as z:
        z.write(tif, "scene.tif")
    return job(d, f"/vsizip/{inputs(d)}/scenes.zip/nothing.tif")


@case("raster-zip-as-source", "raster", "a zip of a GeoTIFF given directly as source.path",
      "scenes.zip: a zip archive", "/vsizip/")  # fmt: skip
def _(d: Path) -> list[str]:
    tif = geotiff(d / "scene.tif", red_nir())
    with zipfile.ZipFile(inputs(d) / "scenes.zip", "w") as z:
        z.write(tif, "scene.tif")
    return job(d, inputs(d) / "scenes.zip")


@case("raster-no-crs", "raster", "a GeoTIFF with a transform but no CRS", exit=0, complete=True)
def _(d: Path) -> list[str]:
    return job(d, geotiff(inputs(d) / "scene.tif", red_nir(), crs=None))


@case("raster-no-georeference", "raster", "a plain TIFF: no CRS, no transform", exit=0, complete=True)
def _(d: Path) -> list[str]:
    import warnings

    from affine import Affine
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():  # what this case is about: rasterio says so when writing it
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return job(d, geotiff(inputs(d) / "scene.tif", red_nir(), crs=None, transform=Affine.identity()))


@case("raster-rotated-projected", "raster", "a rotated grid in a projected CRS (UTM)", exit=0, complete=True)
def _(d: Path) -> list[str]:
    from affine import Affine

    return job(
        d, geotiff(inputs(d) / "scene.tif", red_nir(), transform=Affine(8.0, 6.0, 500000.0, 6.0, -8.0, 5800000.0))
    )


@case("raster-rotated-geographic", "raster", "a rotated grid in lon/lat (EPSG:4326)",
      "scene.tif: geodesic areas need a north-up grid")  # fmt: skip
def _(d: Path) -> list[str]:
    from affine import Affine

    transform = Affine(0.0001, 0.00002, -4.1, 0.00002, -0.0001, 52.4)
    return job(d, geotiff(inputs(d) / "scene.tif", red_nir(), crs="EPSG:4326", transform=transform))


@case("raster-huge-sparse", "raster", "a sparse tiled GeoTIFF declaring 2,000,000 × 2,000,000 pixels in a few KB",
      "scene.tif: declares 2000000 × 2000000", "runtime.max_pixels")  # fmt: skip
def _(d: Path) -> list[str]:
    import rasterio

    path = inputs(d) / "scene.tif"
    with rasterio.open(path, "w", driver="GTiff", width=2_000_000, height=2_000_000, count=2, dtype="uint8",
                       crs="EPSG:32630", transform=rasterio.Affine(10, 0, 500000, 0, -10, 5800000), tiled=True,
                       sparse_ok=True, bigtiff="YES"):  # fmt: skip
        pass
    return job(d, path)


@case("raster-all-nodata", "raster", "a GeoTIFF whose every pixel is nodata", exit=0, complete=True)
def _(d: Path) -> list[str]:
    return job(d, geotiff(inputs(d) / "scene.tif", np.zeros((2, 64, 64), "uint16"), nodata=0))


@case("raster-nan-everywhere", "raster", "a float32 GeoTIFF of NaN with nodata NaN", exit=0, complete=True)
def _(d: Path) -> list[str]:
    return job(d, geotiff(inputs(d) / "scene.tif", np.full((2, 64, 64), np.nan, "float32"), nodata=float("nan")))


@case("raster-folder-of-tiffs", "raster", "source.path a folder of GeoTIFFs (not a DICOM series)",
      "in: no DICOM images found (1 files looked at)")  # fmt: skip
def _(d: Path) -> list[str]:
    geotiff(inputs(d) / "a.tif", red_nir())
    return job(d, inputs(d))


@case("raster-dangling-symlink", "raster", "source.path a symlink to a deleted file", "scene.tif: file not found")
def _(d: Path) -> list[str]:
    (inputs(d) / "scene.tif").symlink_to(d / "gone.tif")
    return job(d, inputs(d) / "scene.tif")


@case("raster-bands-on-other-grids", "raster", "two band files of different sizes", "nir.tif: not on the grid of")
def _(d: Path) -> list[str]:
    a = geotiff(inputs(d) / "red.tif", red_nir(20, 20)[:1])
    b = geotiff(inputs(d) / "nir.tif", red_nir(20, 21)[:1])
    return job(d, {"path": [str(a), str(b)]})


@case("raster-bands-other-crs", "raster", "two band files on the same pixels in different CRSs",
      "nir.tif: not on the grid of")  # fmt: skip
def _(d: Path) -> list[str]:
    a = geotiff(inputs(d) / "red.tif", red_nir(20, 20)[:1])
    b = geotiff(inputs(d) / "nir.tif", red_nir(20, 20)[:1], crs="EPSG:32631")
    return job(d, {"path": [str(a), str(b)]})


# -- DICOM --------------------------------------------------------------------------------------


@case("dicom-gap", "dicom", "the CT series with its 11th slice deleted", "series:", "missing slice")
def _(d: Path) -> list[str]:
    folder = series(d)
    slices(folder)[10].unlink()
    return ct_job(d, folder)


@case("dicom-tilt", "dicom", "every slice's position shifted along y in proportion to z (gantry tilt)",
      "series:", "gantry tilt")  # fmt: skip
def _(d: Path) -> list[str]:
    folder = series(d)
    for i, path in enumerate(slices(folder)):
        import pydicom

        ipp = [float(v) for v in pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient]
        edit(path, ImagePositionPatient=[ipp[0], ipp[1] + 0.5 * i, ipp[2]])
    return ct_job(d, folder)


@case("dicom-odd-orientation", "dicom", "one slice's ImageOrientationPatient edited to sagittal",
      "ImageOrientationPatient [0, 1, 0, 0, 0, -1] differs from the other 19 files of its series")  # fmt: skip
def _(d: Path) -> list[str]:
    folder = series(d)
    edit(slices(folder)[7], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    return ct_job(d, folder)


@case("dicom-mixed-orientation", "dicom", "one SeriesInstanceUID given to all slices, half of them edited to coronal",
      "series/CT.", "differs from the other 10 files of its series")  # fmt: skip
def _(d: Path) -> list[str]:
    import pydicom

    folder = series(d)
    uid = pydicom.uid.generate_uid()
    for k, path in enumerate(slices(folder)):
        edit(path, SeriesInstanceUID=uid, **({"ImageOrientationPatient": [1, 0, 0, 0, 0, -1]} if k >= 10 else {}))
    return ct_job(d, folder)


@case(
    "dicom-duplicate-file",
    "dicom",
    "one slice copied into the folder under another name",
    "copy-of-slice.dcm: the same image as",
    "remove the copy",
)
def _(d: Path) -> list[str]:
    folder = series(d)
    first = slices(folder)[3]
    shutil.copy(first, folder / "copy-of-slice.dcm")
    return ct_job(d, folder)


@case("dicom-two-frames-one-position", "dicom", "two different instances (new SOP UID) at one position",
      "series:", "same position")  # fmt: skip
def _(d: Path) -> list[str]:
    import pydicom

    folder = series(d)
    first = slices(folder)[3]
    shutil.copy(first, folder / "rescan.dcm")
    edit(folder / "rescan.dcm", SOPInstanceUID=pydicom.uid.generate_uid())
    return ct_job(d, folder)


@case("dicom-mixed-series", "dicom", "the CT series plus a second series (another SeriesInstanceUID) in one folder",
      "series:", "2 series")  # fmt: skip
def _(d: Path) -> list[str]:
    import pydicom

    folder = series(d)
    uid = pydicom.uid.generate_uid()
    for path in slices(folder)[:5]:
        edit(path, SeriesInstanceUID=uid)
    return ct_job(d, folder)


@case("dicom-no-pixel-data", "dicom", "one slice with its PixelData element removed", "no pixel data")
def _(d: Path) -> list[str]:
    folder = series(d)
    edit(slices(folder)[5], PixelData=None)
    return ct_job(d, folder)


@case("dicom-bits-allocated", "dicom", "one uncompressed slice claiming BitsAllocated 32 for 16-bit data",
      "693_UNCR.dcm:", "BitsAllocated")  # fmt: skip
def _(d: Path) -> list[str]:
    path = inputs(d) / "693_UNCR.dcm"
    shutil.copy(EDGE / "693_UNCR.dcm", path)
    edit(path, BitsAllocated=32)
    return ct_job(d, path)


@case("dicom-no-decoder", "dicom", "a slice relabelled as MPEG2 video, which no installed decoder reads",
      "693_J2KR.dcm: transfer syntax MPEG2", "is not supported by pydicom")  # fmt: skip
def _(d: Path) -> list[str]:
    import pydicom

    path = inputs(d) / "693_J2KR.dcm"
    shutil.copy(EDGE / "693_J2KR.dcm", path)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no pydicom decoder
    ds.save_as(path, enforce_file_format=True)
    return ct_job(d, path)


@case("dicom-dicomdir", "dicom", "the CT series with a DICOMDIR beside it (as on a CD)", exit=0, complete=True)
def _(d: Path) -> list[str]:
    import pydicom
    from pydicom.dataset import FileMetaDataset

    folder = series(d)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.FileSetID = "RAYMASK"
    ds.DirectoryRecordSequence = []
    ds.save_as(folder / "DICOMDIR", enforce_file_format=True)
    return ct_job(d, folder)


@case("dicom-zip-of-study", "dicom", "a zip of the study folder given as source.path",
      "study.zip: a zip archive", "unzip")  # fmt: skip
def _(d: Path) -> list[str]:
    archive = shutil.make_archive(str(inputs(d) / "study"), "zip", CT_SERIES)
    return ct_job(d, archive)


@case("dicom-truncated-slice", "dicom", "one slice cut to half its size", "cannot decode pixel data")
def _(d: Path) -> list[str]:
    folder = series(d)
    victim = slices(folder)[4]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return ct_job(d, folder)


@case(
    "dicom-rows-differ",
    "dicom",
    "one slice with Rows edited (a different matrix)",
    "Rows × Columns 256 × 512 differ from the other 19 files of its series",
)
def _(d: Path) -> list[str]:
    folder = series(d)
    edit(slices(folder)[2], Rows=256)
    return ct_job(d, folder)


@case("dicom-empty-folder", "dicom", "an empty folder as source.path", "in: no DICOM images found (0 files looked at)")
def _(d: Path) -> list[str]:
    return ct_job(d, inputs(d))


@case("dicom-bad-spacing", "dicom", "one slice's PixelSpacing bytes overwritten with 'abc\\1'", "PixelSpacing")
def _(d: Path) -> list[str]:
    import pydicom

    folder = series(d)
    path = slices(folder)[0]
    spacing = "\\".join(str(v) for v in pydicom.dcmread(path, stop_before_pixels=True)["PixelSpacing"].value)
    data = path.read_bytes()
    assert data.count(spacing.encode()) == 1
    path.write_bytes(data.replace(spacing.encode(), ("abc\\1").ljust(len(spacing)).encode()))
    return ct_job(d, folder)


@case(
    "dicom-mr-with-hu-model",
    "dicom",
    "an MR image given to the HU tissue model",
    "emri_small.dcm: modality MR, but model.kind hu-tissue thresholds CT values",
)
def _(d: Path) -> list[str]:
    path = inputs(d) / "emri_small.dcm"
    shutil.copy(EDGE / "emri_small.dcm", path)
    return ct_job(d, path)


# -- configs ------------------------------------------------------------------------------------


@case("config-empty", "config", "an empty job.yaml", "job.yaml: expected a mapping of sections")
def _(d: Path) -> list[str]:
    return raw_job(d, "")


@case("config-list", "config", "a YAML list instead of a mapping", "job.yaml: expected a mapping of sections")
def _(d: Path) -> list[str]:
    return raw_job(d, "- source\n- model\n")


@case("config-bad-yaml", "config", "unbalanced brackets", "job.yaml: not valid YAML")
def _(d: Path) -> list[str]:
    return raw_job(d, "source: {path: [a.tif\nmodel: {kind: ndvi}\n")


@case("config-not-utf8", "config", "Latin-1 bytes in the file", "job.yaml: cannot read config")
def _(d: Path) -> list[str]:
    (d / "job.yaml").write_bytes("source: {path: sc\xe8ne.tif}\n".encode("latin-1"))
    return ["run", str(d / "job.yaml")]


@case("config-a-folder", "config", "a folder given as the config", "job.yaml: cannot read config")
def _(d: Path) -> list[str]:
    (d / "job.yaml").mkdir()
    return ["run", str(d / "job.yaml")]


@case("config-chunk-a-string", "config", "tiling.chunk: big", "job.yaml: tiling.chunk:", "'big'")
def _(d: Path) -> list[str]:
    return job(d, S2, tiling={"chunk": "big"})


@case("config-bands-a-string", "config", "source.bands: '3,8'", "job.yaml: source.bands:", "'3,8'")
def _(d: Path) -> list[str]:
    return job(d, {"path": str(S2), "bands": "3,8"})


@case("config-band-zero", "config", "source.bands: [0, 8]", "job.yaml: source.bands.0:", "greater than or equal to 1")
def _(d: Path) -> list[str]:
    return job(d, {"path": str(S2), "bands": [0, 8]})


@case(
    "config-model-kind-unknown",
    "config",
    "model.kind: unet3000",
    "job.yaml: model.kind: 'unet3000' is not a model kind (kinds: ndvi",
)
def _(d: Path) -> list[str]:
    return job(d, S2, model={"kind": "unet3000"})


@case("config-model-no-kind", "config", "a model section without kind", "job.yaml: model.kind: required key is missing")
def _(d: Path) -> list[str]:
    return job(d, S2, model={"red": 1})


@case("config-source-a-number", "config", "source: 42", "job.yaml: source:")
def _(d: Path) -> list[str]:
    return raw_job(d, f"source: 42\nmodel: {{kind: ndvi}}\noutput: {{path: {d}/out.zarr}}\n")


@case(
    "config-unknown-section",
    "config",
    "a top-level key 'outputs'",
    "job.yaml: output: required key is missing; unknown key 'outputs'",
)
def _(d: Path) -> list[str]:
    return raw_job(
        d, f"source: {{path: {S2}, bands: [3, 8]}}\nmodel: {{kind: ndvi}}\noutputs: {{path: {d}/out.zarr}}\n"
    )


@case("config-output-empty", "config", "output.path: ''", "job.yaml: output.path:")
def _(d: Path) -> list[str]:
    return raw_job(d, f"source: {{path: {S2}, bands: [3, 8]}}\nmodel: {{kind: ndvi}}\noutput: {{path: ''}}\n")


@case("config-blend-ndvi", "config", "tiling.stitch blend for the per-pixel ndvi model",
      "tiling.stitch blend: model.kind ndvi works pixel by pixel")  # fmt: skip
def _(d: Path) -> list[str]:
    return job(d, {"path": str(S2), "bands": [3, 8]}, tiling={"chunk": 64, "stitch": "blend"})


@case("config-overlap-one", "config", "tiling.overlap: 1 (windows that never move)", "job.yaml: tiling.overlap:",
      "less than 1")  # fmt: skip
def _(d: Path) -> list[str]:
    return job(d, {"path": str(S2), "bands": [3, 8]}, tiling={"chunk": 64, "overlap": 1})


@case("config-probabilities-ndvi", "config", "output.probabilities for the ndvi model (no logits)",
      "output.probabilities: model.kind ndvi gives labels, not logits")  # fmt: skip
def _(d: Path) -> list[str]:
    return raw_job(
        d,
        f"source: {{path: '{S2}', bands: [3, 8]}}\nmodel: {{kind: ndvi}}\n"
        f"output: {{path: '{d}/out.zarr', probabilities: true}}\n",
    )


@case("config-halo-float", "config", "tiling.halo: 8.5", "job.yaml: tiling.halo:", "8.5")
def _(d: Path) -> list[str]:
    return job(d, {"path": str(S2), "bands": [3, 8]}, tiling={"chunk": 64, "halo": 8.5})


@case("config-billion-laughs", "config", "nine levels of YAML aliases, each repeating the last ten times (10⁹ values)",
      "job.yaml: YAML aliases expand to more than")  # fmt: skip
def _(d: Path) -> list[str]:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return raw_job(d, "\n".join(lines) + f"\nsource: {{path: {S2}}}\nmodel: *a9\n")


@case("config-huge", "config", "a 30 MB job.yaml (a comment line repeated)", "job.yaml: config file is", "MB")
def _(d: Path) -> list[str]:
    return raw_job(d, f"source: {{path: {S2}, bands: [3, 8]}}\nmodel: {{kind: ndvi}}\n" + "# padding\n" * 3_000_000)


@case("config-python-tag", "config", "a !!python/object/apply:os.system tag", "job.yaml: not valid YAML")
def _(d: Path) -> list[str]:
    marker = d / "pwned"
    return raw_job(d, f"source: !!python/object/apply:os.system ['touch {marker}']\nmodel: {{kind: ndvi}}\n")


@case("config-duplicate-key", "config", "the model key given twice", "job.yaml:", "duplicate key 'model'")
def _(d: Path) -> list[str]:
    return raw_job(d, f"source: {{path: {S2}, bands: [3, 8]}}\nmodel: {{kind: ndvi}}\nmodel: {{kind: hu-tissue}}\n")


@case("config-set-without-value", "config", "--set tiling.chunk (no '=')", "--set 'tiling.chunk': expected KEY=VALUE")
def _(d: Path) -> list[str]:
    return [*job(d, {"path": str(S2), "bands": [3, 8]}), "--set", "tiling.chunk"]


@case("config-unknown-flag", "config", "raymask run job.yaml --chunk 64", "unrecognized arguments: --chunk", exit=2)
def _(d: Path) -> list[str]:
    return [*job(d, {"path": str(S2), "bands": [3, 8]}), "--chunk", "64"]


@case("config-dotdot-paths", "config", "source.path through '..' (in/sub/../scene.tif)", exit=0, complete=True)
def _(d: Path) -> list[str]:
    geotiff(inputs(d) / "scene.tif", red_nir())
    (inputs(d) / "sub").mkdir()
    return job(d, f"{inputs(d)}/sub/../scene.tif")


@case("config-unicode-and-spaces", "config", "input and output paths with accents, CJK and spaces",
      exit=0, complete=True, store="résultats 结果/out.zarr")  # fmt: skip
def _(d: Path) -> list[str]:
    path = geotiff(inputs(d) / "scène d'été 航拍.tif", red_nir())
    argv = job(d, path)
    return [*argv, "--set", f"output.path={d}/résultats 结果/out.zarr"]


@case("config-output-over-input", "config", "output.path naming the input GeoTIFF itself, with --overwrite",
      "scene.tif: is an input of this job")  # fmt: skip
def _(d: Path) -> list[str]:
    path = geotiff(inputs(d) / "scene.tif", red_nir())
    return [*job(d, path), "--set", f"output.path={path}", "--overwrite"]


# -- models -------------------------------------------------------------------------------------


def _nets():  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    class Conv(nn.Module):
        def __init__(self, bands: int, classes: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(bands, classes, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    class Half(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1, stride=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    class NaNs(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log(x - 1000.0)  # log of a negative number: NaN

    class SomeTiles(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if bool((x[:, 0] > 190).float().mean() > 0.02):
                raise RuntimeError("out of cheese")
            return torch.cat([x[:, :1], -x[:, :1]], dim=1)

    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    return Conv, Half, NaNs, SomeTiles, Pair


@case("model-wrong-band-count", "model", "a TorchScript conv taking 4 bands, given 2",
      "model.pt: the model takes 4 input bands", "the job gives it 2")  # fmt: skip
def _(d: Path) -> list[str]:
    conv = _nets()[0]
    return torch_job(d, scripted(d, conv(4, 2)))


@case("model-wrong-class-count", "model", "a network returning 3 classes where model.classes names 2",
      "model.pt: returns 3 classes", "model.classes names 2")  # fmt: skip
def _(d: Path) -> list[str]:
    conv = _nets()[0]
    return torch_job(d, scripted(d, conv(2, 3)))


@case("model-wrong-spatial-size", "model", "a stride-2 network declared as stride 1",
      "model.pt: returns 32 × 32 for a 64 × 64 window", "upsample in the network")  # fmt: skip
def _(d: Path) -> list[str]:
    return torch_job(d, scripted(d, _nets()[1]()))


@case("model-nan-output", "model", "a network whose logits are NaN", "model.pt: returned NaN or infinite logits")
def _(d: Path) -> list[str]:
    return torch_job(d, scripted(d, _nets()[2]()))


@case("model-raises-on-some-tiles", "model", "a network raising RuntimeError on bright tiles only",
      "model.pt: the model failed on", "out of cheese")  # fmt: skip
def _(d: Path) -> list[str]:
    argv = torch_job(d, scripted(d, _nets()[3]()))
    image = inputs(d) / "scene.tif"
    data = red_nir(128, 128, "float32")
    data[0, 64:, 64:] = 199.0  # one bright tile in four
    geotiff(image, data)
    return argv


@case("model-returns-a-tuple", "model", "a network returning a tuple of tensors",
      "model.pt: returned a tuple", "expected one tensor")  # fmt: skip
def _(d: Path) -> list[str]:
    return torch_job(d, scripted(d, _nets()[4]()))


@case("model-not-torchscript", "model", "random bytes named model.pt", "model.pt: not a TorchScript file")
def _(d: Path) -> list[str]:
    path = inputs(d) / "model.pt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return torch_job(d, path)


@case("model-state-dict", "model", "a plain state_dict saved with torch.save, not TorchScript",
      "model.pt: not a TorchScript file")  # fmt: skip
def _(d: Path) -> list[str]:
    import torch

    path = inputs(d) / "model.pt"
    torch.save(_nets()[0](2, 2).state_dict(), str(path))
    return torch_job(d, path)


@case("model-blend-window-off-stride", "model", "tiling.stitch blend, a 63 px window for a stride-2 network",
      "tiling.window [63, 63] must be a multiple of the model stride (2)")  # fmt: skip
def _(d: Path) -> list[str]:
    return torch_job(d, scripted(d, _nets()[0](2, 2)), stride=2, tiling={"chunk": 64, "stitch": "blend", "window": 63})


@case("model-blend-window-over-the-image", "model", "tiling.stitch blend with a 256 px window on a 128 px image "
      "(padded with zeros on both sides, as MONAI pads)", exit=0, complete=True)  # fmt: skip
def _(d: Path) -> list[str]:
    return torch_job(d, scripted(d, _nets()[0](2, 2)), tiling={"chunk": 64, "stitch": "blend", "window": 256})


@case("model-missing", "model", "model.path naming no file", "nowhere.pt: model file not found")
def _(d: Path) -> list[str]:
    return torch_job(d, d / "nowhere.pt")


# -- stores -------------------------------------------------------------------------------------


@case("store-meta-garbage", "store", "a complete store whose zarr.json is overwritten with garbage",
      "aber.zarr: not a raymask store any more: zarr.json is damaged")  # fmt: skip
def _(d: Path) -> list[str]:
    store = made_store(d)
    (store / "zarr.json").write_text("{not json")
    return ["info", str(store)]


@case("store-meta-missing-keys", "store", "a store whose raymask attributes lost 'shape'",
      "aber.zarr:", "shape")  # fmt: skip
def _(d: Path) -> list[str]:
    store = made_store(d)
    meta = json.loads((store / "zarr.json").read_text())
    del meta["attributes"]["raymask"]["shape"]
    (store / "zarr.json").write_text(json.dumps(meta))
    return ["info", str(store)]


@case("store-chunk-deleted", "store", "a complete store with one mask chunk file deleted, queried over it",
      "aber.zarr: mask chunk", "missing")  # fmt: skip
def _(d: Path) -> list[str]:
    store = made_store(d)
    next(p for p in sorted((store / "mask" / "c").rglob("*")) if p.is_file()).unlink()
    return ["query", str(store), "--bbox", "0,0,400,400", "--crs", "pixel"]


@case("store-chunk-truncated", "store", "a complete store with one mask chunk file cut in half, queried over it",
      "aber.zarr: mask chunk", "cannot be decoded")  # fmt: skip
def _(d: Path) -> list[str]:
    store = made_store(d)
    chunk = next(p for p in sorted((store / "mask" / "c").rglob("*")) if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    return ["query", str(store), "--bbox", "0,0,400,400", "--crs", "pixel"]


@case("store-incomplete-query", "store", "an unfinished store (status incomplete, one chunk not yet written), queried",
      '"status": "incomplete"', exit=0)  # fmt: skip
def _(d: Path) -> list[str]:
    store = made_store(d)
    next(p for p in sorted((store / "mask" / "c").rglob("*")) if p.is_file()).unlink()
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["raymask"]["status"] = "incomplete"
    (store / "zarr.json").write_text(json.dumps(meta))
    return ["query", str(store), "--bbox", "0,0,400,400", "--crs", "pixel", "--json"]


@case("store-newer-version", "store", "a store whose format version is 99",
      "aber.zarr: written by a newer raymask")  # fmt: skip
def _(d: Path) -> list[str]:
    store = made_store(d)
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["raymask"]["version"] = 99
    (store / "zarr.json").write_text(json.dumps(meta))
    return ["info", str(store)]


@case("store-a-file", "store", "info on a regular file named aber.zarr", "aber.zarr: not a zarr store")
def _(d: Path) -> list[str]:
    (inputs(d) / "aber.zarr").write_text("hello")
    return ["info", str(inputs(d) / "aber.zarr")]


@case(
    "store-plain-zarr",
    "store",
    "a zarr group that raymask did not write",
    "plain.zarr: not a raymask mask store (no raymask metadata)",
)
def _(d: Path) -> list[str]:
    import zarr

    zarr.open_group(str(inputs(d) / "plain.zarr"), mode="w").attrs["hello"] = "world"
    return ["info", str(inputs(d) / "plain.zarr")]


@case(
    "store-bbox-bad",
    "store",
    "query --bbox 1,2,3 (three numbers)",
    "--bbox '1,2,3': expected 4 comma-separated numbers",
)
def _(d: Path) -> list[str]:
    return ["query", str(made_store(d)), "--bbox", "1,2,3"]


@case(
    "store-export-over-source",
    "store",
    "export a store over a GeoTIFF that exists",
    "scene.tif: already exists",
    "--overwrite",
)
def _(d: Path) -> list[str]:
    store = made_store(d)
    geotiff(inputs(d) / "scene.tif", red_nir())
    return ["export", str(store), str(inputs(d) / "scene.tif")]


# -- environment --------------------------------------------------------------------------------


@case("env-unwritable-tmpdir", "env", "TMPDIR naming a folder that does not exist", exit=0, complete=True,
      env={"TMPDIR": "/nonexistent/tmp"})  # fmt: skip
def _(d: Path) -> list[str]:
    return job(d, geotiff(inputs(d) / "scene.tif", red_nir()))


@case(
    "env-output-on-proc",
    "env",
    "output.path under /proc",
    "/proc/raymask.zarr: cannot write in the output folder /proc",
)
def _(d: Path) -> list[str]:
    return [*job(d, geotiff(inputs(d) / "scene.tif", red_nir())), "--set", "output.path=/proc/raymask.zarr"]


# -- batches: one bad input never spoils the others ---------------------------------------------


def _other_inputs_unaffected(d: Path) -> None:
    report = json.loads((d / "root" / "batch-report.json").read_text())
    status = {Path(r["input"]).name: r for r in report["results"]}
    assert status["bad.tif"]["status"] == "failed" and "not a raster GDAL can read" in status["bad.tif"]["error"]
    for name in ("a.tif", "c.tif"):
        assert status[name]["status"] == "done", status[name]
        meta = json.loads((d / "root" / status[name]["store"] / "zarr.json").read_text())
        assert meta["attributes"]["raymask"]["status"] == "complete"


@case("batch-one-bad-input", "batch", "a batch of two good GeoTIFFs and one text file named .tif",
      "1 of 3 inputs failed; first:", "bad.tif: not a raster GDAL can read", "batch-report.json",
      check=_other_inputs_unaffected)  # fmt: skip
def _(d: Path) -> list[str]:
    geotiff(inputs(d) / "a.tif", red_nir(seed=1))
    geotiff(inputs(d) / "c.tif", red_nir(seed=2))
    (inputs(d) / "bad.tif").write_text("not a raster")
    config = {"inputs": [f"{inputs(d)}/*.tif"], "model": {"kind": "ndvi"}, "tiling": {"chunk": 64},
              "output": {"root": str(d / "root")}}  # fmt: skip
    (d / "batch.yaml").write_text(yaml.safe_dump(config))
    return ["batch", str(d / "batch.yaml")]


def _the_raster_done(d: Path) -> None:
    report = json.loads((d / "root" / "batch-report.json").read_text())
    assert [r["status"] for r in report["results"]] == ["done", "failed"], report["results"]


@case("batch-one-bad-dicom-study", "batch", "a batch of a good GeoTIFF and a DICOM study with a missing slice",
      "1 of 2 inputs failed; first:", "missing slice", check=_the_raster_done)  # fmt: skip
def _(d: Path) -> list[str]:
    geotiff(inputs(d) / "a.tif", red_nir(seed=1)[:1])
    folder = series(d)
    slices(folder)[10].unlink()
    config = {"inputs": [f"{inputs(d)}/a.tif", str(folder)], "model": {"kind": "hu-tissue"},
              "tiling": {"chunk": 256}, "output": {"root": str(d / "root")}}  # fmt: skip
    (d / "batch.yaml").write_text(yaml.safe_dump(config))
    return ["batch", str(d / "batch.yaml")]


def markdown_table() -> str:
    rows = ["| case | group | how it is made | expected | exit |", "|---|---|---|---|---|"]
    for c in CASES:
        expected = c.expected.replace("|", "\\|")
        rows.append(f"| `{c.name}` | {c.group} | {c.how} | {expected} | {c.exit} |")
    return "\n".join(rows) + "\n"


README = Path(__file__).with_name("README.md")


def write_readme() -> None:
    """Replace the table in README.md (everything from its header row on) with the current one."""
    text = README.read_text()
    README.write_text(text[: text.index("| case | group |")] + markdown_table())


if __name__ == "__main__":
    write_readme()
