"""Object storage (issue 14). So far: a store URL that raymask cannot write is a one-line error, never
a local folder named like the URL."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import ROOT, S2
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
