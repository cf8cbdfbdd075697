"""Submit a job to a Ray cluster through the Ray Jobs API and follow it.

The validated, resolved job config travels in the job's runtime environment (an environment
variable the entrypoint reads with ``raymask run env:RAYMASK_JOB``), and the current directory
travels as the working directory, so relative *input* paths mean on the cluster what they mean
here. Outputs are another matter: the working directory is unpacked into a temporary folder on the
head, so a relative ``output.path`` would be written there and lost. A relative output path is
therefore made absolute against this directory when the head runs on this machine, and refused
for a remote head (give a path on storage the cluster's nodes share).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import TextIO

import yaml

from pipeline.config import JobConfig
from pipeline.errors import ClusterError, ConfigError, one_line

CONFIG_ENV = "RAYMASK_JOB"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def submit(
    config: JobConfig,
    *,
    address: str,
    working_dir: Path,
    overwrite: bool = False,
    follow: bool = True,
    out: TextIO = sys.stdout,
) -> tuple[str, str]:
    """Submit; with ``follow``, stream the logs until the job ends. Returns (job id, status)."""
    _use_local_token()  # before Ray is imported: it reads RAY_AUTH_MODE once
    address = address if "://" in address else f"http://{address}"  # without a scheme Ray waits, then fails
    config = with_absolute_output(config, address, working_dir)
    logging.getLogger("ray").setLevel(logging.WARNING)  # not Ray's packaging chatter, line by line
    from ray.job_submission import JobSubmissionClient

    from pipeline.jobs.cluster import probe

    probe(address)
    try:
        client = JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, AuthenticationError, version errors
        raise ClusterError(f"cannot use the Ray Jobs API at {address}: {one_line(exc, 240)}") from exc
    entrypoint = ENTRYPOINT_CHECK + f"raymask run env:{CONFIG_ENV}" + (" --overwrite" if overwrite else "")
    runtime_env = {
        "working_dir": str(working_dir),
        "env_vars": {CONFIG_ENV: yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)},
    }
    job_id = _submit_with_retry(client, entrypoint, runtime_env)
    print(f"submitted {job_id} to {address}", file=out, flush=True)
    if not follow:
        return job_id, str(client.get_job_status(job_id))
    streamed = asyncio.run(_tail(client, job_id, out))
    status = _wait(client, job_id)
    if not streamed:  # a job that ends at once can finish before the log stream connects
        out.write(client.get_job_logs(job_id))
    print(f"job {job_id} {status.lower()}", file=out, flush=True)
    return job_id, status


# The job's shell says so when the head cannot run raymask at all, instead of "/bin/sh: raymask: not found".
ENTRYPOINT_CHECK = (
    "command -v raymask >/dev/null 2>&1 || { echo 'raymask: error: raymask is not installed where the Ray "
    "head runs jobs (not on its PATH): pip install raymask there, or use an image that has it' >&2; exit 127; }; "
)


def with_absolute_output(config: JobConfig, address: str, here: Path) -> JobConfig:
    """``config`` with a relative ``output.path`` made absolute against ``here`` when the head runs
    on this machine; refused (one line) for a remote head, where it would be lost."""
    given = config.output.path
    if Path(given).is_absolute() or "://" in given:
        return config
    if not on_this_machine(address):
        raise ConfigError(
            f"output.path {given} is relative: on the cluster it would be written inside the job's temporary "
            "copy of this folder and lost; give a path on storage the cluster's nodes share "
            f"(--set output.path=/shared/{Path(given).name})"
        )
    output = config.output.model_copy(update={"path": str((here / given).absolute())})
    return config.model_copy(update={"output": output})


def on_this_machine(address: str) -> bool:
    """Whether the host of ``address`` (http://HOST:PORT) is this machine: loopback, or one of its addresses."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    try:
        theirs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    if any(ipaddress.ip_address(a).is_loopback for a in theirs):
        return True
    try:
        ours = set(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        return False
    return bool(theirs & ours)


def _submit_with_retry(client: object, entrypoint: str, runtime_env: dict, timeout: float = 30.0) -> str:
    """Submit; a head that has just started answers "no available agent" for a while, so retry that."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return str(client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env))  # type: ignore[attr-defined]
        except RuntimeError as exc:
            message = one_line(exc)
            if "try again later" not in message:
                raise ClusterError(f"the cluster refused the job: {message[:240]}") from exc
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"the cluster's job agent has not accepted the job for {timeout:.0f} s ({message[:120]}): "
                    "check `ray status` on the head and its dashboard_agent.log"
                ) from exc
            time.sleep(2.0)


async def _tail(client: object, job_id: str, out: TextIO) -> bool:
    """Stream the job's logs until it ends; whether anything came."""
    streamed = False
    async for lines in client.tail_job_logs(job_id):  # type: ignore[attr-defined]
        streamed = streamed or bool(lines.strip())
        out.write(lines)
        out.flush()
    return streamed


def _wait(client: object, job_id: str, timeout: float = 300.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id)).rsplit(".", 1)[-1]  # type: ignore[attr-defined]
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def _use_local_token() -> None:
    """Clusters started on a machine that holds a Ray token (~/.ray/auth_token) require it."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"
