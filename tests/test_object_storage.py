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
        for url in ("s3://masks/nd/naip.zarr", "gs://masks/x.zarr", "/vsis3/masks/x.zarr"):
            result = raymask("run", str(config), "--set", f"source.path={S2}", "--set", f"output.path={url}")
            assert_one_line_error(result, url, "is a URL")
        assert list(work.iterdir()) == []  # no s3:/masks/... folder here
        assert_one_line_error(raymask("info", "s3://masks/nd/naip.zarr"), "s3://masks/nd/naip.zarr", "a URL")
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
