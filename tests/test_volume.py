"""Volumetric jobs: a real CT series and synthetic DICOM series through the CLI and a local Ray."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import zarr
from hypothesis import given
from hypothesis import strategies as st
from ome_zarr_models.v05.image import Image
from ome_zarr_models.v05.image_label import ImageLabel
from pydicom.uid import ExplicitVRLittleEndian
from torch import nn

from pipeline.cli import main
from pipeline.core.volume import axis_mapping, remap_axes
from tests.conftest import CT_SERIES, EDGE_CASES, write_config
from tests.conftest import run_json as run

pytestmark = pytest.mark.usefixtures("ray_session")
UPPER = [-900, -500, -30, 300]


def independent_hu_volume() -> tuple[np.ndarray, list[pydicom.Dataset]]:
    """HU straight from pydicom, slices sorted by z (this series is axial, normal +z)."""
    slices = sorted((pydicom.dcmread(p) for p in CT_SERIES.iterdir()), key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in slices])
    return hu, slices


def test_ct_tissue_job_volumes_equal_an_independent_computation(shipped_store) -> None:
    path, summary = shipped_store("ct-tissue.yaml")  # the shipped config reads data/dicom/ct_series
    hu, _ = independent_hu_volume()
    labels = np.digitize(hu, UPPER)  # class i: UPPER[i-1] <= HU < UPPER[i]
    voxel_mm3 = 0.9765625 * 0.9765625 * 2.0
    for cid, name in enumerate(["air", "lung", "fat", "soft tissue", "bone"]):
        row = summary["classes"][name]
        count = int((labels == cid).sum())
        assert row["pixels"] == count
        assert row["volume_mm3"] == pytest.approx(count * voxel_mm3, rel=1e-12)
        assert row["volume_ml"] == pytest.approx(count * voxel_mm3 / 1000, rel=1e-12)
    store = zarr.open_group(path, mode="r")
    np.testing.assert_array_equal(store["labels/mask/0"][:], labels)
    np.testing.assert_array_equal(store["0"][:], hu)  # the ingested image is HU, in slice order
    assert hu.min() == -1024 and hu.max() == 1839


def test_volume_store_is_valid_ome_zarr_with_the_patient_affine(
    shipped_store, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path, _ = shipped_store("ct-tissue.yaml")
    group = zarr.open_group(path, mode="r")
    image = Image.from_zarr(group)  # ome-zarr-models validates NGFF 0.5 on load
    scale = image.attributes.ome.multiscales[0].datasets[0].coordinateTransformations[0].scale
    assert list(scale) == [2.0, 0.9765625, 0.9765625]
    label = ImageLabel.from_zarr(group["labels/mask"])
    assert [p.model_dump(by_alias=True)["class"] for p in label.attributes.ome.image_label.properties] == [
        "air",
        "lung",
        "fat",
        "soft tissue",
        "bone",
    ]
    affine = np.asarray(group.attrs["raymask"]["volume"]["affine"])
    _, slices = independent_hu_volume()
    for k, ds in enumerate(slices):
        np.testing.assert_allclose((affine @ [k, 0, 0, 1])[:3], [float(v) for v in ds.ImagePositionPatient])

    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["spacing"] == [2.0, 0.9765625, 0.9765625] and info["crs"] is None and info["status"] == "complete"
    assert info["stats"]["classes"]["bone"]["volume_ml"] > 0
    assert info["shape"] == [20, 512, 512]

    assert main(["export", str(path), str(tmp_path / "ct.tif")]) == 1  # GeoTIFF export refuses a volume
    assert "a volume store; GeoTIFF export takes 2-D masks" in capsys.readouterr().err


def test_several_series_in_one_folder_are_refused_with_the_list(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    shutil.copytree(CT_SERIES, folder)
    shutil.copy(EDGE_CASES / "693_UNCR.dcm", folder / "other.dcm")
    config = write_config(
        tmp_path / "job.yaml", source={"path": str(folder)}, model={"kind": "hu-tissue"}, output={"path": "out.zarr"}
    )
    assert main(["run", str(config)]) == 1
    assert not Path("out.zarr").exists()


# -- 3-D exactness on a synthetic series -------------------------------------------------------


def write_series(folder: Path, volume: np.ndarray, *, spacing: tuple[float, float, float] = (2.5, 0.8, 0.8)) -> None:
    """Single-frame CT files from a real header, with new pixels, positions and UIDs."""
    template = pydicom.dcmread(EDGE_CASES / "693_UNCR.dcm")
    folder.mkdir()
    series_uid = pydicom.uid.generate_uid()
    for k, plane in enumerate(volume):
        ds = template.copy()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.Rows, ds.Columns = plane.shape
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-100.0, -80.0, 40.0 - k * spacing[0]]  # files run head to feet
        ds.InstanceNumber = k + 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = (plane + 1024).astype(np.int16).tobytes()
        ds.save_as(folder / f"slice{k:03d}", enforce_file_format=True)


def tiny_unet3d(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU())
            self.down = nn.Sequential(nn.Conv3d(4, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv3d(8, 8, 3, padding=1))
            self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(8, 4, 3, padding=1))
            self.head = nn.Conv3d(8, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            skip = self.enc(x)
            return self.head(torch.cat([skip, self.up(torch.relu(self.down(skip)))], dim=1))

    return Net().eval()


@pytest.mark.parametrize(("halo", "exact"), [(12, True), pytest.param(0, False, marks=pytest.mark.slow)])
def test_3d_tiling_equals_whole_volume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], halo: int, exact: bool
) -> None:
    rng = np.random.default_rng(5)
    volume = rng.normal(0, 200, size=(23, 39, 35)).cumsum(axis=0).round()  # odd sides, HU-like
    write_series(tmp_path / "series", volume)
    model_path = tmp_path / "unet3d.pt"
    net = tiny_unet3d()
    torch.jit.save(torch.jit.script(net), str(model_path))
    config = write_config(
        tmp_path / "job.yaml",
        source={"path": str(tmp_path / "series")},
        model={"kind": "torchscript", "path": str(model_path), "dims": 3, "classes": ["a", "b", "c"], "stride": 2,
               "receptive_radius": 10, "scale": 0.005},
        tiling={"chunk": [8, 16, 16], "halo": halo},
        output={"path": f"{tmp_path}/tiled.zarr", "preview": False},
    )  # fmt: skip
    summary = run(capsys, str(config))
    assert summary["exact"] is exact and summary["units_total"] == 3 * 3 * 3
    hu = volume[::-1]  # positions descend with file index, so slice order reverses
    padded = np.pad(hu, [(0, -s % 2) for s in hu.shape], mode="edge") * 0.005
    with torch.inference_mode():
        reference = net(torch.from_numpy(padded[None, None].astype(np.float32)))[0].max(0).indices.numpy()
    reference = reference[: hu.shape[0], : hu.shape[1], : hu.shape[2]]
    labels = zarr.open_array(f"{tmp_path}/tiled.zarr/labels/mask/0", mode="r")[:]
    assert len(np.unique(reference)) > 1
    if exact:
        np.testing.assert_array_equal(labels, reference)
    else:
        assert (labels != reference).sum() > 0


def test_a_2d_network_runs_slice_by_slice_on_a_volume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], scripted_unet
) -> None:
    rng = np.random.default_rng(9)
    volume = rng.normal(0, 300, size=(5, 37, 41)).round()
    write_series(tmp_path / "series", volume)
    model_path = scripted_unet(1, 3)
    config = tmp_path / "job.yaml"
    write_config(
        config,
        source={"path": str(tmp_path / "series")},
        model={"kind": "torchscript", "path": str(model_path), "classes": ["a", "b", "c"], "stride": 4,
               "receptive_radius": 20, "scale": 0.01},
        tiling={"chunk": [2, 16, 16], "halo": 24},
        output={"path": f"{tmp_path}/slices.zarr", "preview": False},
    )  # fmt: skip
    summary = run(capsys, str(config))
    assert summary["exact"] is True
    net = torch.jit.load(str(model_path)).eval()
    hu = volume[::-1]
    labels = zarr.open_array(f"{tmp_path}/slices.zarr/labels/mask/0", mode="r")[:]
    for k, plane in enumerate(hu):
        padded = np.pad(plane, [(0, -s % 4) for s in plane.shape], mode="edge") * 0.01
        with torch.inference_mode():
            expected = net(torch.from_numpy(padded[None, None].astype(np.float32)))[0].max(0).indices.numpy()
        np.testing.assert_array_equal(labels[k], expected[: plane.shape[0], : plane.shape[1]])


def test_single_frame_dicom_is_a_2d_image_with_mm2_areas(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "job.yaml"
    write_config(
        config,
        source={"path": str(EDGE_CASES / "693_J2KR.dcm")},
        model={"kind": "hu-tissue"},
        tiling={"chunk": 128},
        output={"path": f"{tmp_path}/slice.zarr"},
    )
    summary = run(capsys, str(config))
    ds = pydicom.dcmread(EDGE_CASES / "693_J2KR.dcm")
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    labels = np.digitize(hu, UPPER)
    pixel_mm2 = float(ds.PixelSpacing[0]) * float(ds.PixelSpacing[1])
    for cid, name in enumerate(["air", "lung", "fat", "soft tissue", "bone"]):
        row = summary["classes"][name]
        assert row["pixels"] == int((labels == cid).sum())
        assert row["area_mm2"] == pytest.approx(row["pixels"] * pixel_mm2)
        assert row["area_cm2"] == pytest.approx(row["pixels"] * pixel_mm2 / 100)
    np.testing.assert_array_equal(zarr.open_array(f"{tmp_path}/slice.zarr/mask", mode="r")[:], labels)
    assert Path(summary["preview"]).is_file()


def test_single_frame_without_pixel_spacing_counts_pixels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "job.yaml"
    write_config(
        config,
        source={"path": str(EDGE_CASES / "JPGLosslessP14SV1_1s_1f_8b.dcm")},
        model={"kind": "hu-tissue", "classes": ["dark", "bright"], "upper": [128]},
        tiling={"chunk": 256},
        output={"path": f"{tmp_path}/us.zarr", "preview": False},
    )
    summary = run(capsys, str(config))
    pixels = pydicom.dcmread(EDGE_CASES / "JPGLosslessP14SV1_1s_1f_8b.dcm").pixel_array
    assert summary["classes"]["bright"]["pixels"] == int((pixels >= 128).sum())
    assert "area_mm2" not in summary["classes"]["bright"]
    assert any("no PixelSpacing" in note for note in summary["notes"])


def test_a_3d_model_without_a_z_halo_is_not_called_exact(tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.jobs.run import prepare

    write_series(tmp_path / "series", np.zeros((6, 16, 16)))
    model_path = tmp_path / "unet3d.pt"
    torch.jit.save(torch.jit.script(tiny_unet3d()), str(model_path))
    config = tmp_path / "job.yaml"
    write_config(
        config,
        source={"path": str(tmp_path / "series")},
        model={"kind": "torchscript", "path": str(model_path), "dims": 3, "classes": ["a", "b", "c"], "stride": 2,
               "receptive_radius": 10},
        tiling={"chunk": [2, 8, 8], "halo": [0, 12, 12]},
        output={"path": f"{tmp_path}/x.zarr"},
    )  # fmt: skip
    job = prepare(load_config(config))
    assert job.context_halo == 0 and job.exact is False
    job = prepare(load_config(config, ["tiling.halo=[12, 12, 12]"]))
    assert job.context_halo == 12 and job.exact is True


@given(
    order=st.permutations([0, 1, 2]), backwards=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    shape=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6)), seed=st.integers(0, 1000),
)  # fmt: skip
def test_labels_in_any_axis_order_and_direction_map_back_onto_the_volume(
    order: list[int], backwards: tuple[bool, bool, bool], shape: tuple[int, int, int], seed: int
) -> None:
    """A label array stored with its axes permuted and flipped (NIfTI's (i, j, k), a SEG bottom-up),
    with the affine that says so, lines up voxel for voxel with the volume; one voxel's shift does not."""
    rng = np.random.default_rng(seed)
    volume = rng.integers(0, 9, shape)
    rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    target = np.eye(4)
    target[:3, :3] = rotation * np.array([2.0, 0.7, 0.7])
    target[:3, 3] = rng.normal(size=3) * 100
    stored = np.transpose(volume, order)  # stored axis a = volume axis order[a]
    stored_affine = np.eye(4)
    for a, axis in enumerate(order):
        step = target[:3, axis] * (-1 if backwards[a] else 1)
        stored_affine[:3, a] = step
        if backwards[a]:
            stored = np.flip(stored, a)
            stored_affine[:3, 3] += target[:3, axis] * (shape[axis] - 1)
    stored_affine[:3, 3] += target[:3, 3]
    axes = axis_mapping(target, shape, stored_affine, stored.shape)
    assert axes is not None
    assert np.array_equal(remap_axes(stored, axes), volume)
    shifted = stored_affine.copy()
    shifted[:3, 3] += stored_affine[:3, 0]
    assert axis_mapping(target, shape, shifted, stored.shape) is None
