"""Object storage (issue 14), against moto's S3 server started by the test session (conftest
``s3_server``). So far: inputs on S3, read through GDAL on Ray workers; a store URL that raymask cannot
write is a one-line error, never a local folder named like the URL."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.conftest import RGB_BYTE, ROOT, S2
from tests.test_bad_input import assert_one_line_error, raymask


def test_a_store_url_is_refused_not_written_to_a_local_folder(tmp_path: Path) -> None:
    config = ROOT / "configs" / "aerial-vegetation.yaml"
    cwd, work = os.getcwd(), tmp_path / "work"
    work.mkdir()
    os.chdir(work)
    try:
        for url in ("gs://masks/x.zarr", "/vsis3/masks/x.zarr", "az://masks/x.zarr"):
            result = raymask("run", str(config), "--set", f"source.path={S2}", "--set", f"output.path={url}")
            assert_one_line_error(result, url, "is a URL; stores are written to folders or s3:// prefixes only")
        # s3:// is written, through the object store: here no endpoint or credentials reach one
        # (which of the two lines depends on whether an instance-metadata endpoint answers here)
        either = ("cannot reach the object store", "no credentials (set AWS_ACCESS_KEY_ID")
        result = raymask("run", str(config), "--set", f"source.path={S2}", "--set", "output.path=s3://masks/x.zarr")
        assert_one_line_error(result, "s3://masks/x.zarr")
        assert any(text in result.stderr for text in either), result.stderr
        assert list(work.iterdir()) == []  # no s3:/masks/... folder here
        # reading one is supported; here, with no endpoint or credentials, it is one line
        result = raymask("info", "s3://masks/nd/naip.zarr")
        assert_one_line_error(result, "s3://masks/nd/naip.zarr")
        assert any(text in result.stderr for text in either), result.stderr
        store = tmp_path / "local.zarr"
        assert (
            raymask("run", str(config), "--set", f"source.path={S2}", "--set", f"output.path={store}").returncode == 0
        )
        assert_one_line_error(raymask("export", str(store), "s3://exports/a.tif"), "s3://exports/a.tif", "a URL")
        assert list(work.iterdir()) == []
    finally:
        os.chdir(cwd)


@pytest.mark.usefixtures("ray_session")
def test_a_job_from_an_s3_input_equals_the_local_one(s3, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    """Read through GDAL's /vsis3/ on Ray actors (the driver's endpoint and credentials go with them):
    every array byte equals the same job on the local file; the source's identity is the object's
    ETag and size, read without downloading it."""
    from pipeline.cli import main
    from pipeline.store import MaskStore
    from tests.conftest import store_digest

    url = s3.put(S2, "s3://imagery/wales/aber.tif")
    config = ROOT / "configs" / "aerial-vegetation.yaml"
    stores = {}
    for name, source in (("remote", url), ("local", str(S2))):
        stores[name] = tmp_path / f"{name}.zarr"
        argv = ["run", str(config), "--set", f"source.path={source}", "--set", f"output.path={stores[name]}"]
        assert main([*argv, "--json", "--no-progress", "--set", "runtime.engine=ray"]) == 0
    capsys.readouterr()
    assert store_digest(stores["remote"])["files"] == store_digest(stores["local"])["files"]
    remote = MaskStore.open(stores["remote"]).info.source
    assert remote is not None and remote.paths == [url]
    assert remote.fingerprint == fingerprint_of(url, remote.bands)  # what a rerun compares
    s3.put(RGB_BYTE, url)  # the object rewritten: another identity, found without a download
    assert remote.fingerprint != fingerprint_of(url, remote.bands)


def fingerprint_of(url: str, bands: list[int]) -> str:
    from pipeline.sources.geotiff import RasterSource

    return RasterSource((url,), tuple(bands)).fingerprint()


def test_a_missing_object_is_one_line_in_seconds(s3, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s3.put(S2, "s3://imagery/present.tif")
    config = ROOT / "configs" / "aerial-vegetation.yaml"
    started = time.monotonic()
    result = raymask(
        "run", str(config), "--set", "source.path=s3://imagery/absent.tif", "--set", f"output.path={tmp_path}/x.zarr"
    )
    assert_one_line_error(result, "s3://imagery/absent.tif")
    assert time.monotonic() - started < 30 and not (tmp_path / "x.zarr").exists()


def test_stores_on_s3_are_read_as_local_ones(
    s3, shipped_store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """info, regions, query, export and pipeline.open_store on an s3:// store give what they give on
    the same store on disk (zarr's ObjectStore over obstore, configured from the GDAL variables)."""
    import json

    import numpy as np
    import rasterio

    import pipeline
    from pipeline.cli import main

    aber, _ = shipped_store("aerial-vegetation.yaml")
    url = s3.put_tree(aber, "s3://masks/wales/aber.zarr")

    def run(*args: str) -> dict:
        capsys.readouterr()
        assert main([*args, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    local, remote = run("info", str(aber)), run("info", url)
    assert remote.pop("path") == url and local.pop("path") == str(aber)
    assert remote == local
    for command in (["regions"], ["query", "--bbox", "-4.09,52.40,-4.06,52.42", "--crs", "EPSG:4326"]):
        a = run(command[0], str(aber), *command[1:])
        b = run(command[0], url, *command[1:])
        assert json.dumps(a).replace(str(aber), url) == json.dumps(b)
    assert main(["export", url, str(tmp_path / "remote.tif")]) == 0
    assert main(["export", str(aber), str(tmp_path / "local.tif")]) == 0
    with rasterio.open(tmp_path / "remote.tif") as a, rasterio.open(tmp_path / "local.tif") as b:
        assert np.array_equal(a.read(), b.read()) and a.transform == b.transform and a.crs == b.crs
    assert main(["export", url, str(tmp_path / "remote.parquet")]) == 0  # polygons: tasks read the S3 arrays
    view = pipeline.open_store(url)
    assert np.array_equal(view.mask.values, pipeline.open_store(aber).mask.values)
    assert view.mask.rio.crs == pipeline.open_store(aber).mask.rio.crs


def test_object_storage_failures_are_one_line(s3, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s3.put(S2, "s3://masks/not-a-store/file.tif")
    started = time.monotonic()
    assert_one_line_error(raymask("info", "s3://masks/absent.zarr"), "s3://masks/absent.zarr: no such store")
    assert_one_line_error(raymask("info", "s3://no-such-bucket/x.zarr"), "s3://no-such-bucket/x.zarr")
    result = raymask("regions", "s3://masks/x.zarr", "--compute")
    assert_one_line_error(result, "s3://masks/x.zarr")
    os.environ["AWS_S3_ENDPOINT"] = "127.0.0.1:9"  # nothing listens there
    try:
        assert_one_line_error(raymask("info", "s3://masks/x.zarr"), "s3://masks/x.zarr", "cannot reach")
    finally:
        os.environ["AWS_S3_ENDPOINT"] = s3.env["AWS_S3_ENDPOINT"]
    assert time.monotonic() - started < 60
    assert_one_line_error(raymask("catalog", "gs://masks/"), "gs://masks/", "a URL")


@pytest.mark.usefixtures("ray_session")
def test_a_batch_over_an_s3_prefix_isolates_a_broken_object(
    s3, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """Inputs listed in the bucket (one listing; ``**`` spans folders), stores named after the keys;
    the broken object fails alone; the next run skips the others by their ETags."""
    import json

    from pipeline.cli import main
    from tests.conftest import write_config

    s3.put(S2, "s3://archive/nightly/wales/aber.tif")
    s3.put(S2, "s3://archive/nightly/wales/sub/again.tif")
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00 not really a TIFF")
    s3.put(broken, "s3://archive/nightly/broken.tif")
    s3.put(S2, "s3://archive/other/not-matched.tif")
    config = write_config(
        tmp_path / "nightly.yaml",
        inputs=["s3://archive/nightly/**/*.tif"],
        source={"bands": [3, 8]},
        model={"kind": "ndvi"},
        tiling={"chunk": 128},
        output={"root": f"{tmp_path}/masks"},
    )
    capsys.readouterr()
    assert main(["batch", str(config), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    by_store = {r["store"]: r for r in report["results"]}
    assert sorted(by_store) == ["broken.tif.zarr", "wales/aber.tif.zarr", "wales/sub/again.tif.zarr"]
    assert (
        by_store["broken.tif.zarr"]["status"] == "failed"
        and "s3://archive/nightly/broken.tif" in (by_store["broken.tif.zarr"]["error"])
    )
    assert by_store["wales/aber.tif.zarr"]["status"] == "done" == by_store["wales/sub/again.tif.zarr"]["status"]
    assert main(["batch", str(config), "--json"]) == 1
    again = json.loads(capsys.readouterr().out)
    assert again["counts"]["skipped"] == 2 and again["counts"]["failed"] == 1


@pytest.mark.usefixtures("ray_session")
def test_a_dicom_series_from_an_s3_prefix_equals_the_local_one(
    s3, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """``source.path: s3://bucket/study/`` (a prefix) is a DICOM folder: listed, each object read whole
    (on Ray workers for the remote run); the store equals the local series' byte for byte, and its
    DICOM SEG references the same instances."""
    import json

    import highdicom as hd

    from pipeline.cli import main
    from pipeline.store import MaskStore
    from tests.conftest import CT_SERIES, store_digest

    url = s3.put_tree(CT_SERIES, "s3://studies/p1/ct") + "/"
    config = ROOT / "configs" / "ct-tissue.yaml"
    stores = {}
    for name, source, engine in (("remote", url, "ray"), ("local", str(CT_SERIES), "process")):
        stores[name] = tmp_path / f"{name}.zarr"
        argv = ["run", str(config), "--set", f"source.path={source}", "--set", f"output.path={stores[name]}"]
        assert main([*argv, "--json", "--no-progress", "--set", f"runtime.engine={engine}"]) == 0
    capsys.readouterr()
    assert store_digest(stores["remote"])["files"] == store_digest(stores["local"])["files"]
    source = MaskStore.open(stores["remote"]).info.source
    assert source is not None and all(p.startswith("s3://studies/p1/ct/") for p in source.paths)
    segs = {}
    for name, store in stores.items():
        assert main(["export", str(store), str(tmp_path / f"{name}.dcm")]) == 0
        segs[name] = hd.seg.segread(tmp_path / f"{name}.dcm")
    refs = {
        name: sorted(r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence)
        for name, seg in segs.items()
    }
    assert refs["remote"] == refs["local"] and len(refs["remote"]) == 20

    # a batch over the study prefix: one input per series, named after the study, exported as SEG
    from tests.conftest import write_config

    batch = write_config(
        tmp_path / "studies.yaml", inputs=["s3://studies/p1/"], model={"kind": "hu-tissue"},
        tiling={"chunk": [10, 256, 256]}, output={"root": f"{tmp_path}/masks", "exports": ["seg"]},
    )  # fmt: skip
    capsys.readouterr()
    assert main(["batch", str(batch), "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)["results"]
    assert result["status"] == "done" and result["store"].startswith("p1/CT-") and result["exports"]["seg"]


def s3_digest(url: str) -> dict[str, str]:
    """What ``store_digest`` gives for a local store, for a store on S3: each data object's sha256."""
    import hashlib

    from pipeline.store.location import ObjectPath, get_object, list_keys

    root = ObjectPath(url)
    return {
        key: hashlib.sha256(get_object(root / key) or b"").hexdigest()
        for key in sorted(list_keys(root))
        if not key.endswith("zarr.json") and not key.endswith(".png")
    }


@pytest.mark.usefixtures("ray_session")
def test_a_job_writes_its_store_to_s3_as_it_would_to_disk(
    s3, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """output.path s3://...: Ray actors write the chunks, the driver the metadata, regions, levels and
    preview; every data object equals the local store's file of the same name; the lease is gone after;
    a second run finds the complete store; --overwrite replaces it."""
    import json

    from pipeline.cli import main
    from pipeline.store import MaskStore
    from pipeline.store.location import ObjectPath, get_object, list_keys
    from tests.conftest import store_digest

    s3.client().create_bucket(Bucket="runs")
    config = ROOT / "configs" / "aerial-vegetation.yaml"
    url = "s3://runs/wales/aber.zarr"
    local = tmp_path / "aber.zarr"
    for out, engine in ((url, "ray"), (str(local), "process")):
        argv = ["run", str(config), "--set", f"source.path={S2}", "--set", f"output.path={out}", "--json"]
        assert main([*argv, "--no-progress", "--set", f"runtime.engine={engine}"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["status"] == "complete"
    assert s3_digest(url) == store_digest(local)["files"]
    store = MaskStore.open(url)
    assert store.info.complete and store.info.levels and store.info.regions is not None
    assert get_object(ObjectPath("s3://runs/wales/aber.preview.png")) is not None
    assert get_object(ObjectPath("s3://runs/wales/.aber.zarr.lease")) is None
    assert get_object(ObjectPath("s3://runs/wales/aber.zarr.creating")) is None
    assert not list_keys(ObjectPath("s3://runs/wales/.aber.zarr.regions"))  # the labelling scratch, in the bucket

    again = raymask("run", str(config), "--set", f"source.path={S2}", "--set", f"output.path={url}")
    assert_one_line_error(again, url, "a complete store is already there")
    argv = ["run", str(config), "--set", f"source.path={S2}", "--set", f"output.path={url}", "--overwrite"]
    assert main([*argv, "--no-progress", "--json"]) == 0
    capsys.readouterr()
    assert s3_digest(url) == store_digest(local)["files"]


@pytest.mark.slow  # kills a driver and its Ray, then runs the job again
@pytest.mark.usefixtures("ray_session")
def test_a_driver_killed_while_writing_to_s3_resumes_byte_identical(
    s3, tmp_path: Path, make_geotiff, scripted_unet, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """The store on S3 says incomplete while the killed run's units stay done; the next run resumes
    them (skips exactly those) and the mask equals an undisturbed local run's, object for file."""
    import json

    import yaml

    from pipeline.cli import main
    from pipeline.store import MaskStore
    from tests.conftest import s3_units_done, store_digest, unet_job
    from tests.test_resume import kill_driver_when

    s3.client().create_bucket(Bucket="killed")
    config = unet_job(tmp_path, make_geotiff, scripted_unet, store="clean.zarr", seed=3)
    url = "s3://killed/unet.zarr"
    remote = tmp_path / "remote.yaml"
    raw = yaml.safe_load(config.read_text())
    raw["output"]["path"] = url
    remote.write_text(yaml.safe_dump(raw))
    total = (512 // 64) * (448 // 64)

    def done() -> int:
        return s3_units_done(url)

    kill_driver_when(remote, lambda: done() >= 8, timeout=180)
    at_kill = done()
    assert 0 < at_kill < total, f"kill did not land mid-run ({at_kill}/{total})"
    assert MaskStore.open(url).status == "incomplete"
    assert main(["run", str(remote), "--json", "--no-progress"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["status"] == "complete" and resumed["units_skipped"] == at_kill
    assert main(["run", str(config), "--json", "--no-progress"]) == 0
    capsys.readouterr()
    clean = store_digest(tmp_path / "clean.zarr")["files"]
    assert {k: v for k, v in s3_digest(url).items() if k.startswith("mask/")} == {
        k: v for k, v in clean.items() if k.startswith("mask/")
    }


def test_an_interrupted_creation_on_s3_is_cleared_and_a_foreign_prefix_kept(s3, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from pipeline.store.location import ObjectPath, get_object, list_keys, put_object

    s3.client().create_bucket(Bucket="creating")
    config = ROOT / "configs" / "aerial-vegetation.yaml"
    url = "s3://creating/aber.zarr"
    # what a creation killed half-way leaves: the marker and some array metadata, no root metadata
    put_object(ObjectPath("s3://creating/aber.zarr.creating"), b"2026-11-22T00:00:00+00:00")
    put_object(ObjectPath(f"{url}/mask/zarr.json"), b"{}")
    result = raymask("run", str(config), "--set", f"source.path={S2}", "--set", f"output.path={url}")
    assert result.returncode == 0, result.stderr
    assert get_object(ObjectPath("s3://creating/aber.zarr.creating")) is None
    assert "zarr.json" in list_keys(ObjectPath(url))

    foreign = "s3://creating/theirs.zarr"
    put_object(ObjectPath(f"{foreign}/notes.txt"), b"mine")
    result = raymask("run", str(config), "--set", f"source.path={S2}", "--set", f"output.path={foreign}")
    assert_one_line_error(result, foreign)
    assert list_keys(ObjectPath(foreign)) == ["notes.txt"]


def test_regions_of_an_s3_store_are_relabelled_as_on_disk(
    s3, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """`raymask regions s3://... --compute --connectivity 8`: the lease, the scratch and the copy-in
    work on object storage; the new table equals the one a local relabel gives."""
    import json

    from pipeline.cli import main

    s3.client().create_bucket(Bucket="relabel")
    config = ROOT / "configs" / "aerial-vegetation.yaml"
    url, local = "s3://relabel/aber.zarr", tmp_path / "aber.zarr"
    for out in (url, str(local)):
        argv = ["run", str(config), "--set", f"source.path={S2}", "--set", f"output.path={out}", "--no-progress"]
        assert main([*argv, "--set", "runtime.engine=process", "--set", "output.preview=false"]) == 0
        assert main(["regions", out, "--compute", "--connectivity", "8", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["regions", url, "--json"]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert main(["regions", str(local), "--json"]) == 0
    assert json.dumps(json.loads(capsys.readouterr().out)).replace(str(local), url) == json.dumps(remote)
    assert remote


@pytest.mark.slow  # three batches, one of them killed mid-swap
def test_a_batch_root_on_s3_versions_stores_without_rename(
    s3, tmp_path: Path, make_geotiff, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """output.root s3://...: stores, exports and the report go to the bucket; the second run skips;
    a changed input gets a new version built at NAME.zarr.next and copied over the old one; a batch
    killed during that copy leaves a store that says so (never a mix read as complete), and the next
    run finishes the copy: the store then equals a local batch's, object for file."""
    import json
    import shutil

    import numpy as np

    from pipeline.cli import main
    from pipeline.store import MaskStore
    from pipeline.store.location import ObjectPath, get_object, list_keys
    from tests.conftest import store_digest, write_config
    from tests.test_resume import kill_driver_when

    s3.client().create_bucket(Bucket="nightly")
    archive = tmp_path / "archive"
    archive.mkdir()
    shutil.copy(S2, archive / "aber.tif")
    rng = np.random.default_rng(7)

    def change_small() -> None:
        image = make_geotiff(rng.integers(1, 3000, (10, 256, 256)).astype(np.uint16), name="small.tif")
        shutil.move(image, archive / "small.tif")

    change_small()

    def config(root: str, name: str) -> Path:
        return write_config(
            tmp_path / name, inputs=[f"{archive}/*.tif"], source={"bands": [3, 8]}, model={"kind": "ndvi"},
            tiling={"chunk": 32}, runtime={"engine": "process"},
            output={"root": root, "exports": ["cog"]},
        )  # fmt: skip

    remote, local = config("s3://nightly/masks", "remote.yaml"), config(f"{tmp_path}/masks", "local.yaml")
    url = "s3://nightly/masks/small.tif.zarr"

    def batch(cfg: Path) -> dict:  # type: ignore[type-arg]
        capsys.readouterr()
        assert main(["batch", str(cfg), "--json", "--no-progress"]) == 0
        return json.loads(capsys.readouterr().out)

    first = batch(remote)
    assert first["counts"]["done"] == 2 and first["root"] == "s3://nightly/masks"
    keys = list_keys(ObjectPath("s3://nightly/masks"))
    assert {"batch-report.json", "aber.tif.tif", "small.tif.tif", "small.tif.zarr/zarr.json"} <= set(keys)
    assert not any(k.startswith(("s3:", "/")) for k in keys) and not (Path.cwd() / "s3:").exists()
    assert json.loads(get_object(ObjectPath("s3://nightly/masks/batch-report.json")) or b"{}")["ok"] is True
    assert batch(remote)["counts"]["skipped"] == 2

    before = np.asarray(MaskStore.open(url).mask[:])
    change_small()  # same name, new content: a new version, copied over the old one
    third = batch(remote)
    assert third["counts"] == {"done": 1, "resumed": 0, "skipped": 1, "busy": 0, "failed": 0}
    after = np.asarray(MaskStore.open(url).mask[:])
    assert not np.array_equal(before, after)
    siblings = list_keys(ObjectPath("s3://nightly/masks"))
    assert not any(".next" in k or ".replacing" in k for k in siblings)

    change_small()
    marker = ObjectPath("s3://nightly/masks/small.tif.zarr.replacing")
    kill_driver_when(remote, lambda: get_object(marker) is not None, timeout=300, verb="batch")
    assert get_object(marker) is not None, "the kill did not land during the copy"
    try:  # the old store (its root metadata not yet gone) or one line: never a mix read as complete
        still = MaskStore.open(url)
        assert still.info.complete and np.array_equal(np.asarray(still.mask[:]), after)
    except Exception as exc:
        assert_one_line_error_text(str(exc), url, "a new version is being copied over this store")
    fourth = batch(remote)  # finishes the copy, then finds the new version complete
    assert fourth["counts"]["skipped"] == 2 and get_object(marker) is None
    assert batch(local)["counts"]["done"] == 2
    assert s3_digest(url) == store_digest(tmp_path / "masks" / "small.tif.zarr")["files"]
    assert not any(".next" in k for k in list_keys(ObjectPath("s3://nightly/masks")))

    # the catalog over the bucket: one listing, the same rows as over the local root
    def catalog(root: str) -> list[dict]:  # type: ignore[type-arg]
        capsys.readouterr()
        assert main(["catalog", root, "--json"]) == 0
        return [{k: v for k, v in row.items() if k != "completed"} for row in json.loads(capsys.readouterr().out)]

    remote_rows = catalog("s3://nightly/masks")
    assert [r["store"] for r in remote_rows] == ["aber.tif.zarr", "small.tif.zarr"]
    assert remote_rows == catalog(f"{tmp_path}/masks")
    out = tmp_path / "all.parquet"
    assert main(["catalog", "s3://nightly/masks", "--polygons", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stores"] == ["aber.tif.zarr", "small.tif.zarr"]


def assert_one_line_error_text(text: str, *needles: str) -> None:
    assert "\n" not in text and all(n in text for n in needles), text


@pytest.fixture
def s3_with_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A second moto server that checks signatures (IAM enforced after its first four requests):
    one user with an access key allowed s3:*, a bucket ``guarded`` holding the Sentinel-2 scene.
    Yields (server, key id, secret); the environment holds the right key."""
    import json

    import boto3

    from tests.conftest import moto_server

    with moto_server(tmp_path / "moto.log", INITIAL_NO_AUTH_ACTION_COUNT="4") as server:
        anyone = {"endpoint_url": server.endpoint, "region_name": "us-east-1"}
        iam = boto3.client("iam", aws_access_key_id="x", aws_secret_access_key="x", **anyone)  # type: ignore[call-overload]
        iam.create_user(UserName="raymask")
        key = iam.create_access_key(UserName="raymask")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="raymask", PolicyName="s3", PolicyDocument=json.dumps(policy))
        ident, secret = key["AccessKeyId"], key["SecretAccessKey"]
        client = boto3.client("s3", aws_access_key_id=ident, aws_secret_access_key=secret, **anyone)  # type: ignore[call-overload]
        client.create_bucket(Bucket="guarded")
        client.upload_file(str(S2), "guarded", "scenes/aber.tif")
        for name, value in {**server.env, "AWS_ACCESS_KEY_ID": ident, "AWS_SECRET_ACCESS_KEY": secret}.items():
            monkeypatch.setenv(name, value)
        yield server, ident, secret


def test_wrong_credentials_and_a_missing_bucket_are_one_line_and_write_nothing(  # type: ignore[no-untyped-def]
    s3_with_auth, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Against a server that checks signatures: the right key runs the job to S3; a wrong secret or
    an unknown key fails reading the input, writing a store and reading one, each in one line naming
    the URL and saying access was denied, in seconds, and writes nothing to the bucket."""
    from pipeline.cli import main
    from pipeline.store.location import ObjectPath, list_keys

    _, ident, secret = s3_with_auth
    config = ROOT / "configs" / "aerial-vegetation.yaml"
    source, store = "s3://guarded/scenes/aber.tif", "s3://guarded/masks/aber.zarr"
    job = ["run", str(config), "--set", f"source.path={source}", "--set", "runtime.engine=process"]
    assert main([*job, "--set", f"output.path={store}", "--json", "--no-progress"]) == 0  # the right key
    capsys.readouterr()
    denied = "access denied"
    for wrong in ({"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWNKEY000000"}):
        with pytest.MonkeyPatch.context() as env:
            for name, value in wrong.items():
                env.setenv(name, value)
            started = time.monotonic()
            assert_one_line_error(raymask("info", store), store, denied)
            result = raymask(*job, "--set", f"output.path={tmp_path}/local.zarr")
            assert_one_line_error(result, source, denied)
            assert not (tmp_path / "local.zarr").exists()
            new = "s3://guarded/new.zarr"
            assert_one_line_error(
                raymask("run", str(config), "--set", f"source.path={S2}", "--set", f"output.path={new}"), new, denied
            )
            assert time.monotonic() - started < 60
    assert not [k for k in list_keys(ObjectPath("s3://guarded")) if "new.zarr" in k]  # nothing written
    missing = "s3://no-such-bucket/a.zarr"
    result = raymask("run", str(config), "--set", f"source.path={S2}", "--set", f"output.path={missing}")
    assert_one_line_error(result, missing, "no such bucket")
    assert (ident, secret) == (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"])


@pytest.mark.slow  # two batches of the shipped nightly config
@pytest.mark.usefixtures("ray_session")
def test_the_shipped_nightly_config_runs_from_and_to_s3_as_the_cronjob_does(
    s3, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """deploy/kuberay/cronjob-nightly.yaml's command, as written there: configs/archive-nightly.yaml with its inputs (a
    study prefix, a glob of single DICOM objects, told apart from rasters by their DICM preamble) and
    its root on S3; the exports land beside the stores in the bucket, and the catalog over the bucket
    equals the catalog of the same batch run on local files, store for store."""
    import json

    import yaml

    from pipeline.cli import main
    from pipeline.store.location import ObjectPath, list_keys
    from tests.conftest import CT_SERIES, EDGE_CASES

    cron = yaml.safe_load((ROOT / "deploy" / "kuberay" / "cronjob-nightly.yaml").read_text())
    command = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    argv = command[command.index("--") + 2 :]  # batch /app/configs/archive-nightly.yaml --set ... as submitted
    argv[1] = argv[1].replace("/app/", f"{ROOT}/")  # the image's copy of the checkout
    root = next(a.split("=", 1)[1] for a in argv if a.startswith("output.root="))
    s3.put_tree(CT_SERIES, "s3://raymask-archive/dicom/ct_series")
    for path in sorted(EDGE_CASES.glob("693_*.dcm")):
        s3.put(path, f"s3://raymask-archive/dicom/edge_cases/{path.name}")
    s3.client().create_bucket(Bucket="raymask-masks")
    config = argv[1]
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["done"] == 3, report
    exports = sorted(w for r in report["results"] for w in r["exports"].values() if "not written" not in w)
    assert sorted(Path(w).suffix for w in exports) == [".dcm", ".parquet", ".parquet"]
    keys = set(list_keys(ObjectPath(root)))
    assert set(exports) <= keys and "batch-report.json" in keys
    os.chdir(ROOT)
    local = ["batch", config, "--set", f"output.root={tmp_path}/archive", "--json"]
    assert main(local) == 0
    capsys.readouterr()

    def rows(root: str) -> list[dict]:  # type: ignore[type-arg]
        assert main(["catalog", root, "--json"]) == 0
        skip = {"completed", "source"}
        return [{k: v for k, v in r.items() if k not in skip} for r in json.loads(capsys.readouterr().out)]

    assert rows(root) == rows(f"{tmp_path}/archive")


def test_a_stale_lease_on_s3_goes_to_exactly_one_of_several_contenders(s3) -> None:  # type: ignore[no-untyped-def]
    """No rename on object storage: a stale lease is overwritten only if unchanged since it was read
    (If-Match), so of four writers that all found it stale, one holds the store and three are busy."""
    import json
    import threading

    from pipeline.errors import StoreBusy
    from pipeline.store.lease import lease_path, store_lease
    from pipeline.store.location import ObjectPath, get_object, put_object

    s3.client().create_bucket(Bucket="leases")
    store = ObjectPath("s3://leases/scene.zarr")

    def contend(i: int, start: threading.Barrier, release: threading.Event, holders: list, busy: list) -> None:  # type: ignore[type-arg]
        start.wait()
        try:
            with store_lease(store, command=f"contender {i}"):
                holders.append(i)
                release.wait(30)
        except StoreBusy:
            busy.append(i)

    for _ in range(5):
        dead = {"id": "gone", "command": "raymask run", "host": "lost-node", "pid": 1, "heartbeat": time.time() - 3600}
        put_object(lease_path(store), json.dumps(dead).encode())
        start, release = threading.Barrier(4), threading.Event()
        holders: list[int] = []
        busy: list[int] = []
        threads = [threading.Thread(target=contend, args=(i, start, release, holders, busy)) for i in range(4)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while len(holders) + len(busy) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        release.set()
        for thread in threads:
            thread.join(timeout=30)
        assert len(holders) == 1 and len(busy) == 3, (holders, busy)
        assert get_object(lease_path(store)) is None  # released by its one holder
