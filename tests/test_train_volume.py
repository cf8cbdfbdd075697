"""`raymask train` on DICOM series (issue 16): a 3-D network trained on a real CT series with NIfTI and
DICOM SEG labels, exported as ONNX, run by `raymask run` on the held-out series with exact tiling, and
`raymask evaluate` of the volume store against the SEG and the NIfTI equal to a direct computation;
labels on another voxel grid refused in one line.

The bundled 20-slice CT is cut into two series of 10 slices (the upper and lower half, each with its
own series UID, cropped to the central 256 x 256 with the positions moved to match): training uses one,
validation the other, so no slice is on both sides. The labels are HU bands computed here from the
pixel data (air < -500 <= body < 300 <= bone), written by nibabel (slices stored bottom-up, to
exercise the axis mapping) and by highdicom.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml
from pydicom.sr.codedict import codes

from pipeline.cli import main
from pipeline.store import MaskStore
from tests.test_bad_input import assert_one_line_error, raymask

ROOT = Path(__file__).resolve().parent.parent
CT = ROOT / "data" / "dicom" / "ct_series"
CLASSES = ["air", "body", "bone"]
CROP = slice(128, 384)


def cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


def hu_classes(hu: np.ndarray) -> np.ndarray:
    return np.digitize(hu, [-500, 300]).astype(np.uint8)


def split_series(folder: Path) -> dict[str, tuple[Path, list[pydicom.Dataset], np.ndarray]]:
    """The CT's slices, ordered along the normal, as two cropped series: name -> (folder, datasets, HU)."""
    datasets = [pydicom.dcmread(p) for p in sorted(CT.iterdir())]
    normal = np.cross(*np.reshape(np.asarray(datasets[0].ImageOrientationPatient, float), (2, 3)))
    datasets.sort(key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))
    out = {}
    for name, part in (("upper", datasets[:10]), ("lower", datasets[10:])):
        target = folder / name
        target.mkdir()
        series_uid, volume, written = pydicom.uid.generate_uid(), [], []
        for k, ds in enumerate(part):
            hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            crop = np.ascontiguousarray(ds.pixel_array[CROP, CROP])
            iop = np.asarray(ds.ImageOrientationPatient, float)
            dr, dc = (float(v) for v in ds.PixelSpacing)
            ipp = np.asarray(ds.ImagePositionPatient, float) + CROP.start * dc * iop[:3] + CROP.start * dr * iop[3:]
            ds.ImagePositionPatient = [float(v) for v in ipp]
            ds.Rows, ds.Columns = crop.shape
            ds.PixelData = crop.tobytes()
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
            ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, pydicom.uid.generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(target / f"slice{k:02d}.dcm", enforce_file_format=True)
            volume.append(hu[CROP, CROP])
            written.append(pydicom.dcmread(target / f"slice{k:02d}.dcm"))
        out[name] = (target, written, np.stack(volume))
    return out


def write_nifti(path: Path, datasets: list[pydicom.Dataset], labels: np.ndarray) -> None:
    """(z, y, x) labels as NIfTI (i = column, j = row, k = slice), slices stored last-first, RAS affine."""
    first, last = datasets[0], datasets[-1]
    iop = np.asarray(first.ImageOrientationPatient, float)
    dr, dc = (float(v) for v in first.PixelSpacing)
    step = (np.asarray(last.ImagePositionPatient, float) - np.asarray(first.ImagePositionPatient, float)) / (
        len(datasets) - 1
    )
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = iop[:3] * dc, iop[3:] * dr, -step  # k runs from the last slice back
    lps[:3, 3] = last.ImagePositionPatient
    data = np.ascontiguousarray(labels[::-1].transpose(2, 1, 0))
    nib.save(nib.Nifti1Image(data, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps), str(path))


