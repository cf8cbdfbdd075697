"""Shared fixtures: one local Ray per test session, tiny GeoTIFF and model factories, sample data."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
import zarr
from affine import Affine
from rasterio.crs import CRS
from scipy import ndimage

from pipeline.core.stats import NODATA
from pipeline.query import open_store
from pipeline.store import MaskStore

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
S2 = DATA / "sentinel2" / "sen2_20210527_aber_subset.tif"
S2_TINY = DATA / "sentinel2" / "S2A2A_20190723_022_Barbellino_BOA_10.tif"
RGB_BYTE = DATA / "rgb" / "RGB.byte.tif"
LANDSAT = [DATA / "landsat" / "lsat7_2000_30.tif", DATA / "landsat" / "lsat7_2000_40.tif"]
CT_SERIES = DATA / "dicom" / "ct_series"
EDGE_CASES = DATA / "dicom" / "edge_cases"


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the whole session; pipeline runs see it initialised and reuse it."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # as raymask train sets for its own Ray
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)  # as connect() does
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_session: None) -> str:
    """The session Ray's address, for a ``raymask`` subprocess that should join it (RAY_ADDRESS)
    rather than spend seconds starting a Ray of its own."""
    import ray

    return str(ray.get_runtime_context().gcs_address)


class S3Server:
    """moto's standalone S3 server on 127.0.0.1, as GDAL and obstore reach it through the environment."""

    def __init__(self, port: int) -> None:
        self.endpoint = f"http://127.0.0.1:{port}"
        self.env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_S3_ENDPOINT": f"127.0.0.1:{port}",  # GDAL's /vsis3/ (raymask derives obstore's from it)
            "AWS_HTTPS": "NO",
            "AWS_VIRTUAL_HOSTING": "FALSE",
        }

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )  # fmt: skip

    def put(self, local: Path, url: str) -> str:
        """Upload ``local`` to ``s3://bucket/key`` (the bucket made if missing); returns ``url``."""
        bucket, _, key = url.removeprefix("s3://").partition("/")
        client = self.client()
        if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=bucket)
        client.upload_file(str(local), bucket, key)
        return url

    def put_tree(self, folder: Path, url: str) -> str:
        """Upload every file under ``folder`` to the prefix ``url`` (a store copied to object storage)."""
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            self.put(path, f"{url.rstrip('/')}/{path.relative_to(folder).as_posix()}")
        return url


@contextlib.contextmanager
def moto_server(log: Path, **env: str) -> Iterator[S3Server]:
    """moto's standalone S3 server on a free port of 127.0.0.1 (``env``: moto's own settings, e.g.
    ``INITIAL_NO_AUTH_ACTION_COUNT``), started here and stopped by its PID."""
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    moto = Path(sys.executable).parent / "moto_server"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **env},
        )  # fmt: skip
    server = S3Server(port)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{server.endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start: {log.read_text()[-500:]}") from None
                time.sleep(0.2)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One S3-compatible server (moto) for the test session."""
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


def s3_units_done(url: str) -> int:
    """Work units done in the store at ``url`` (0 while it is not created yet)."""
    from pipeline.store import MaskStore

    try:
        return int(np.asarray(MaskStore.open(url).units_done()).sum())
    except Exception:  # not created yet
        return 0


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The session's S3 server, with this test's environment pointing GDAL and obstore at it."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture(autouse=True)
def _in_tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run in their own folder, so relative output paths never touch the checkout."""
    monkeypatch.chdir(tmp_path)


def processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(proc.name))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def kill_all(pids_of: Callable[[], list[int]], timeout: float = 30.0) -> None:
    """SIGKILL every process ``pids_of`` names until none is left (workers can outlive a killed driver)."""
    deadline = time.monotonic() + timeout
    while (pids := pids_of()) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    assert not pids_of(), "Ray processes of the killed driver survived"


