"""Several nodes (issue 14): a Ray head and worker nodes started here as separate `ray start`
processes, each with its own temp dir and ports, sharing nothing but the S3 server: the input is
read from it and the store written to it, and the nodes are started without the S3 settings (the
driver forwards them to its actors and tasks). A node is lost by killing its processes by PID.

One machine cannot hide its filesystem from its own nodes; what the test shows is that nothing
raymask writes or reads goes through it (the job's input, store and region-labelling scratch all live
in the bucket). The model file is the one thing read from a path: on a real cluster it is in the
image or travels with `raymask submit` (Ray's working_dir).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import descendants, kill_all, processes_mentioning, s3_units_done, store_digest, unet_job
from tests.test_cluster import BIN, free_ports, token_env
from tests.test_object_storage import s3_digest

pytestmark = pytest.mark.slow  # starts a cluster of its own


class SlowNet(torch.nn.Module):
    """Plain 3x3 convolutions (receptive radius 25), slow enough on a CPU (about half a second per
    112-pixel window) that a node can join and another die while units are still queued."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Conv2d(3, 96, 3, padding=1)
        self.body = torch.nn.Sequential(
            *[torch.nn.Sequential(torch.nn.Conv2d(96, 96, 3, padding=1), torch.nn.ReLU()) for _ in range(24)]
        )
        self.out = torch.nn.Conv2d(96, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(torch.relu(self.inp(x))))


def slow_net(path: Path) -> Path:
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(SlowNet().eval()), str(path))
    return path


class Cluster:
    """A head without CPUs (the driver's node: no work lands there) and named worker nodes."""

    def __init__(self) -> None:
        self.temps: dict[str, str] = {}
        self.gcs = 0
        # The nodes know nothing of S3: storage settings reach the workers from the driver.
        self.env = {k: v for k, v in token_env().items() if not k.startswith("AWS_")}

    def _start(self, name: str, *args: str) -> None:
        temp = tempfile.mkdtemp(prefix=f"r{name}", dir="/tmp")  # short: socket paths must fit 107 bytes
        self.temps[name] = temp
        manager, objects, metrics, agent, agent_grpc, runtime_env = free_ports(6)
        command = [
            str(BIN / "ray"), "start", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats",
            f"--node-manager-port={manager}", f"--object-manager-port={objects}", f"--metrics-export-port={metrics}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}", *args,
        ]  # fmt: skip
        started = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stderr[-2000:]

    def start_head(self) -> None:
        (self.gcs,) = free_ports(1)
        self._start("h", "--head", f"--port={self.gcs}", "--num-cpus=0", "--include-dashboard=false")

    def add_node(self, name: str, cpus: int = 1) -> None:
        self._start(name, f"--address=127.0.0.1:{self.gcs}", f"--num-cpus={cpus}")

    def node_pids(self, name: str) -> list[int]:
        """The node's Ray processes (raylet, agents, log monitor) and what they started (workers)."""
        own = processes_mentioning(self.temps[name])
        return sorted({*own, *(d for pid in own for d in descendants(pid))})

    def runs_an_actor(self, name: str) -> bool:
        for pid in self.node_pids(name):
            with contextlib.suppress(OSError):
                if b"UnitWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return True
        return False

    def kill_node(self, name: str) -> None:
        """The machine is gone: every process of the node SIGKILLed at once."""
        pids = self.node_pids(name)
        assert pids, f"node {name} has no processes"
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)

    def stop(self) -> None:
        for temp in self.temps.values():
            kill_all(lambda temp=temp: processes_mentioning(temp))  # type: ignore[misc]


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        c.start_head()
        yield c
    finally:
        c.stop()


def wait_for(condition, timeout: float, what: str, driver: subprocess.Popen) -> None:  # type: ignore[no-untyped-def,type-arg]
    deadline = time.monotonic() + timeout
    while not condition():
        assert driver.poll() is None, f"the driver ended (exit {driver.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_node_joins_and_another_dies_mid_run_and_the_store_equals_an_undisturbed_one(  # type: ignore[no-untyped-def]
    cluster: Cluster, s3, tmp_path: Path, make_geotiff, scripted_unet, capsys: pytest.CaptureFixture[str]
) -> None:
    """runtime.actors: [1, 2] on a head (no CPUs) and one worker node: one actor. A second node
    joins mid-run: the pool grows onto it. The first node is then killed, its actor with it: the pool
    shrinks, its units are recomputed on the survivor, regions are labelled by tasks on the
    survivor through the scratch prefix in the bucket, and every object of the store equals an
    undisturbed single-machine run's file."""
    from pipeline.cli import main
    from pipeline.store import MaskStore

    config = unet_job(tmp_path, make_geotiff, scripted_unet, store="clean.zarr", seed=5)
    raw = yaml.safe_load(config.read_text())
    raw["model"].update(path=str(slow_net(tmp_path / "slow.pt")), receptive_radius=25, stride=1)
    raw["tiling"]["halo"] = 32
    raw["source"]["path"] = s3.put(Path(raw["source"]["path"]), "s3://fleet/scenes/unet.tif")
    raw["regions"] = {"enabled": True}
    clean = dict(raw, runtime={**raw["runtime"], "engine": "process"})
    (tmp_path / "clean.yaml").write_text(yaml.safe_dump(clean))
    url = "s3://fleet/masks/unet.zarr"
    raw["output"]["path"] = url
    raw["runtime"].update(actors=[1, 2], address=f"127.0.0.1:{cluster.gcs}", engine="ray")
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(raw))
    total = (512 // 64) * (448 // 64)

    def done() -> int:
        return s3_units_done(url)

    cluster.add_node("w1")
    out = tmp_path / "driver.out"
    with out.open("w") as stdout, (tmp_path / "driver.err").open("w") as stderr:
        driver = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", str(tmp_path / "fleet.yaml"), "--json", "--no-progress"],
            cwd=tmp_path, env={**token_env(), **s3.env}, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
        )  # fmt: skip
    try:
        wait_for(lambda: done() >= 4, 240, "the first units on w1", driver)
        cluster.add_node("w2")
        wait_for(lambda: cluster.runs_an_actor("w2"), 120, "an actor on the node that joined", driver)
        at_kill = done()
        cluster.kill_node("w1")
        assert at_kill < total, "the kill came after the last unit"
        driver.wait(timeout=480)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, (tmp_path / "driver.err").read_text()[-3000:]
    summary = json.loads(out.read_text())
    workers = summary["workers"]
    assert summary["status"] == "complete" and workers["grown"] >= 1 and workers["lost"] >= 1, workers
    assert workers["actors"] == 2  # the most at once: the pool grew to its maximum
    store = MaskStore.open(url)
    assert store.info.complete and store.info.regions is not None

    assert main(["run", str(tmp_path / "clean.yaml"), "--json", "--no-progress"]) == 0
    capsys.readouterr()
    assert s3_digest(url) == store_digest(tmp_path / "clean.zarr")["files"]
