"""DICOM SEG export (`raymask export ct.zarr OUT.dcm`), read back with highdicom and checked by
dciodvfy (Debian's dicom3tools): voxels equal to the mask segment by segment, the source study, series,
instances and frame of reference referenced, each frame on its source plane; from the bundled series,
from a multi-frame image made of it (frames in shuffled order), and from a copy whose rows were
reversed (the column direction flipped)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from pipeline.cli import main
from pipeline.query.seg import Segment, segment_labels
from pipeline.store import MaskStore
from tests.conftest import CT_SERIES, ROOT
from tests.test_bad_input import assert_one_line_error, raymask

TISSUE = ["air", "lung", "fat", "soft tissue", "bone"]


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's error lines for ``path`` (warnings allowed); the tool must be installed (make test does)."""
    tool = shutil.which("dciodvfy")
    assert tool, "dciodvfy not found: make test installs Debian's dicom3tools"
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def export(store: Path, out: Path, capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    capsys.readouterr()
    assert main(["export", str(store), str(out), "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def run_ct(tmp_path: Path, source: Path | str, capsys: pytest.CaptureFixture[str], *sets: str) -> Path:
    store = tmp_path / "ct.zarr"
    argv = ["run", str(ROOT / "configs" / "ct-tissue.yaml"), "--set", f"source.path={source}"]
    argv += ["--set", f"output.path={store}", "--json", "--no-progress"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    capsys.readouterr()
    return store


def headers(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir()) if p.is_file()]


def by_position(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Single-frame images in order along their slice normal (an independent sort)."""
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(datasets, key=lambda d: float(normal @ np.asarray(d.ImagePositionPatient, dtype=float)))


def check_frames_on_source_planes(seg: pydicom.Dataset, sources: dict[tuple[str, int], np.ndarray]) -> None:
    """Every SEG frame sits on the plane of the source image (or source frame) it derives from."""
    for group in seg.PerFrameFunctionalGroupsSequence:
        ref = group.DerivationImageSequence[0].SourceImageSequence[0]
        frame = int(ref.get("ReferencedFrameNumber", 1) or 1)
        position = np.asarray(group.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        np.testing.assert_allclose(position, sources[(str(ref.ReferencedSOPInstanceUID), frame)], atol=1e-4)
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    return np.asarray(orientation, dtype=float)  # type: ignore[return-value]


def test_the_ct_store_exports_to_a_dicom_seg_that_highdicom_and_dciodvfy_accept(
    shipped_store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    ct, _ = shipped_store("ct-tissue.yaml")
    out = tmp_path / "ct-seg.dcm"
    result = export(ct, out, capsys)
    assert result["format"] == "DICOM SEG" and result["encoding"] == "BINARY"
    assert dciodvfy_errors(out) == []

    store = MaskStore.open(ct)
    mask = np.asarray(store.mask[:])
    seg = hd.seg.segread(out)
    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
    # one segment per class with voxels, each coded (SNOMED CT, from DICOM's CIDs)
    present = [c for c in TISSUE if (mask == TISSUE.index(c)).any()]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == present == [s["class"] for s in result["segments"]]
    coded = {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0] for s in seg.SegmentSequence}
    types = {name: (c.CodingSchemeDesignator, c.CodeValue) for name, c in coded.items()}
    assert types["lung"] == ("SCT", "39607008") and types["bone"] == ("SCT", "3138006")
    assert types["fat"] == ("SCT", "55603005") and types["soft tissue"] == ("SCT", "87784001")
    assert all(s.SegmentAlgorithmType == "AUTOMATIC" for s in seg.SegmentSequence)

    # it references the source: study, series, frame of reference and every instance
    sources = by_position(headers(CT_SERIES))
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence} == {
        s.SOPInstanceUID for s in sources
    }
    planes = {(s.SOPInstanceUID, 1): np.asarray(s.ImagePositionPatient, dtype=float) for s in sources}
    orientation = check_frames_on_source_planes(seg, planes)
    np.testing.assert_allclose(orientation, np.asarray(sources[0].ImageOrientationPatient, dtype=float))
    spacing = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in spacing] == [float(v) for v in sources[0].PixelSpacing]

    # voxels equal to the mask, segment by segment, slice by slice in the sources' own order
    uids = [s.SOPInstanceUID for s in sources]
    for number, name in enumerate(present, start=1):
        got = seg.get_pixels_by_source_instance(uids, segment_numbers=[number])[..., 0]  # binary, this segment
        assert np.array_equal(got, (mask == TISSUE.index(name)).astype(got.dtype)), name
        assert int(got.sum()) == result["segments"][number - 1]["voxels"]


def test_only_the_named_classes_become_segments_and_labelmap_encoding(
    shipped_store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    ct, _ = shipped_store("ct-tissue.yaml")
    mask = np.asarray(MaskStore.open(ct).mask[:])
    out = tmp_path / "bone-lung.dcm"
    result = export(ct, out, capsys, "--class", "bone", "--class", "lung")
    assert [(s["number"], s["class"]) for s in result["segments"]] == [(1, "lung"), (2, "bone")]  # class order
    assert dciodvfy_errors(out) == []
    seg = hd.seg.segread(out)
    uids = [s.SOPInstanceUID for s in by_position(headers(CT_SERIES))]
    labels = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    expected = np.where(mask == 1, 1, np.where(mask == 4, 2, 0))
    assert np.array_equal(labels, expected)

    # LABELMAP (the 2024 SOP class, which this dciodvfy predates): read back by highdicom alike
    labelmap = tmp_path / "labelmap.dcm"
    result = export(ct, labelmap, capsys, "--seg-encoding", "labelmap")
    assert result["sop_class"] == "1.2.840.10008.5.1.4.1.1.66.7"
    seg = hd.seg.segread(labelmap)
    assert seg.SegmentationType == "LABELMAP"
    labels = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    lut = np.zeros(256, dtype=np.uint8)
    lut[:5] = np.arange(1, 6)
    assert np.array_equal(labels, lut[mask])
    # the same through the exporter's own mapping: classes 0..4 as segments 1..5, nodata (255) as 0
    segments = [Segment(c + 1, c, f"class {c}", "#000000", {}, "local") for c in range(5)]
    assert np.array_equal(segment_labels(mask, segments), labels)
    assert (segment_labels(np.array([[255, 3]], dtype=np.uint8), segments) == [[0, 4]]).all()


def test_a_multi_frame_source_is_referenced_frame_by_frame(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The 20 slices as one Legacy Converted Enhanced CT image, its frames in shuffled order: the store
    equals the single-frame one and the SEG's frames point at the right source frames."""
    datasets = [pydicom.dcmread(p) for p in sorted(CT_SERIES.iterdir())]
    for ds in datasets:
        ds.decompress()
    order = np.random.default_rng(7).permutation(len(datasets))
    multi = hd.legacy.LegacyConvertedEnhancedCTImage(
        [datasets[i] for i in order], series_instance_uid=hd.UID(), series_number=9, sop_instance_uid=hd.UID(),
        instance_number=1,
    )  # fmt: skip
    folder = tmp_path / "enhanced"
    folder.mkdir()
    multi.save_as(folder / "ct.dcm")
    store = run_ct(tmp_path, folder, capsys)
    mask = np.asarray(MaskStore.open(store).mask[:])

    out = tmp_path / "seg.dcm"
    result = export(store, out, capsys)
    assert result["references"]["instances"] == 1
    assert dciodvfy_errors(out) == []
    seg = hd.seg.segread(out)
    source = pydicom.dcmread(folder / "ct.dcm", stop_before_pixels=True)
    positions = [np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
                 for f in source.PerFrameFunctionalGroupsSequence]  # fmt: skip
    planes = {(source.SOPInstanceUID, k + 1): p for k, p in enumerate(positions)}
    check_frames_on_source_planes(seg, planes)
    # the store's slices run along the normal (z up); the source's frames are shuffled
    by_z = np.argsort([p[2] for p in positions])
    labels = seg.get_pixels_by_source_frame(
        source.SOPInstanceUID, source_frame_numbers=list(range(1, len(positions) + 1)), combine_segments=True
    )
    names = [s["class"] for s in result["segments"]]
    lut = np.zeros(256, dtype=np.uint8)
    for number, name in enumerate(names, start=1):
        lut[TISSUE.index(name)] = number
    assert np.array_equal(labels[by_z], lut[mask])
    # the same voxels as from the single-frame series (the shipped store's mask)
    reference = np.asarray(MaskStore.open(run_ct(tmp_path / "single", CT_SERIES, capsys)).mask[:])
    assert np.array_equal(mask, reference)


def test_a_series_with_reversed_rows_keeps_its_own_geometry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each image's rows stored bottom to top (column direction -y, position at the old last row): the
    store follows the source's pixels along its own normal, and the SEG lands on the flipped source
    planes, so in patient space it covers what the original series' store covers."""
    folder = tmp_path / "flipped"
    folder.mkdir()
    for path in sorted(CT_SERIES.iterdir()):
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array[::-1].copy()
        iop = [float(v) for v in ds.ImageOrientationPatient]
        row_step = float(ds.PixelSpacing[0])
        ipp = np.asarray(ds.ImagePositionPatient, dtype=float) + (ds.Rows - 1) * row_step * np.asarray(iop[3:])
        ds.ImageOrientationPatient = [*iop[:3], *(-v for v in iop[3:])]
        ds.ImagePositionPatient = [float(v) for v in ipp]
        ds.SOPInstanceUID = hd.UID()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
        ds.PixelData = pixels.tobytes()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.save_as(folder / path.name, enforce_file_format=True)
    store = run_ct(tmp_path, folder, capsys)
    original = run_ct(tmp_path / "original", CT_SERIES, capsys)
    mask = np.asarray(MaskStore.open(store).mask[:])
    # rows flipped, and slices too: the slice normal (row x column direction) now points down (-z)
    assert np.array_equal(mask, np.asarray(MaskStore.open(original).mask[:])[::-1, ::-1])

    out = tmp_path / "seg.dcm"
    result = export(store, out, capsys)
    assert dciodvfy_errors(out) == []
    seg = hd.seg.segread(out)
    sources = by_position(headers(folder))
    planes = {(s.SOPInstanceUID, 1): np.asarray(s.ImagePositionPatient, dtype=float) for s in sources}
    orientation = check_frames_on_source_planes(seg, planes)
    assert orientation[4] == -1.0  # the column direction is the flipped one
    uids = [s.SOPInstanceUID for s in sources]
    names = [s["class"] for s in result["segments"]]
    labels = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    lut = np.zeros(256, dtype=np.uint8)
    for number, name in enumerate(names, start=1):
        lut[TISSUE.index(name)] = number
    assert np.array_equal(labels, lut[mask])


def test_a_model_card_codes_its_classes(tmp_path: Path, scripted_unet, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    """Classes of a network take the code their config gives; `background` is no segment; a class
    without a code goes out under the local scheme, with a warning."""
    net = scripted_unet(bands=1, classes=3, seed=4)
    liver = {"category": {"scheme": "SCT", "value": "91723000", "meaning": "Anatomical Structure"},
             "type": {"scheme": "SCT", "value": "10200004", "meaning": "Liver"}}  # fmt: skip
    classes = json.dumps([{"name": "background"}, {"name": "liver", "code": liver}, {"name": "lesion"}])
    config = tmp_path / "job.yaml"
    config.write_text(
        f"source: {{path: {CT_SERIES}}}\n"
        f"model: {{kind: torchscript, path: {net}, classes: {classes}, stride: 4, receptive_radius: 20,"
        " scale: 0.01}\n"
        f"tiling: {{chunk: [10, 256, 256], halo: 24}}\noutput: {{path: {tmp_path / 'net.zarr'}}}\n"
    )
    assert main(["run", str(config), "--json", "--no-progress"]) == 0
    capsys.readouterr()
    store = MaskStore.open(tmp_path / "net.zarr")
    assert store.info.classes[1].code == liver and store.info.classes[2].code is None
    mask = np.asarray(store.mask[:])
    assert all((mask == c).any() for c in (0, 1, 2)), np.unique(mask)

    out = tmp_path / "net.dcm"
    capsys.readouterr()
    assert main(["export", str(tmp_path / "net.zarr"), str(out), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert "class 'lesion' has no code" in captured.err and result["uncoded"] == ["lesion"]
    assert dciodvfy_errors(out) == []
    seg = hd.seg.segread(out)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "lesion"]
    first = seg.SegmentSequence[0]
    assert first.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert first.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Anatomical Structure"
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "99RAYMASK"


def test_bad_seg_requests_are_one_line_and_leave_nothing(
    shipped_store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    aber, _ = shipped_store("aerial-vegetation.yaml")
    out = tmp_path / "out"
    out.mkdir()
    assert_one_line_error(
        raymask("export", str(aber), str(out / "x.dcm")), "a 2-D store; DICOM SEG export is for volumes"
    )

    # an anonymised copy whose UIDs are gone
    blank = tmp_path / "blank"
    blank.mkdir()
    for path in sorted(CT_SERIES.iterdir()):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = ""
        ds.save_as(blank / path.name)
    store = run_ct(tmp_path, blank, capsys)
    assert_one_line_error(raymask("export", str(store), str(out / "x.dcm")), "no StudyInstanceUID", "anonymised")

    # the source moved away since the run
    moved = tmp_path / "moved"
    blank.rename(moved)
    assert_one_line_error(raymask("export", str(store), str(out / "x.dcm")), "a source image of", "is gone")

    # the source changed since the run
    moved.rename(blank)
    first = sorted(blank.iterdir())[0]
    ds = pydicom.dcmread(first)
    ds.StudyInstanceUID = "1.2.3"
    ds.save_as(first)
    assert_one_line_error(raymask("export", str(store), str(out / "x.dcm")), "the source files changed since the run")

    # an existing output is kept; an unknown class is named; an incomplete store is refused
    ct, _ = shipped_store("ct-tissue.yaml")
    unfinished = tmp_path / "unfinished.zarr"
    shutil.copytree(ct, unfinished)
    MaskStore.open(unfinished, mode="r+").update_meta(status="incomplete")
    assert_one_line_error(raymask("export", str(unfinished), str(out / "x.dcm")), "the store is incomplete")
    (out / "mine.dcm").write_text("mine")
    assert_one_line_error(raymask("export", str(ct), str(out / "mine.dcm")), "already exists")
    assert (out / "mine.dcm").read_text() == "mine"
    assert_one_line_error(raymask("export", str(ct), str(out / "x.dcm"), "--class", "nope"), "--class nope")
    assert_one_line_error(raymask("export", str(ct), "/proc/ct-seg.dcm"), "/proc")  # an unwritable folder
    assert sorted(p.name for p in out.iterdir()) == ["mine.dcm"]