GeoTiffFactory = Callable[..., Path]


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    """``raymask run ARGS --json`` through the real entry point; the parsed summary."""
    import json

    from pipeline.cli import main

    code = main(["run", *args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return dict(json.loads(captured.out))


@pytest.fixture
def make_geotiff(tmp_path: Path) -> GeoTiffFactory:
    """Write a GeoTIFF from an array ``(bands, rows, cols)``; returns its path."""

    def make(
        data: np.ndarray,
        *,
        name: str = "image.tif",
        crs: str | None = "EPSG:32631",
        transform: Affine | None = None,
        nodata: float | None = None,
    ) -> Path:
        path = tmp_path / name
        bands, rows, cols = data.shape
        profile = {
            "driver": "GTiff",
            "height": rows,
            "width": cols,
            "count": bands,
            "dtype": data.dtype.name,
            "transform": transform or Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5700000.0),
            "tiled": True,
            "blockxsize": 16,
            "blockysize": 16,
        }
        if crs:
            profile["crs"] = CRS.from_string(crs)
        if nodata is not None:
            profile["nodata"] = nodata
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
        return path

    return make


def tiny_unet(bands: int, classes: int, *, seed: int = 0):  # type: ignore[no-untyped-def]
    """A random-weight U-Net-like CNN: total stride 4, BatchNorm in eval mode, skip connection.

    Receptive radius: 3x3 convs at full (1 px each), half (2 px) and quarter (4 px) resolution
    plus the downsampling convs and nearest upsampling add up to well under 24 px, the halo
    the exactness tests use; halo 0 must show seams.
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class TinyUNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Sequential(nn.Conv2d(bands, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.down = nn.Sequential(
                nn.Conv2d(8, 16, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 16, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 16, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 16, 3, padding=1),
                nn.ReLU(),
            )
            self.up = nn.Sequential(nn.Upsample(scale_factor=4, mode="nearest"), nn.Conv2d(16, 8, 3, padding=1))
            self.head = nn.Conv2d(16, classes, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            skip = self.enc(x)
            return self.head(torch.cat([skip, self.up(self.down(skip))], dim=1))

    model = TinyUNet().eval()
    with torch.no_grad():
        bn = model.enc[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture
def scripted_unet(tmp_path: Path) -> Callable[..., Path]:
    """Save ``tiny_unet`` as TorchScript and return the file's path."""

    def make(bands: int = 3, classes: int = 3, *, seed: int = 0) -> Path:
        import torch

        path = tmp_path / f"unet-{bands}-{classes}-{seed}.pt"
        torch.jit.save(torch.jit.script(tiny_unet(bands, classes, seed=seed)), str(path))
        return path

    return make


def scipy_table(mask: np.ndarray, connectivity: int) -> tuple[list[tuple], np.ndarray]:
    """What scipy.ndimage.label finds, class by class: sorted rows ``(class, size, (start, stop) per
    axis)`` and one label image with every class's regions numbered apart."""
    from scipy import ndimage

    from pipeline.core.regions import structure
    from pipeline.core.stats import NODATA

    struct = structure(mask.ndim, connectivity)
    rows, labels, offset = [], np.zeros(mask.shape, dtype=np.int64), 0
    for cls in np.unique(mask[mask != NODATA]):
        lab, n = ndimage.label(mask == cls, structure=struct)
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        for i, box in enumerate(ndimage.find_objects(lab)):
            rows.append((int(cls), int(sizes[i + 1]), *[(s.start, s.stop) for s in box]))
        labels[lab > 0] = lab[lab > 0] + offset
        offset += n
    return sorted(rows), labels


# What a store holds, independent of where and when it was made: every data file's sha256 (chunks
# of the mask, unit statistics, regions, region table, image), and the metadata that describes
# the result. Left out: times, paths, versions and the random tokens of a regions swap.
_STABLE_META = ("classes", "stats", "shape", "chunk", "crs", "transform", "measure", "arrays", "volume", "status")


def store_digest(path: Path) -> dict[str, object]:
    import hashlib
    import json

    files = {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != "zarr.json" and not p.name.endswith(".png")
    }
    meta = json.loads((path / "zarr.json").read_text())["attributes"]["raymask"]
    stable = {key: meta.get(key) for key in _STABLE_META}
    if isinstance(meta.get("regions"), dict):
        stable["regions"] = {k: v for k, v in meta["regions"].items() if k != "token"}
    return {"files": files, "meta": json.loads(json.dumps(stable))}


# -- configs and stores shared by several test modules ------------------------------------------

JOB_CONFIGS = [p for p in sorted((ROOT / "configs").glob("*.yaml"))
               if "inputs" not in yaml.safe_load(p.read_text()) and not p.name.startswith("train-")]  # fmt: skip
TRAIN_CONFIGS = sorted((ROOT / "configs").glob("train-*.yaml"))  # raymask train's (tests/test_train.py)


@pytest.fixture(scope="session")
def shipped_store(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, dict]]:
    """``shipped_store("ct-tissue.yaml")``: that shipped config run once per test session through the
    CLI (``raymask run configs/NAME --json``, only the output path moved), as (store, summary).

    Several modules read the demo stores; each is made once. Tests read them and never write them
    (test_pipeline checks their bytes against tests/fixtures/store_digests.json).
    """
    import io
    import json

    from pipeline.cli import main

    made: dict[str, tuple[Path, dict]] = {}

    def get(name: str) -> tuple[Path, dict]:
        if name not in made:
            store = tmp_path_factory.mktemp(name.removesuffix(".yaml")) / "out.zarr"
            out = io.StringIO()
            with contextlib.chdir(ROOT), contextlib.redirect_stdout(out):
                code = main(["run", f"configs/{name}", "--set", f"output.path={store}", "--json", "--no-progress"])
            assert code == 0, f"raymask run configs/{name} exited {code}"
            made[name] = (store, json.loads(out.getvalue()))
        return made[name]

    return get