def write_seg(path: Path, datasets: list[pydicom.Dataset], labels: np.ndarray) -> None:
    algorithm = hd.AlgorithmIdentificationSequence(name="HU bands", family=codes.cid7162.ArtificialIntelligence,
                                                   version="1")  # fmt: skip
    segments = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, label in ((1, "bone"), (2, "body"))  # numbered unlike the classes: matched by label
    ]
    remapped = np.select([labels == 2, labels == 1], [1, 2], 0).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=remapped, segmentation_type="BINARY", segment_descriptions=segments,
        series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="tests", manufacturer_model_name="tests", software_versions="1", device_serial_number="1",
    )  # fmt: skip
    seg.save_as(path)


@pytest.fixture(scope="module")
def ct_pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("ct-pairs")
    series = split_series(folder)
    out: dict[str, object] = {"folder": folder}
    for name, (path, datasets, hu) in series.items():
        labels = hu_classes(hu)
        write_nifti(folder / f"{name}.nii.gz", datasets, labels)
        write_seg(folder / f"{name}-seg.dcm", datasets, labels)
        out[name] = (path, labels)
    return out


def test_a_3d_network_trained_on_ct_pairs_runs_exactly_and_evaluates_against_seg_and_nifti(
    ray_session, ct_pairs: dict, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    folder = ct_pairs["folder"]
    upper, _ = ct_pairs["upper"]
    lower, lower_labels = ct_pairs["lower"]
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "name": "ct-bands",
        "pairs": [{"image": str(upper), "labels": str(folder / "upper.nii.gz")},
                  {"image": str(lower), "labels": str(folder / "lower-seg.dcm")}],
        "classes": CLASSES, "network": {"name": "unet", "channels": [4, 8], "dims": 3},
        "patch": [8, 32, 32], "batch": 2, "epochs": 1, "steps": 2, "validation": {"files": ["lower"]},
        "export": "onnx", "workers": 1, "output": str(tmp_path / "model"),
    }))  # fmt: skip
    code, out = cli("train", str(config), "--json", "--no-progress")
    assert code == 0, out
    report = json.loads(out)
    card = yaml.safe_load((tmp_path / "model" / "MODEL.yaml").read_text())
    assert card["kind"] == "onnx" and card["weights"] == "model.onnx" and card["dims"] == 3
    assert card["bands"] == ["HU"] and card["stride"] == 2 and card["measured"]["equivariant"] is True
    assert not (tmp_path / "model" / "model.pt").exists()
    matrix = np.array(report["classes"]["confusion"])
    assert matrix.sum() == lower_labels.size  # every voxel of the held-out series, read from its SEG
    assert matrix.sum(1).tolist() == np.bincount(lower_labels.ravel(), minlength=3).tolist()

    radius = card["receptive_radius"]
    halo = -(-radius // 2) * 2 + 2
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "source": {"path": str(lower)}, "model": {"card": str(tmp_path / "model" / "MODEL.yaml")},
        "tiling": {"chunk": [4, 128, 128], "halo": [halo, halo, halo]},
        "output": {"path": str(tmp_path / "lower.zarr")},
    }))  # fmt: skip
    code, out = cli("run", str(job), "--json", "--no-progress")
    assert code == 0, out
    assert str(json.loads(out)["stitch"]).startswith("exact")
    predicted = np.asarray(MaskStore.open(tmp_path / "lower.zarr").mask[:])
    expected = np.zeros((3, 3), dtype=np.int64)
    np.add.at(expected, (lower_labels.ravel(), predicted.ravel()), 1)
    # The tiled ONNX run against the whole-volume torch validation: equal but for float near-ties between
    # two classes' logits (a barely trained network has many; here at most a few voxels in 655,360).
    assert np.abs(expected - matrix).sum() <= 2 * 4, (expected.tolist(), matrix.tolist())
    for labels in ("lower-seg.dcm", "lower.nii.gz"):
        code, out = cli("evaluate", str(tmp_path / "lower.zarr"), str(folder / labels), "--json", "--no-progress")
        assert code == 0, out
        scored = json.loads(out)
        assert scored["confusion"] == expected.tolist(), labels
        assert scored["per_class"]["bone"]["pixels"] == int((lower_labels == 2).sum())


