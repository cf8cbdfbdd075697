"""What raymask exposes (SECURITY.md): the Ray it starts, its ports, and names that stay inside roots.

The listening sockets are read from /proc (no tool needed): every TCP socket in LISTEN state held
by the driver or a process below it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import descendants

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads sockets from /proc (Linux)")


def listening_sockets(pids: set[int]) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket the processes ``pids`` hold."""
    inodes: dict[str, tuple[str, str, int]] = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            address, port = fields[1].split(":")
            inodes[fields[9]] = ("", _address(address, width), int(port, 16))
    found = []
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            links = [os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        for link in links:
            if link.startswith("socket:[") and link[8:-1] in inodes:
                _, address, port = inodes[link[8:-1]]
                found.append((name, address, port))
    return sorted(set(found))


def _address(hex_address: str, width: int) -> str:
    if width == 8:  # IPv4, little-endian
        return ".".join(str(int(hex_address[i : i + 2], 16)) for i in (6, 4, 2, 0))
    if hex_address == "0" * 32:
        return "::"
    if hex_address == "00000000000000000000000001000000":
        return "::1"
    return hex_address


PROBE = textwrap.dedent(
    """
    import json, os, sys, time
    import grpc
    from pipeline.jobs.cluster import ray_session

    with ray_session(None) as what:  # what `raymask run` does with no address: a Ray of its own
        import ray

        gcs = ray.get_runtime_context().gcs_address
        call = grpc.insecure_channel(gcs).unary_unary(
            "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo",
            request_serializer=lambda b: b, response_deserializer=lambda b: b,
        )
        answers = {}
        for who, metadata in (("stranger", None), ("wrong token", [("authorization", "Bearer 0123")]),
                              ("raymask", [("authorization", "Bearer " + os.environ["RAY_AUTH_TOKEN"])])):
            try:
                call(b"", metadata=metadata, timeout=10)
                answers[who] = "OK"
            except grpc.RpcError as exc:
                answers[who] = exc.code().name
        print(json.dumps({"what": what, "gcs": gcs, "answers": answers}), flush=True)
        sys.stdin.readline()  # hold the Ray up while the test reads the sockets
    print(json.dumps({"env_after": {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}}), flush=True)
    """
)


@pytest.mark.slow  # starts a Ray of its own: `make test` runs it, `make check` does not
def test_the_ray_raymask_starts_has_no_dashboard_and_refuses_callers_without_its_token() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    root = Path(__file__).resolve().parent.parent
    driver = subprocess.Popen(
        [sys.executable, "-c", PROBE], cwd=root, env=env, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert driver.stdout is not None and driver.stdin is not None
        first = json.loads(driver.stdout.readline())
        sockets = listening_sockets({driver.pid, *descendants(driver.pid)})
        driver.stdin.write("\n")
        driver.stdin.flush()
        after = json.loads(driver.stdout.readline())
        assert driver.wait(timeout=60) == 0
    finally:
        driver.kill()
    assert first["what"].startswith("a local Ray started for this run")
    # Ray 2.60 binds these gRPC servers to every interface; the token is what keeps strangers out
    assert first["answers"] == {"stranger": "UNAUTHENTICATED", "wrong token": "UNAUTHENTICATED", "raymask": "OK"}
    gcs_port = int(first["gcs"].rsplit(":", 1)[1])
    assert any(port == gcs_port for _, _, port in sockets), sockets
    assert not any(port == 8265 for _, _, port in sockets), "the dashboard must not run"
    assert after["env_after"] == {"RAY_AUTH_MODE": None, "RAY_AUTH_TOKEN": None}, "the token outlived its Ray"
    print("listening:", sockets)


def test_batch_store_names_never_leave_the_output_root(tmp_path: Path) -> None:
    """Store names come from input paths: ``..`` in a glob names nothing outside the root, and a
    symbolic link planted under the root fails its input without writing where it points."""
    import numpy as np
    import yaml

    from tests.bad_inputs.corpus import geotiff, red_nir

    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "trap").mkdir()
    geotiff(tmp_path / "in" / "a.tif", red_nir(32, 32))
    geotiff(tmp_path / "in" / "trap" / "b.tif", red_nir(32, 32, seed=1))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "trap").symlink_to(outside)  # root/trap/b.tif.zarr would land in elsewhere/
    config = {"inputs": [f"{tmp_path}/in/sub/../*.tif", f"{tmp_path}/in/**/b.tif"], "model": {"kind": "ndvi"},
              "output": {"root": str(root)}}  # fmt: skip
    (tmp_path / "batch.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "batch", str(tmp_path / "batch.yaml"), "--json"],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    report = json.loads(result.stdout)
    status = {Path(r["input"]).name: r for r in report["results"]}
    assert status["a.tif"]["status"] == "done" and (root / "a.tif.zarr" / "zarr.json").is_file()
    assert status["b.tif"]["status"] == "failed"
    assert "leaves output.root" in status["b.tif"]["error"] and "symbolic link" in status["b.tif"]["error"]
    assert list(outside.iterdir()) == [], "a store was written through the link"
    stores = [p for p in tmp_path.rglob("*.zarr") if p.is_dir()]
    assert all(p.resolve().is_relative_to(root.resolve()) for p in stores), stores
    assert np.array_equal(sorted(p.name for p in stores), ["a.tif.zarr"])