def write_config(path: Path, **sections: object) -> Path:
    """A job (or batch) config file from its sections, as YAML: ``write_config(p, source={...}, ...)``."""
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def chunk_bytes(store: Path) -> dict[str, bytes]:
    root = store / "mask" / "c"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def units_done(store: Path) -> int:
    try:
        return int((zarr.open_array(str(store / "units" / "pixels"), mode="r")[..., 0] >= 0).sum())
    except Exception:  # the store may not exist yet, or be mid-creation
        return 0


def unet_job(tmp_path: Path, make_geotiff: GeoTiffFactory, scripted_unet, *, store: str, seed: int) -> Path:
    """A 512 x 448 job of 56 tiles for the tiny U-Net, one tile per model call, so it runs long enough to hit."""
    image = make_geotiff(np.random.default_rng(seed).normal(size=(3, 512, 448)).astype(np.float32))
    model = scripted_unet(3, 3)
    return write_config(
        tmp_path / "job.yaml",
        source={"path": str(image)},
        model={"kind": "torchscript", "path": str(model), "classes": ["a", "b", "c"], "stride": 4,
               "receptive_radius": 20},
        tiling={"chunk": 64, "halo": 24},
        output={"path": f"{tmp_path}/{store}", "preview": False},
        regions={"enabled": False},  # the jobs' tests are about units: killed, resumed, placed
        runtime={"batch_size": 1},
    )  # fmt: skip


def assert_store_equals_scipy(store: MaskStore, mask: np.ndarray, connectivity: int) -> None:
    regions = np.asarray(store.regions()[...])
    frame = open_store(store.path).regions()
    axes = ["row", "col"] if mask.ndim == 2 else ["slice", "row", "col"]
    size = "pixels" if mask.ndim == 2 else "voxels"
    ours = sorted(
        (int(r["class"]), int(r[size]), *[(int(r[f"{a}_start"]), int(r[f"{a}_stop"])) for a in axes])
        for r in frame.to_dict(orient="records")
    )
    expected, theirs = scipy_table(mask, connectivity)
    assert ours == expected
    # The array agrees with the table: ids 1..n, each region's pixels are its class and its count.
    n = len(frame)
    assert list(frame["id"]) == list(range(1, n + 1))
    assert np.array_equal(np.bincount(regions.ravel(), minlength=n + 1)[1:], frame[size].to_numpy())
    assert ((regions > 0) == (mask != NODATA)).all()
    if n:
        classes = ndimage.maximum(mask, regions, np.arange(1, n + 1))
        assert np.array_equal(np.asarray(classes), frame["class"].to_numpy())
        # Same partition as scipy: our ids and scipy's map one to one.
        pairs = np.unique(np.stack([regions[regions > 0], theirs[theirs > 0]]), axis=1)
        assert pairs.shape[1] == n == theirs.max()
