"""DICOM series: discovery, geometry, HU, decoding of every transfer syntax, and bad series."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.volume import GeometryError, PlaneGeometry, order_planes
from pipeline.errors import SourceError
from pipeline.sources.dicom import decode_frames, discover
from tests.conftest import CT_SERIES, EDGE_CASES


def test_real_series_geometry_hu_and_order() -> None:
    [series], notes = discover([str(CT_SERIES)])
    assert notes == [] and series.modality == "CT"
    g = series.geometry
    assert g.shape == (20, 512, 512)
    assert g.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))  # 2 mm from positions, not 3 mm thickness
    z = [f.plane.position[2] for f in series.frames]  # type: ignore[index]
    assert z == sorted(z) and z[0] == -804.5 and z[-1] == -766.5
    numbers = [int(pydicom.dcmread(f.path, stop_before_pixels=True).InstanceNumber) for f in series.frames]
    assert numbers == list(range(286, 266, -1))  # InstanceNumber runs backwards: never sort by it
    hu = decode_frames(series.frames)
    assert hu.min() == -1024 and hu.max() == 1839
    np.testing.assert_allclose(np.percentile(hu, [1, 50, 99]), [-1024, -981, 405], atol=1)


def test_affine_maps_each_slice_index_to_its_image_position() -> None:
    [series], _ = discover([str(CT_SERIES)])
    affine = series.geometry.affine()
    for k, frame in enumerate(series.frames):
        np.testing.assert_allclose((affine @ [k, 0, 0, 1])[:3], frame.plane.position, atol=1e-9)
    ds = pydicom.dcmread(series.frames[0].path, stop_before_pixels=True)
    # Voxel (0, j, i): along a row (i) is IOP[:3] x column spacing, down a column (j) is IOP[3:] x row spacing.
    expected = np.add(ds.ImagePositionPatient, np.multiply(ds.ImageOrientationPatient[:3], 5 * ds.PixelSpacing[1]))
    np.testing.assert_allclose((affine @ [0, 0, 5, 1])[:3], expected)


def test_series_without_uids_in_the_dataset_is_grouped_by_frame_of_reference(tmp_path: Path) -> None:
    """As the bundled series came (anonymised: its UIDs only in the file meta)."""
    for path in CT_SERIES.iterdir():
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = ds.SOPInstanceUID = ds.StudyInstanceUID = ""
        ds.save_as(tmp_path / path.name)
    [series], _ = discover([str(tmp_path)])
    assert series.key.startswith("for:1.3.12.2.1107.5.1.4.60064.300000221208072742751")
    assert len(series.frames) == 20


@pytest.mark.parametrize("name", sorted(p.name for p in EDGE_CASES.glob("*.dcm")))
def test_every_edge_case_decodes(name: str) -> None:
    [series], _ = discover([str(EDGE_CASES / name)])
    values = decode_frames(series.frames)
    assert values.shape == series.geometry.shape and np.isfinite(values).all()


def test_compressed_and_uncompressed_copies_decode_identically() -> None:
    def values(name: str) -> np.ndarray:
        [series], _ = discover([str(EDGE_CASES / name)])
        return decode_frames(series.frames)

    np.testing.assert_array_equal(values("693_J2KR.dcm"), values("693_UNCR.dcm"))
    reference = values("emri_small.dcm")
    for variant in ("RLE", "big_endian", "jpeg_2k_lossless", "jpeg_ls_lossless"):
        np.testing.assert_array_equal(values(f"emri_small_{variant}.dcm"), reference)


def test_enhanced_ct_takes_rescale_from_the_functional_groups() -> None:
    [series], _ = discover([str(EDGE_CASES / "eCT_Supplemental.dcm")])
    ds = pydicom.dcmread(EDGE_CASES / "eCT_Supplemental.dcm")
    assert "RescaleIntercept" not in ds  # only in the functional groups
    raw = ds.pixel_array.astype(np.float64)[[f.index for f in series.frames]]  # frames in slice order
    np.testing.assert_array_equal(decode_frames(series.frames), raw - 1024)
    assert series.geometry.shape == (2, 512, 512) and series.geometry.spacing[0] == pytest.approx(10.0)


def test_missing_codec_names_the_syntax_and_the_package() -> None:
    # A fresh interpreter whose pydicom has no JPEG-LS plugin, as on an install without them
    # (pydicom's own plugin API; removing them in-process would leak into other tests).
    code = (
        "from pydicom.pixels import get_decoder; from pydicom.uid import JPEGLSLossless; "
        "decoder = get_decoder(JPEGLSLossless); "
        "[decoder.remove_plugin(p) for p in list(decoder.available_plugins)]; "
        "from pipeline.sources.dicom import discover; "
        f"discover([{str(EDGE_CASES / 'emri_small_jpeg_ls_lossless.dcm')!r}])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "no decoder installed for JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80)" in last
    assert "install pyjpegls" in last


# -- bad series, made from copies of the real one --------------------------------------------


@pytest.fixture
def series_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "series"
    shutil.copytree(CT_SERIES, folder)
    return folder


def ordered_files(folder: Path) -> list[Path]:
    return sorted(
        folder.iterdir(), key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
    )


def edit(path: Path, **changes: object) -> None:
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(path)


def test_a_missing_slice_is_named(series_copy: Path) -> None:
    ordered_files(series_copy)[7].unlink()
    with pytest.raises(
        SourceError, match=r"missing slice: step of 4\.000 mm between positions -792\.500 and -788\.500 mm"
    ):
        discover([str(series_copy)])


def test_non_parallel_slices(series_copy: Path) -> None:
    for path in series_copy.iterdir():
        edit(path, SeriesInstanceUID="1.2.3.4")  # one series, one tilted slice in it
    tilted = ordered_files(series_copy)[3]
    edit(tilted, ImageOrientationPatient=[1, 0, 0, 0, 0.9962, -0.0872])
    with pytest.raises(SourceError, match=f"^{tilted}: ImageOrientationPatient .* differs from the other 19 files"):
        discover([str(series_copy)])  # the odd file is named (the planes' own check says "non-parallel slices")


def test_gantry_tilt(series_copy: Path) -> None:
    for k, path in enumerate(ordered_files(series_copy)):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        x, y, z = ds.ImagePositionPatient
        edit(path, ImagePositionPatient=[x, y + 0.5 * k, z])
    with pytest.raises(SourceError, match="gantry tilt"):
        discover([str(series_copy)])


def test_mixed_modalities(series_copy: Path) -> None:
    for path in series_copy.iterdir():
        edit(path, SeriesInstanceUID="1.2.3.4")
    edit(ordered_files(series_copy)[0], Modality="MR")
    with pytest.raises(SourceError, match=r"mixed modalities CT, MR in one series \(1\.2\.3\.4\)"):
        discover([str(series_copy)])


def test_truncated_file_fails_when_decoded(series_copy: Path) -> None:
    victim = ordered_files(series_copy)[5]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    [series], _ = discover([str(series_copy)])
    with pytest.raises(SourceError, match=rf"{victim.name}: cannot decode pixel data"):
        decode_frames(series.frames)


def test_frame_count_that_does_not_match(tmp_path: Path) -> None:
    path = tmp_path / "emri.dcm"
    shutil.copy(EDGE_CASES / "emri_small.dcm", path)
    edit(path, NumberOfFrames=11)
    [series], _ = discover([str(path)])
    with pytest.raises(
        SourceError,
        match=r"emri\.dcm: cannot decode pixel data: PixelData holds 81920 bytes, .* make 90112; BitsAllocated",
    ):
        decode_frames(series.frames)


def test_folder_with_no_images(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(SourceError, match="no DICOM images found"):
        discover([str(tmp_path)])


def test_non_image_objects_are_skipped_with_a_note(series_copy: Path) -> None:
    rtstruct = series_copy / "rtstruct"
    shutil.copy(ordered_files(series_copy)[0], rtstruct)
    edit(rtstruct, SOPClassUID="1.2.840.10008.5.1.4.1.1.481.3")
    (series_copy / "notes.txt").write_text("not dicom")
    [series], notes = discover([str(series_copy)])
    assert series.geometry.shape[0] == 20
    assert any("RT structure set (RTSTRUCT), skipped" in n for n in notes)
    assert any("notes.txt: not DICOM, skipped" in n for n in notes)


@given(
    st.lists(st.floats(-500, 500, allow_nan=False), min_size=2, max_size=30, unique=True),
    st.sampled_from([(1, 0, 0, 0, 1, 0), (1, 0, 0, 0, 0, -1), (0, 1, 0, 0, 0, -1)]),
    st.floats(0.5, 5.0),
)
@settings(max_examples=60, deadline=None)
def test_planes_sort_along_the_normal_whatever_the_file_order(
    starts: list[float], orientation: tuple[int, ...], spacing: float
) -> None:
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    n = len(starts)
    shuffled = np.random.default_rng(n).permutation(n)
    planes = [
        PlaneGeometry(tuple(np.array([10.0, -20.0, 5.0]) + k * spacing * normal), orientation, (0.7, 0.8), 4, 5)  # type: ignore[arg-type]
        for k in shuffled
    ]
    order, geometry = order_planes(planes)
    assert [int(shuffled[i]) for i in order] == list(range(n))
    assert geometry.spacing[0] == pytest.approx(spacing)
    np.testing.assert_allclose(geometry.affine() @ [n - 1, 0, 0, 1], [*planes[order[-1]].position, 1], atol=1e-9)


def test_two_frames_at_one_position() -> None:
    plane = PlaneGeometry((0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0), (1.0, 1.0), 2, 2)  # type: ignore[arg-type]
    with pytest.raises(GeometryError, match="two frames at the same position"):
        order_planes([plane, plane])
