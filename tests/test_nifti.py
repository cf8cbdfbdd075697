"""NIfTI export of a volume store (`raymask export ct.zarr OUT.nii.gz`), read back with nibabel: labels
unchanged, the affine in RAS equal to one computed independently from the DICOM files' positions, and a
JSON side file naming the classes."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pipeline.cli import main
from pipeline.store import MaskStore
from tests.conftest import CT_SERIES
from tests.test_bad_input import assert_one_line_error, raymask


def affine_from_files(folder: Path) -> np.ndarray:
    """(column, row, slice) -> RAS mm, straight from the headers: slices sorted along the normal, the
    origin at the first one, the slice step from the first and last positions; LPS flipped to RAS."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir()) if p.is_file()]
    headers = [h for h in headers if "ImagePositionPatient" in h]
    iop = np.asarray(headers[0].ImageOrientationPatient, dtype=float)
    along_row, along_col = iop[:3], iop[3:]  # increasing column index, increasing row index
    normal = np.cross(along_row, along_col)
    headers.sort(key=lambda h: float(np.dot(normal, np.asarray(h.ImagePositionPatient, dtype=float))))
    first = np.asarray(headers[0].ImagePositionPatient, dtype=float)
    last = np.asarray(headers[-1].ImagePositionPatient, dtype=float)
    row_spacing, col_spacing = (float(v) for v in headers[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = along_row * col_spacing
    lps[:3, 1] = along_col * row_spacing
    lps[:3, 2] = (last - first) / (len(headers) - 1)
    lps[:3, 3] = first
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def test_a_volume_exports_to_nifti_with_its_geometry_and_classes(
    shipped_store,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],  # type: ignore[no-untyped-def]
) -> None:
    ct, _ = shipped_store("ct-tissue.yaml")
    out = tmp_path / "ct.nii.gz"
    assert main(["export", str(ct), str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["format"] == "NIfTI-1" and Path(result["labels"]) == tmp_path / "ct.json"
    image = nib.load(out)
    store = MaskStore.open(ct)
    mask = np.asarray(store.mask[:])
    data = np.asarray(image.dataobj)
    assert data.dtype == np.uint8 and data.shape == mask.shape[::-1]
    assert np.array_equal(data.transpose(2, 1, 0), mask)  # labels unchanged
    assert len(np.unique(mask)) > 2
    np.testing.assert_allclose(image.affine, affine_from_files(CT_SERIES), atol=1e-4)
    assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
    np.testing.assert_allclose(image.header.get_qform(), image.affine, atol=1e-4)
    assert image.header.get_xyzt_units()[0] == "mm"
    side = json.loads((tmp_path / "ct.json").read_text())
    assert [label["name"] for label in side["labels"]] == store.info.class_names
    lung = side["labels"][1]
    assert lung["code"]["type"] == {"scheme": "SCT", "value": "39607008", "meaning": "Lung"}
    assert side["nodata"] == 255


def test_bad_nifti_requests_are_one_line(shipped_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    aber, _ = shipped_store("aerial-vegetation.yaml")
    assert_one_line_error(
        raymask("export", str(aber), str(tmp_path / "x.nii.gz")), "a 2-D store; NIfTI export is for volumes"
    )
    ct, _ = shipped_store("ct-tissue.yaml")
    (tmp_path / "ct.json").write_text("mine")
    assert_one_line_error(raymask("export", str(ct), str(tmp_path / "ct.nii.gz")), "ct.json: already exists")
    assert (tmp_path / "ct.json").read_text() == "mine" and not (tmp_path / "ct.nii.gz").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.json"]
