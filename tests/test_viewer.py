"""`raymask serve` (issue 15): the JSON API and the tiles against the stores they are read from, the
pages and their shipped scripts, and the server's safety (read-only, nothing outside the folder,
4xx never a traceback). The server runs in a thread of the test, on a free port of 127.0.0.1."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.webtiles import level_for
from pipeline.store import MaskStore
from pipeline.viewer import render
from pipeline.viewer.server import make_server


class Client:
    def __init__(self, base: str) -> None:
        self.base = base

    def get(self, path: str, method: str = "GET") -> tuple[int, str, bytes]:
        request = urllib.request.Request(self.base + path, method=method)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.headers["Content-Type"], response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers["Content-Type"], exc.read()

    def json(self, path: str) -> object:
        status, kind, body = self.get(path)
        assert status == 200 and kind == "application/json", (status, body[:300])
        return json.loads(body)

    def png(self, path: str) -> np.ndarray:
        status, kind, body = self.get(path)
        assert status == 200 and kind == "image/png", (status, body[:300])
        image = Image.open(io.BytesIO(body))
        return np.asarray(image.convert("RGBA") if image.mode == "P" else image)


@contextlib.contextmanager
def serving(shipped_store, root: Path, names: dict[str, str]) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """Copies of shipped stores (config -> name under ``root``; the shipped ones are never touched),
    served from a thread of the test; yields the base URL."""
    for config, name in names.items():
        store, _ = shipped_store(config)
        shutil.copytree(store, root / name)
    server = make_server(root, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def served(shipped_store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Client, Path]]:  # type: ignore[no-untyped-def]
    """The two demo stores in one folder, served."""
    root = tmp_path_factory.mktemp("served")
    names = {"aerial-vegetation.yaml": "wales/aber.zarr", "ct-tissue.yaml": "ct.zarr"}
    with serving(shipped_store, root, names) as base:
        yield Client(base), root


def test_the_catalog_lists_every_store_with_its_status_and_measures(served) -> None:  # type: ignore[no-untyped-def]
    client, root = served
    rows = {r["name"]: r for r in client.json("/api/stores")}  # type: ignore[union-attr]
    assert sorted(rows) == ["ct.zarr", "wales/aber.zarr"]
    aber = MaskStore.open(root / "wales/aber.zarr")
    assert rows["wales/aber.zarr"]["kind"] == "map" and rows["ct.zarr"]["kind"] == "volume"
    assert rows["wales/aber.zarr"]["status"] == "complete"
    assert rows["wales/aber.zarr"]["stats"]["classes"] == json.loads(json.dumps(aber.info.stats["classes"]))
    assert rows["wales/aber.zarr"]["region_count"] == aber.regions_info["count"]
    assert rows["wales/aber.zarr"]["units_done"] == rows["wales/aber.zarr"]["units_total"] > 0
    for name in rows:
        thumb = client.png(f"/api/stores/{name}/thumbnail.png")
        assert thumb.ndim == 3 and thumb.shape[2] == 4 and max(thumb.shape[:2]) <= 160


def test_mask_tiles_are_the_stored_classes_in_their_colours(served) -> None:  # type: ignore[no-untyped-def]
    """At the deepest zoom a tile is 256 store pixels 1:1; at zoom 0 the whole image, from the levels."""
    client, root = served
    store = MaskStore.open(root / "wales/aber.zarr")
    mask = np.asarray(store.mask[:])
    record = client.json("/api/stores/wales/aber.zarr")
    top = record["tiles"]["max_zoom"]  # type: ignore[index]
    lut = render.class_lut(store)
    tile = client.png(f"/api/stores/wales/aber.zarr/tiles/mask/{top}/1/0.png")
    expected = lut[mask[0:256, 256:512]]
    assert np.array_equal(tile[: expected.shape[0], : expected.shape[1]], expected)
    assert (tile[expected.shape[0] :, :, 3] == 0).all() and (tile[:, expected.shape[1] :, 3] == 0).all()
    hidden = client.png(f"/api/stores/wales/aber.zarr/tiles/mask/{top}/0/0.png?hide=1")
    assert (hidden[..., 3][mask[:256, :256] == 1] == 0).all()  # vegetation toggled off from the legend
    whole = client.png("/api/stores/wales/aber.zarr/tiles/mask/0/0/0.png")
    level = np.asarray(render.level_array(store, store.info.levels[0])[:])  # zoom 0 = every 2nd: level 1
    assert np.array_equal(whole[: level.shape[0], : level.shape[1]], lut[level])
    image = client.png(f"/api/stores/wales/aber.zarr/tiles/image/{top}/0/0.png")
    assert image.shape[:2] == (256, 256) and image[..., :3].std() > 0


def test_points_and_regions_are_what_the_store_holds(served) -> None:  # type: ignore[no-untyped-def]
    from pipeline.query.view import open_store

    client, root = served
    view = open_store(root / "wales/aber.zarr")
    here = client.json("/api/stores/wales/aber.zarr/point?row=120&col=70")
    expected = view.at((70.5, 120.5), crs="pixel")
    assert here["class_name"] == expected["class_name"] and here["region"]["id"] == expected["region"]["id"]  # type: ignore[index]
    table = client.json("/api/stores/wales/aber.zarr/regions?sort=area_m2&desc=1&limit=5&class=vegetation")
    frame = view.regions("vegetation").sort_values("area_m2", ascending=False, kind="stable")
    assert table["count"] == len(frame)  # type: ignore[index]
    assert [r["id"] for r in table["rows"]] == frame["id"].head(5).tolist()  # type: ignore[index]
    ct = client.json("/api/stores/ct.zarr/point?row=256&col=256&slice=10")
    assert (
        ct["index"] == [10, 256, 256]
        and ct["class_name"]
        == open_store(root / "ct.zarr").at(  # type: ignore[index]
            (256.5, 256.5, 10.5), crs="pixel"
        )["class_name"]
    )


def test_volume_slices_are_the_hu_image_through_the_window_and_the_labels(served) -> None:  # type: ignore[no-untyped-def]
    client, root = served
    store = MaskStore.open(root / "ct.zarr")
    record = client.json("/api/stores/ct.zarr")
    assert record["shape"] == [20, 512, 512] and len(record["spacing_mm"]) == 3  # type: ignore[index]
    hu = np.asarray(store.image[10]).astype("float64")  # type: ignore[index]
    centre, width = render.WINDOWS["bone"]
    expected = (np.clip((hu - (centre - width / 2)) / width, 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(client.png("/api/stores/ct.zarr/slices/axial/10.png?window=bone"), expected)
    coronal = client.png("/api/stores/ct.zarr/slices/labels/coronal/256.png")
    assert coronal.shape == (20, 512, 4)
    lut = render.class_lut(store)
    assert np.array_equal(coronal, lut[np.asarray(store.mask[:, 256, :])[::-1]])  # the first slice at the bottom
    sagittal = client.png("/api/stores/ct.zarr/slices/sagittal/100.png?window=lung&centre=0&width=1000")
    assert sagittal.shape == (20, 512)


@pytest.mark.parametrize(
    "path",
    [
        "/api/stores/../../etc/passwd",
        "/api/stores/%2e%2e/%2e%2e/etc/passwd.zarr",
        "/api/stores/..%2F..%2Fetc%2Fpasswd.zarr",
        "/static/../../pyproject.toml",
        "/static/%2e%2e/server.py",
        "/static/..%2fserver.py",
        "/api/stores/outside.zarr",  # a symbolic link in the folder to a store outside it
        "/api/stores/outside.zarr/thumbnail.png",
        "/nowhere",
    ],
)
def test_nothing_outside_the_folder_is_reachable(served, path: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client, root = served
    if not (root / "outside.zarr").exists():
        outside = tmp_path / "elsewhere.zarr"
        shutil.copytree(root / "wales" / "aber.zarr", outside)
        (root / "outside.zarr").symlink_to(outside)
    status, kind, body = client.get(path)
    assert status == 404 and kind == "application/json", (status, body[:200])
    assert b"Traceback" not in body and b"root:" not in body


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/stores/wales/aber.zarr/tiles/mask/a/0/0.png", 400),
        ("/api/stores/wales/aber.zarr/tiles/mask/30/0/0.png", 404),
        ("/api/stores/wales/aber.zarr/tiles/mask/0/-1/0.png", 404),
        ("/api/stores/wales/aber.zarr/tiles/image/1/0/0.png?bands=1,x", 400),
        ("/api/stores/wales/aber.zarr/tiles/image/1/0/0.png?bands=99,1,2", 400),
        ("/api/stores/wales/aber.zarr/point?row=abc&col=1", 400),
        ("/api/stores/wales/aber.zarr/point?col=1", 400),
        ("/api/stores/wales/aber.zarr/regions?sort=nope", 400),
        ("/api/stores/wales/aber.zarr/regions?limit=0", 400),
        ("/api/stores/wales/aber.zarr/regions?class=nope", 400),
        ("/api/stores/wales/aber.zarr/tiles/mask/0/0/0.png?hide=a", 400),
        ("/api/stores/ct.zarr/slices/axial/99.png", 400),
        ("/api/stores/ct.zarr/slices/axial/1.png?window=brain", 400),
        ("/api/stores/ct.zarr/slices/axial/1.png?centre=nan", 400),
        ("/api/stores/ct.zarr/tiles/mask/0/0/0.png", 400),
        ("/api/stores/wales/aber.zarr/slices/axial/1.png", 400),
        ("/api/stores/wales/aber.zarr/whatever", 404),
    ],
)
def test_malformed_requests_get_a_4xx_with_one_line(served, path: str, status: int) -> None:  # type: ignore[no-untyped-def]
    client, _ = served
    got, kind, body = client.get(path)
    assert got == status and kind == "application/json", (got, body[:300])
    error = json.loads(body)["error"]
    assert "\n" not in error and "Traceback" not in error


def test_the_server_is_read_only(served) -> None:  # type: ignore[no-untyped-def]
    client, root = served
    before = sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file())
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert client.get("/api/stores/ct.zarr", method=method)[0] == 405
    for path in (
        "/api/stores",
        "/api/stores/wales/aber.zarr/tiles/mask/0/0/0.png",
        "/api/stores/ct.zarr/thumbnail.png",
    ):
        client.get(path)
    after = sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file())
    assert before == after


def test_the_pages_and_their_scripts_are_served_from_the_package(served) -> None:  # type: ignore[no-untyped-def]
    """Leaflet comes from npm at build time (make) and ships in the package: no page names another host."""
    import re

    client, _ = served
    for page in ("/", "/map/wales/aber.zarr", "/volume/ct.zarr", "/frames/x.zarr"):
        status, kind, body = client.get(page)
        assert status == 200 and kind.startswith("text/html"), page
        for ref in re.findall(rb'(?:src|href)="([^"]+)"', body):
            if ref == b"data:,":  # the empty favicon: no request at all
                continue
            assert ref.startswith(b"/"), f"{page} loads {ref!r} from elsewhere"
            assert client.get(ref.decode())[0] == 200, ref
    status, kind, body = client.get("/static/vendor/leaflet/leaflet.js")
    assert status == 200 and kind == "text/javascript" and b"Leaflet" in body[:2000]


@pytest.mark.slow  # runs a job beside the server
def test_a_store_being_written_is_served_with_its_progress(  # type: ignore[no-untyped-def]
    tmp_path: Path, make_geotiff, scripted_unet
) -> None:
    """The server answers while a job writes a store in its folder: the catalog shows it incomplete with
    its units done, its tiles and record are served, and it is complete once the job ends."""
    import subprocess
    import sys
    import time

    import yaml

    from tests.conftest import unet_job

    served = tmp_path / "served"
    served.mkdir()
    config = unet_job(tmp_path, make_geotiff, scripted_unet, store="served/scene.zarr", seed=9)
    raw = yaml.safe_load(config.read_text())
    raw["runtime"]["engine"] = "process"
    config.write_text(yaml.safe_dump(raw))
    server = make_server(served, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = Client(f"http://127.0.0.1:{server.server_address[1]}")
    job = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config), "--no-progress"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    seen_incomplete = False
    try:
        deadline = time.monotonic() + 240
        while job.poll() is None and time.monotonic() < deadline:
            rows = client.json("/api/stores")
            assert isinstance(rows, list)
            if rows and rows[0].get("status") == "incomplete" and 0 < rows[0]["units_done"] < rows[0]["units_total"]:
                seen_incomplete = True
                assert client.get("/api/stores/scene.zarr/tiles/mask/0/0/0.png")[0] == 200
                assert client.get("/api/stores/scene.zarr/thumbnail.png")[0] == 200
            time.sleep(0.1)
        assert job.wait(timeout=240) == 0, job.stderr.read() if job.stderr else ""
        assert seen_incomplete, "the store was never seen part-written"
        (row,) = client.json("/api/stores")  # type: ignore[misc]
        assert row["status"] == "complete" and row["units_done"] == row["units_total"] == 56
        store = MaskStore.open(served / "scene.zarr")  # the tiles now: every unit, none left out as read midway
        top = client.json("/api/stores/scene.zarr")["tiles"]["max_zoom"]  # type: ignore[index]
        for z in (0, top):
            tile = client.png(f"/api/stores/scene.zarr/tiles/mask/{z}/0/0.png")
            step = 2 ** (top - z)
            level = level_for(step, len(store.info.levels or []))
            array = store.mask if level == 0 else render.level_array(store, store.info.levels[level - 1])  # type: ignore[index]
            k = step // 2**level
            mask = np.asarray(array[: 256 * k : k, : 256 * k : k])
            assert np.array_equal(tile[: mask.shape[0], : mask.shape[1]], render.class_lut(store)[mask])
    finally:
        if job.poll() is None:
            job.kill()
        server.shutdown()
        server.server_close()


def _stretched(values: np.ndarray, limits: list[np.ndarray]) -> np.ndarray:
    out = [np.clip((b.astype("float64") - lo) * 255 / (hi - lo), 0, 255).astype(np.uint8) for b, (lo, hi) in
           zip(values, limits, strict=True)]  # fmt: skip
    return np.dstack(out * 3 if len(out) == 1 else out)


def test_image_tiles_are_the_source_stretched_at_every_zoom(shipped_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """RGB.byte.tif (791 x 718, nodata 0, no overviews): at full resolution a tile is the source's
    pixels, at zoom 0 every 4th of them from the display pyramid; each band stretched between its 2nd and
    98th percentile (of every 2nd pixel with data); transparent where the source has no data."""
    import rasterio

    from tests.conftest import RGB_BYTE

    with rasterio.open(RGB_BYTE) as src:
        data = src.read(masked=True)
    values, valid = np.ma.getdata(data), ~np.ma.getmaskarray(data).any(axis=0)
    limits = [np.percentile(b[::2, ::2][valid[::2, ::2]], [2, 98]) for b in values]
    with serving(shipped_store, tmp_path, {"rgb-vegetation.yaml": "rgb.zarr"}) as base:
        client = Client(base)
        top = client.json("/api/stores/rgb.zarr")["tiles"]["max_zoom"]  # type: ignore[index]
        assert top == 2
        for z, x, y in [(top, 1, 1), (top, 0, 0), (top, 3, 2), (0, 0, 0), (1, 1, 0)]:
            step = 2 ** (top - z)
            rows = slice(y * 256 * step, (y + 1) * 256 * step, step)
            cols = slice(x * 256 * step, (x + 1) * 256 * step, step)
            expected, ok = _stretched(values[:, rows, cols], limits), valid[rows, cols]
            tile = client.png(f"/api/stores/rgb.zarr/tiles/image/{z}/{x}/{y}.png")
            h, w = ok.shape
            assert tile.shape[:2] == (256, 256)
            if tile.shape[2] == 4:  # RGBA unless every pixel of the tile has data
                assert (tile[:h, :w, 3] == np.where(ok, 255, 0)).all()
                assert (tile[h:, :, 3] == 0).all() and (tile[:, w:, 3] == 0).all()
            else:
                assert ok.all() and (h, w) == (256, 256)
            diff = np.abs(tile[:h, :w, :3].astype(int) - expected)[ok]
            assert diff.max(initial=0) <= 1, (z, x, y)  # float32 in the server, float64 here
        grey = client.png(f"/api/stores/rgb.zarr/tiles/image/{top}/1/1.png?bands=2")
        expected = _stretched(values[1:2, 256:512, 256:512], limits[1:2])
        ok = valid[256:512, 256:512]
        assert np.abs(grey[..., :3].astype(int) - expected)[ok].max() <= 1


def test_a_store_replaced_by_a_new_version_is_served_anew(shipped_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The server keeps a complete store's decoded chunks; a batch swapping a new version in (two
    renames) must not leave it drawing the old one."""
    import zarr

    root = tmp_path / "served"
    root.mkdir()
    with serving(shipped_store, root, {"aerial-vegetation.yaml": "aber.zarr"}) as base:
        client = Client(base)
        store = MaskStore.open(root / "aber.zarr")
        lut = render.class_lut(store)
        top = client.json("/api/stores/aber.zarr")["tiles"]["max_zoom"]  # type: ignore[index]
        before = client.png(f"/api/stores/aber.zarr/tiles/mask/{top}/0/0.png")
        mask = np.asarray(store.mask[:256, :256])
        assert np.array_equal(before[: mask.shape[0], : mask.shape[1]], lut[mask])
        fresh = tmp_path / "aber.zarr.next"
        shutil.copytree(root / "aber.zarr", fresh)
        array = zarr.open_array(fresh / store.info.arrays.mask, mode="r+")
        flipped = np.where(np.asarray(array[:]) == 1, 2, 1).astype(array.dtype)
        array[:] = flipped
        (root / "aber.zarr").rename(tmp_path / "aber.zarr.old")
        fresh.rename(root / "aber.zarr")
        after = client.png(f"/api/stores/aber.zarr/tiles/mask/{top}/0/0.png")
        assert np.array_equal(after[: mask.shape[0], : mask.shape[1]], lut[flipped[:256, :256]])