def test_labels_on_another_voxel_grid_are_refused_in_one_line(ct_pairs: dict, tmp_path: Path) -> None:
    folder = ct_pairs["folder"]
    upper, _ = ct_pairs["upper"]
    lower, _ = ct_pairs["lower"]
    image = nib.load(str(folder / "upper.nii.gz"))
    shifted = image.affine.copy()
    shifted[:3, 3] += [0.0, 0.0, 1.0]  # half a slice off
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), shifted), str(tmp_path / "shifted.nii.gz"))

    def train(upper_labels: Path) -> None:
        config = tmp_path / "bad.yaml"
        config.write_text(yaml.safe_dump({
            "pairs": [{"image": str(upper), "labels": str(upper_labels)},
                      {"image": str(lower), "labels": str(folder / "lower.nii.gz")}],
            "classes": CLASSES, "network": {"channels": [4, 8], "dims": 3}, "patch": [8, 32, 32],
            "output": str(tmp_path / "out"),
        }))  # fmt: skip
        return raymask("train", str(config), "--no-progress")

    assert_one_line_error(train(tmp_path / "shifted.nii.gz"), "shifted.nii.gz", "not on the voxel grid of")
    assert_one_line_error(train(folder / "lower-seg.dcm"), "lower-seg.dcm", "is on no slice of")  # the other half's
    assert not (tmp_path / "out" / "model.pt").exists()


@pytest.mark.parametrize(
    ("suffix", "options"), [(".dcm", []), (".dcm", ["--seg-encoding", "labelmap"]), (".nii.gz", [])]
)
def test_a_volume_store_evaluated_against_its_own_export_scores_perfectly(
    shipped_store, tmp_path: Path, suffix: str, options: list[str]
) -> None:  # type: ignore[no-untyped-def]
    """raymask's own SEG (segments numbered from 1 in class order, matched back by label; BINARY and
    LABELMAP encodings) and NIfTI
    (RAS, axes reversed) of the CT store, read back onto the store's voxels: every voxel agrees."""
    store_path, _ = shipped_store("ct-tissue.yaml")
    out = tmp_path / f"ct{suffix}"
    code, text = cli("export", str(store_path), str(out), *options, "--json")
    assert code == 0, text
    code, text = cli("evaluate", str(store_path), str(out), "--json", "--no-progress")
    assert code == 0, text
    scored = json.loads(text)
    mask = np.asarray(MaskStore.open(store_path).mask[:])
    assert scored["pixels"] == mask.size and scored["accuracy"] == 1.0 and scored["unpredicted"] == 0
    assert np.trace(np.array(scored["confusion"])) == mask.size


def test_a_2d_network_trains_on_a_series_slice_by_slice(ray_session, ct_pairs: dict, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = ct_pairs["folder"]
    upper, _ = ct_pairs["upper"]
    lower, lower_labels = ct_pairs["lower"]
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "pairs": [{"image": str(upper), "labels": str(folder / "upper-seg.dcm")},
                  {"image": str(lower), "labels": str(folder / "lower.nii.gz")}],
        "classes": CLASSES, "network": {"channels": [4, 8]}, "patch": 32, "batch": 2, "epochs": 1, "steps": 2,
        "balance": True, "validation": {"files": ["lower"]}, "output": str(tmp_path / "model"),
    }))  # fmt: skip
    code, out = cli("train", str(config), "--json", "--no-progress")
    assert code == 0, out
    report = json.loads(out)
    card = yaml.safe_load((tmp_path / "model" / "MODEL.yaml").read_text())
    assert card["dims"] == 2 and card["bands"] == ["HU"]
    matrix = np.array(report["classes"]["confusion"])
    assert matrix.sum(1).tolist() == np.bincount(lower_labels.ravel(), minlength=3).tolist()  # every slice
