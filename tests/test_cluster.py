"""Jobs on a real Ray head on 127.0.0.1: `raymask submit` and raw `ray job submit`.

The head is started with `ray start --head` on free ports and its own temp dir, and stopped by
the PIDs of its processes (never `ray stop`, which would end every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DATA, ROOT, kill_all, processes_mentioning

pytestmark = pytest.mark.slow  # starts Ray heads of its own

BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: every socket stays bound until all are chosen, so the OS cannot
    hand the same port out twice (it did: gcs_server and object_manager once got one port)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def clean_env() -> dict[str, str]:
    """This machine's environment without the test session's own Ray address."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    dashboard, gcs, agent, agent_grpc, metrics, runtime_env, node_manager, object_manager = free_ports(8)
    command = [
        str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp}",
        "--num-cpus=2", "--include-dashboard=true", "--disable-usage-stats",
        # Every port explicit and free: the session's own local Ray already holds Ray's defaults
        # (52365 for the dashboard agent among them), and a head whose agent cannot bind never
        # accepts a job ("No available agent").
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
        f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
    ]  # fmt: skip
    started = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the node's job agent accepts jobs
            probe = subprocess.run(
                [str(BIN / "ray"), "job", "submit", "--address", address, "--no-wait", "--", "true"],
                env=token_env(), capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            if probe.returncode == 0:
                break
            time.sleep(2)
        else:
            pytest.fail(f"the Ray head never accepted a job: {probe.stderr[-1500:]}")
        yield address
    finally:
        kill_all(lambda: processes_mentioning(temp))
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A small project folder: what a user would submit as the working directory."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    (tmp_path / "data").mkdir()
    shutil.copytree(DATA / "sentinel2", tmp_path / "data" / "sentinel2")
    return tmp_path


def token_env() -> dict[str, str]:
    """What a user sets for `ray job submit` on a machine whose Ray holds a token."""
    env = clean_env()
    if (Path.home() / ".ray" / "auth_token").is_file():
        env.setdefault("RAY_AUTH_MODE", "token")
    return env


def test_raymask_submit_runs_the_job_on_the_cluster(ray_head: str, workdir: Path) -> None:
    """As the README shows it: the config's relative output path lands in the folder submitted from
    (the head runs on this machine), not in Ray's temporary copy of it; an address without a scheme works."""
    out = workdir / "out" / "aber-vegetation.zarr"
    result = subprocess.run(
        [str(BIN / "raymask"), "submit", "configs/aerial-vegetation.yaml", "--address",
         ray_head.removeprefix("http://")],
        cwd=workdir, env=clean_env(), capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "submitted raysubmit_" in result.stdout and "succeeded" in result.stdout
    assert "vegetation" in result.stdout  # the job's own summary, streamed back
    assert '"complete"' in (out / "zarr.json").read_text()


def test_raw_ray_job_submit_runs_raymask(ray_head: str, workdir: Path) -> None:
    out = workdir / "out" / "raw.zarr"
    result = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head, "--working-dir", ".", "--",
         "raymask", "run", "configs/aerial-vegetation.yaml", "--set", f"output.path={out}"],
        cwd=workdir, env=token_env(), capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert '"complete"' in (out / "zarr.json").read_text()


def test_a_failing_job_gives_a_non_zero_exit(ray_head: str, workdir: Path) -> None:
    result = subprocess.run(
        [str(BIN / "raymask"), "submit", "configs/aerial-vegetation.yaml", "--address", ray_head,
         "--set", "source.path=data/missing.tif", "--set", f"output.path={workdir / 'x.zarr'}"],
        cwd=workdir, env=clean_env(), capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 1
    assert "data/missing.tif: file not found" in result.stdout and "failed" in result.stdout


def test_an_unreachable_cluster_fails_within_seconds(workdir: Path) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [str(BIN / "raymask"), "submit", "configs/aerial-vegetation.yaml", "--address", "http://127.0.0.1:1"],
        cwd=workdir, env=clean_env(), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 75 and time.monotonic() - started < 30  # transient: retry later
    assert result.stderr.strip().splitlines()[-1].startswith("raymask: error: cannot reach a Ray cluster at")


def test_a_run_without_an_address_starts_its_own_ray_beside_a_running_head(ray_head: str, tmp_path: Path) -> None:
    """`runtime.address: null` is documented as embedded Ray; `ray.init()` alone would join the head
    that `ray start` left running here. The summary says which Ray a run used."""
    result = subprocess.run(
        [str(BIN / "raymask"), "run", str(ROOT / "configs" / "aerial-vegetation.yaml"), "--json",
         "--set", "runtime.engine=ray", "--set", f"output.path={tmp_path}/own.zarr"],
        env=clean_env(), capture_output=True, text=True, timeout=300, cwd=ROOT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["cluster"].startswith("a local Ray started for this run")