def test_cached_chunks_read_as_the_array_does(shipped_store) -> None:  # type: ignore[no-untyped-def]
    """render.Blocks against zarr itself, for random boxes and planes of the CT's HU image and labels,
    with a budget so small that chunks are dropped all the time."""
    store = MaskStore.open(shipped_store("ct-tissue.yaml")[0])
    blocks = render.Blocks(budget=3 << 20)
    rng = np.random.default_rng(0)
    for name in (store.info.arrays.image, store.info.arrays.mask):
        array = render.store_array(store, name)
        for _ in range(25):
            selection = []
            for n in array.shape:
                if rng.random() < 0.3:
                    selection.append(int(rng.integers(n)))
                else:
                    a, b = sorted(rng.integers(0, n + 1, 2))
                    selection.append(slice(int(a), int(b)))
            got = blocks.read(store, name, tuple(selection))
            assert np.array_equal(got, np.asarray(array[tuple(selection)]))
            assert blocks.size <= blocks.budget + max(v.nbytes for v in blocks.held.values())


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL"])
def test_stopping_raymask_serve_stops_its_workers_and_removes_its_cache(  # type: ignore[no-untyped-def]
    shipped_store, tmp_path: Path, stop: str
) -> None:
    """``raymask serve --workers 3`` is three processes; SIGTERM to the first (as a service manager
    sends) ends all three and removes the display cache it made; SIGKILL ends the workers too."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    served, scratch = tmp_path / "served", tmp_path / "tmp"
    served.mkdir()
    scratch.mkdir()
    shutil.copytree(shipped_store("rgb-vegetation.yaml")[0], served / "rgb.zarr")
    env = {**os.environ, "TMPDIR": str(scratch)}
    argv = [sys.executable, "-m", "pipeline.cli", "serve", str(served), "--port", "0", "--workers", "3"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        base = re.search(r"http://[0-9.]+:[0-9]+", line)
        assert base, line
        client = Client(base.group(0))
        deadline = time.monotonic() + 30
        while len(_children(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert len(workers) == 2
        for _ in range(6):  # some land on each process; the first builds the image's display pyramid
            assert client.png("/api/stores/rgb.zarr/tiles/image/0/0/0.png").shape[:2] == (256, 256)
        (cache,) = scratch.glob("raymask-serve-*")
        assert any(cache.glob("*.npy"))
        proc.send_signal(getattr(signal, stop))
        assert proc.wait(timeout=30) != 0 or stop == "SIGTERM"
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{w}").exists() and "Z" not in _state(w) for w in workers):
            assert time.monotonic() < deadline, "a worker outlived its parent"
            time.sleep(0.05)
        if stop == "SIGTERM":
            assert not cache.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"
